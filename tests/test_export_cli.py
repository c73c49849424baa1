"""``python cli.py export ...`` through click's CliRunner (one small static export)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner

import nafnet_core as nc
from cli import main
from tests.helpers import make_nontrivial, small_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    project = small_model()
    nc.save_checkpoint(d / "small.pt", project, train_size=16)
    official = make_nontrivial(nc.create_model("tiny"))
    nc.save_official(d / "official.pth", official)
    return d


def test_help_explains_both_forms():
    out = CliRunner().invoke(main, ["export", "--help"]).output
    assert "export CHECKPOINT" in out and "lint DIR_OR_ONNX" in out and "Examples" in out
    for sub in ("model", "lint"):
        assert "Example" in CliRunner().invoke(main, ["export", sub, "--help"]).output
    out = CliRunner().invoke(main, ["export", "model", "--help"]).output
    assert "trtexec --onnx=" in out and "--stronglyTyped" in out and "--noTF32" in out and "--minShapes=input:" in out


def test_export_then_lint(checkpoints, tmp_path):
    runner = CliRunner()
    out_dir = tmp_path / "exp"
    res = runner.invoke(main, ["export", str(checkpoints / "small.pt"), "--tile", "32x48", "--fp16",
                               "--out", str(out_dir)])
    assert res.exit_code == 0, res.output
    data = json.loads((out_dir / "manifest.json").read_text())
    assert set(data["artifacts"]) == {"onnx-fp32-32x48", "onnx-fp16-32x48"}
    assert data["tlc"]["train_size"] == 16 and data["source"]["kind"] == "project"
    assert "manifest:" in res.output
    commands = (out_dir / "TENSORRT.md").read_text()  # manual builds for this export's own files, hashed
    assert data["files"]["tensorrt-commands"]["file"] == "TENSORRT.md"
    assert "trtexec --onnx=model-fp16-32x48.onnx --saveEngine=model-fp16-32x48.engine --stronglyTyped" in commands
    assert "--minShapes" not in commands
    res = runner.invoke(main, ["export", "lint", str(out_dir), "--size", "32x48", "--half-size", "16x16"])
    assert res.exit_code == 0, res.output
    assert "FAIL" not in res.output and "FP16 placement" in res.output and "FP16 range report" in res.output
    for check in ("Pad modes", "DepthToSpace mode", "INT64 constants within INT32", "opset within TensorRT"):
        assert f"PASS  model-fp16-32x48.onnx  {check}" in res.output
    [placement] = [line for line in res.output.splitlines() if "fp16-32x48.onnx  FP16 placement" in line]
    assert "MatMul" in placement and "ReduceMean" not in placement and "Pow" not in placement  # ops in the graph


@pytest.mark.slow  # exports the tiny preset (9 blocks), fp32 + FP16, through the command line
def test_official_pth_with_preset_and_missing_tensorrt(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    res = CliRunner().invoke(main, ["export", str(checkpoints / "official.pth"), "--preset", "tiny", "--tile", "32x32",
                                    "--trt", "--no-check", "--out", str(tmp_path)])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1].startswith("Error: --trt needs TensorRT")
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["source"]["kind"] == "official" and data["model"]["preset"] == "tiny"
    assert data["tlc"]["kernels"][0] == [384, 384]


def test_bad_input_is_one_line(checkpoints, tmp_path):
    res = CliRunner().invoke(main, ["export", str(checkpoints / "official.pth"), "--out", str(tmp_path)])
    assert res.exit_code == 1 and "pass --preset" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["export", str(checkpoints / "small.pt"), "--tile", "0x4"])
    assert res.exit_code == 2 and "HEIGHTxWIDTH" in res.output
    # a tile the runtime could never feed (it pads every image to the model's multiple: 4 for this two-level
    # model) is refused before anything is written
    out = tmp_path / "odd"
    res = CliRunner().invoke(main, ["export", str(checkpoints / "small.pt"), "--tile", "42x58", "--out", str(out)])
    assert res.exit_code == 1 and "--tile 42x58" in res.output and "--tile 44x60" in res.output, res.output
    assert "multiples of 4" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()
    res = CliRunner().invoke(main, ["export", "lint", str(tmp_path)])
    assert res.exit_code == 1 and "manifest" in res.output
