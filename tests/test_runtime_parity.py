"""parity: every row that runs here passes on the synthetic test split; a wrong reference fails it."""

from __future__ import annotations

import json
import shutil

import torch
from click.testing import CliRunner

import nafnet_core as nc
from cli import main
from runtime.parity import LIMITS, ParityRow, _verdict, check_parity
from tests.helpers import MINI, TILE, make_nontrivial


def test_verdict_limits_pinned():
    assert LIMITS["fp32"] == (0.01, 60.0) and LIMITS["fp16"] == (0.05, 45.0)
    assert _verdict(ParityRow("onnxrt", "fp32", "whole", delta_psnr=0.009, psnr_vs_reference=61))
    assert not _verdict(ParityRow("onnxrt", "fp32", "whole", delta_psnr=0.011, psnr_vs_reference=99))
    assert not _verdict(ParityRow("onnxrt", "fp32", "whole", delta_psnr=0.0, psnr_vs_reference=59.9))
    assert _verdict(ParityRow("onnxrt", "fp32", "whole", delta_psnr=0.0, psnr_vs_reference=None))  # identical
    assert _verdict(ParityRow("onnxrt", "fp16", "whole", delta_psnr=-0.04, psnr_vs_reference=46))
    assert not _verdict(ParityRow("onnxrt", "fp16", "whole", delta_psnr=0.0, psnr_vs_reference=44))
    assert _verdict(ParityRow("onnxrt", "fp32", "tiled 64x64", delta_psnr=0.049, psnr_vs_reference=30))
    assert not _verdict(ParityRow("onnxrt", "fp32", "tiled 64x64", delta_psnr=-0.051, psnr_vs_reference=30))


def test_parity_passes_on_synthetic_test_split(tiny_export, synth_root, tmp_path):
    export = tmp_path / "export"  # a copy: the command records its result in the export (read by --backend auto)
    shutil.copytree(tiny_export, export)
    out = tmp_path / "parity.json"
    res = CliRunner().invoke(main, ["parity", str(export), "--data", str(synth_root), "--json", str(out), "-q",
                                    "--limit", "2"])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["pass"] is True
    rows = {(r["backend"], r["precision"], r["mode"]): r for r in report["rows"]}
    expected = {("torch", "fp32", "whole"), ("torch", "fp16", "whole"), ("torch", "bf16", "whole"),
                ("torch", "fp32", f"tiled {TILE}x{TILE}"), ("onnxrt", "fp32", "whole"),
                ("onnxrt", "fp32", f"tiled {TILE}x{TILE}"), ("onnxrt", "fp16", "whole"),
                ("onnxrt", "fp16", f"tiled {TILE}x{TILE}")}
    assert expected <= set(rows)
    keys = {"backend", "precision", "mode", "psnr", "ssim", "delta_psnr", "psnr_vs_reference", "max_abs_diff",
            "ms_per_image", "pass", "status"}
    assert all(keys <= set(r) for r in report["rows"])
    ort = rows[("onnxrt", "fp32", "whole")]
    assert ort["pass"] and abs(ort["delta_psnr"]) <= 0.01 and ort["max_abs_diff"] < 1e-4
    # fp16 in torch on CPU really is fp16 (the only FP16 numerics check here): close but not identical
    assert 0 < rows[("torch", "fp16", "whole")]["max_abs_diff"] < 0.05
    assert "PASS" in res.output and "ΔPSNR" in res.output


def test_parity_fails_against_another_model(tiny_export, synth_root, tmp_path):
    # a reference with different weights must fail the fp32 rows: the check can fail
    torch.manual_seed(1)
    other = make_nontrivial(nc.create_model("tiny", **MINI), seed=1)
    path = nc.save_checkpoint(tmp_path / "other.pt", other, train_size=64)
    report = check_parity(tiny_export, synth_root, checkpoint=path, torch_precisions=(), progress=False, limit=2)
    assert not report.passed
    row = next(r for r in report.rows if r.backend == "onnxrt" and r.precision == "fp32" and r.mode == "whole")
    assert row.passed is False and row.psnr_vs_reference < 40


def test_parity_reports_rows_that_cannot_run(tiny_tile_export, synth_root):
    report = check_parity(tiny_tile_export, synth_root, torch_precisions=(), progress=False, limit=1)
    table = report.table()
    assert "torch" in table and "onnxrt" in table
    trt = [r for r in report.rows if r.backend == "trt"]
    assert trt, "TensorRT must appear as a row, with the reason when it cannot run"
    if trt[0].passed is None:
        assert "cannot run here" in trt[0].status and ("TensorRT" in trt[0].status or "engine" in trt[0].status)
        assert report.passed  # a row that cannot run does not fail the report


def test_a_row_that_fails_on_an_image_fails_the_report(tiny_tile_export, synth_root, monkeypatch):
    """A backend that raises on a test image (here: every onnxruntime run) is a failed row, not a skipped one."""
    from runtime.runners import OnnxRuntimeRunner

    def broken(self, x):
        raise RuntimeError("simulated failure inside the backend")

    monkeypatch.setattr(OnnxRuntimeRunner, "_infer", broken)
    report = check_parity(tiny_tile_export, synth_root, torch_precisions=(), progress=False, limit=1)
    ort_rows = [r for r in report.rows if r.backend == "onnxrt"]
    assert ort_rows and all(r.passed is False and r.status.startswith("failed on ") for r in ort_rows)
    assert not report.passed and "FAIL" in report.table()
