"""Bad-input suite for ``eval``: every case of tests/reliability_cases.py in one test split.

Expected: each good or merely unusual pair is scored (a row in the CSV); each bad one gets one line
``failed: <file>: <reason>`` on stderr; the means cover the scored pairs; JSON/CSV are still written;
exit code 1. Images below the 11x11 SSIM window cannot be scored and say so.
Bad checkpoints and unwritable outputs: one line naming the file, exit code 1.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import nafnet_core as nc
from cli import main
from tests.helpers import small_model
from tests.reliability_cases import CASES, deny_read, make_dataset, one_line_naming, unreadable_paths

# Too small for the 11x11 SSIM window: eval cannot score them (every other entry point processes them).
UNSCORABLE = {"one_by_one", "one_by_n"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = small_model()
    return nc.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.pt", model, train_size=32)


@pytest.fixture(scope="module")
def evaluated(checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    # Good pairs a1..a18 sort first: the val half takes 17 of them, the test half a18 plus every case.
    root = make_dataset(tmp / "ds", CASES, train=False, n_good=len(CASES) + 2)
    out = tmp / "out"
    with deny_read(unreadable_paths(root)):
        res = CliRunner().invoke(main, ["eval", str(checkpoint), "--data", str(root), "--split", "test",
                                        "--device", "cpu", "--json", str(out / "m.json"), "--csv", str(out / "m.csv")])
    return root, out, res


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_case(evaluated, case):
    root, out, res = evaluated
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    rows = {r.split(",")[0] for r in (out / "m.csv").read_text().splitlines()[1:]}
    blur = root / "test" / "blur" / case.file_name
    if case.outcome == "ok" and case.name not in UNSCORABLE:
        assert case.file_name in rows
        assert str(blur) not in res.stderr
    else:
        assert case.file_name not in rows
        fragment = "too small to score" if case.name in UNSCORABLE else case.message
        assert one_line_naming(res.stderr, blur, fragment), res.stderr


def test_summary_counts_and_json(evaluated):
    root, out, res = evaluated
    bad = sum(c.outcome == "error" or c.name in UNSCORABLE for c in CASES)
    scored = 1 + len(CASES) - bad  # a18 + the scorable cases
    assert f"mean over {scored} test images" in res.stdout
    assert res.stderr.strip().splitlines()[-1] == (f"Error: {bad} of {bad + scored} pairs could not be scored "
                                                    "(listed above; the means exclude them)")
    data = json.loads((out / "m.json").read_text())
    assert data["images"] == scored and data["failed"] == bad and len(data["failures"]) == bad


def test_size_mismatch_is_one_line(checkpoint, tmp_path):
    from PIL import Image

    from tests.reliability_cases import pixels

    root = make_dataset(tmp_path / "ds", [], train=False, n_good=2)
    Image.fromarray(pixels(30, 48)).save(root / "test/sharp/a2.png")
    res = CliRunner().invoke(main, ["eval", str(checkpoint), "--data", str(root), "--device", "cpu"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert one_line_naming(res.stderr, root / "test/blur/a2.png", "differs from its partner")


@pytest.mark.parametrize("content,fragment", [
    (b"", "empty file (0 bytes)"),
    (b"hello, not a checkpoint", "not a readable checkpoint"),
    (None, "is a directory"),
], ids=["zero_byte", "text", "directory"])
def test_bad_checkpoint_is_one_line(tmp_path, content, fragment):
    path = tmp_path / "bad_ckpt_ü.pt"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    res = CliRunner().invoke(main, ["eval", str(path), "--device", "cpu"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == [f"Error: {path}: " + res.output.split(f"{path}: ", 1)[1].strip()]
    assert fragment in res.output


def test_unwritable_json_is_one_line(checkpoint, tmp_path):
    root = make_dataset(tmp_path / "ds", [], train=False, n_good=2)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(main, ["eval", str(checkpoint), "--data", str(root), "--device", "cpu",
                                    "--json", str(blocker / "m.json")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert one_line_naming(res.output, blocker / "m.json", "cannot write")
