"""Bad-input suite for ``data check``: every case of tests/reliability_cases.py in one data set.

Expected: good pairs are never reported; each bad file gets its own line naming it; exit code 1.
Without ``--full`` only the header is read, so files cut after their header pass (by design, the help
says so; training decodes them and fails naming the file, see test_reliability_train.py).
"""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from cli import main
from tests.reliability_cases import CASES, deny_read, make_dataset, one_line_naming, unreadable_paths


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("check") / "ds", CASES, test=False)
    os.symlink("..", root / "train" / "blur" / "loop")  # a symlink loop inside the data set
    outputs = {}
    with deny_read(unreadable_paths(root)):
        for mode in ("full", "header"):
            args = ["data", "check", str(root)] + (["--full"] if mode == "full" else [])
            outputs[mode] = CliRunner().invoke(main, args)
    return root, outputs


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_case(checked, case):
    root, outputs = checked
    for mode, res in outputs.items():
        assert res.exit_code == 1, res.output  # the bad cases and the loop are reported
        assert "Traceback" not in res.output
        fails = case.outcome == "error" and not (mode == "header" and case.header_ok)
        for kind in ("blur", "sharp"):
            path = root / "train" / kind / case.file_name
            if fails:
                assert one_line_naming(res.output, path, case.message), (mode, res.output)
            else:
                assert str(path) not in res.output, (mode, res.output)


def test_good_pairs_are_kept_and_loop_reported(checked):
    root, outputs = checked
    for res in outputs.values():
        assert "a1.png" not in res.output and "a2.png" not in res.output
        ok_pairs = 2 + sum(c.outcome == "ok" for c in CASES)
        assert f"{ok_pairs + sum(c.outcome == 'error' for c in CASES):>6} pairs" in res.output  # all found
        assert one_line_naming(res.output, root / "train/blur/loop", "not an image file")


def test_missing_and_unreadable_folder(tmp_path):
    res = CliRunner().invoke(main, ["data", "check", str(tmp_path / "nope")])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "no such folder" in res.output


def test_pixel_limit_is_configurable_for_every_command(tmp_path):
    """NAFNET_MAX_PIXELS sets the decompression-bomb limit of data check, eval and train (infer: --max-pixels)."""
    import subprocess
    import sys
    from pathlib import Path

    root = make_dataset(tmp_path / "ds", [], n_good=1)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "NAFNET_MAX_PIXELS": "1000"}
    r = subprocess.run([sys.executable, str(repo / "cli.py"), "data", "check", str(root)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert one_line_naming(r.stdout, root / "train/blur/a1.png", "48x40 = 1,920 pixels exceeds the limit of 1,000")
    assert "NAFNET_MAX_PIXELS" in r.stdout


def test_bad_pixel_limit_env_is_one_error(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "ds", [], n_good=1)
    monkeypatch.setenv("NAFNET_MAX_PIXELS", "lots")
    res = CliRunner().invoke(main, ["data", "check", str(root)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.startswith("Error: NAFNET_MAX_PIXELS='lots' is not a positive whole number of pixels")
    assert len(res.output.strip().splitlines()) == 1
