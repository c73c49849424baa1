"""Reliability of ``parity``: the bad-input table in the test split, tampered exports.

Expected for bad pairs: every readable pair is compared by every backend; each bad pair is one line
``failed: <file>: <reason>``; the verdict is FAIL and the exit code 1 (a parity claim over a data set
with unreadable files is not a pass). Tampered artifact: refused before anything runs, naming the file;
``--no-verify`` runs it, and parity then shows the modified graph failing its row.
"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from cli import main
from tests.reliability_cases import CASES, deny_read, make_dataset, one_line_naming, tamper_weights, unreadable_paths

UNSCORABLE = {"one_by_one", "one_by_n"}  # below the 11x11 SSIM window


def _parity(export_dir, data, *extra):
    return CliRunner().invoke(main, ["parity", str(export_dir), "--data", str(data), "--torch-precisions", "", "-q",
                                     *map(str, extra)])


@pytest.fixture(scope="module")
def table(tmp_path_factory, tiny_tile_export):
    tmp = tmp_path_factory.mktemp("parity")
    export = tmp / "export"  # a copy: the command records its result in the export (read by --backend auto)
    shutil.copytree(tiny_tile_export, export)
    root = make_dataset(tmp / "ds", CASES, train=False, n_good=len(CASES) + 2)  # test half: a18 + every case
    with deny_read(unreadable_paths(root)):
        res = _parity(export, root, "--json", tmp / "p.json")
    return root, res, json.loads((tmp / "p.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_case(table, case):
    root, res, report = table
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    blur = root / "test" / "blur" / case.file_name
    if case.outcome == "ok" and case.name not in UNSCORABLE:
        assert str(blur) not in report["failed"]
    else:
        fragment = "too small to score" if case.name in UNSCORABLE else case.message
        assert one_line_naming(res.stdout, blur, fragment), res.stdout


def test_readable_pairs_all_compared_and_rows_pass(table):
    root, res, report = table
    bad = sum(c.outcome == "error" or c.name in UNSCORABLE for c in CASES)
    assert report["images"] == 1 + len(CASES) - bad and len(report["failed"]) == bad
    ran = [r for r in report["rows"] if r["pass"] is not None]
    assert ran and all(r["pass"] for r in ran)  # the backends agree; only the unreadable files fail the run
    assert report["pass"] is False
    assert f"({bad} pairs could not be read, listed above)" in res.stdout


def test_modified_artifact_refused_then_no_verify_shows_it(tmp_path, tiny_export):
    d = tmp_path / "exp"
    shutil.copytree(tiny_export, d)
    root = make_dataset(tmp_path / "ds", [], train=False, n_good=2)
    onnx = d / "model-fp32-dynamic.onnx"
    tamper_weights(onnx)
    res = _parity(d, root)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1].startswith(f"Error: {onnx}: modified since export")
    res = _parity(d, root, "--no-verify", "--json", tmp_path / "p.json")
    assert "Traceback" not in res.output, res.output
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    dyn = next(r for r in rows if r["backend"] == "onnxrt" and r["precision"] == "fp32" and r["mode"] == "whole")
    assert dyn["pass"] is False and dyn["psnr_vs_reference"] < 60  # the modified graph ran, and parity caught it
