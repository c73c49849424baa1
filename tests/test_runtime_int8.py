"""INT8 in the runtime: parity rows with the export's budget, bench rows, ``auto`` only where parity passed, the
variants."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import nafnet_core as nc
from export import export_model, load_manifest
from export.int8 import Int8Options
from export.lint import lint_path
from runtime.parity import ParityRow, _verdict
from tests.helpers import TILE, TRAIN_SIZE, has_trt_gpu, make_nontrivial

pytestmark = pytest.mark.usefixtures("one_thread")

CHEAP = Int8Options(crops=4, val_images=4, cpu_form="always")


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory, tiny_checkpoint, synth_root):
    """The tiny TLC checkpoint: fp32 dynamic + TILE x TILE, and both INT8 forms of each; exported from an empty
    working directory, which it must leave empty (onnxruntime's quantization tools write temporary files there)."""
    out, cwd = tmp_path_factory.mktemp("int8_export"), tmp_path_factory.mktemp("cwd")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        export_model(tiny_checkpoint, out, tiles=[(TILE, TILE)], dynamic=True, int8=True, int8_options=CHEAP,
                     check=False)
    finally:
        os.chdir(old)
    assert not list(cwd.iterdir())
    return out


def test_int8_rows_are_held_to_their_own_budget():
    row = ParityRow("onnxrt", "int8", "whole", delta_psnr=-0.08, psnr_vs_reference=38.0)
    assert _verdict(row, 0.10) and not _verdict(row, 0.05)
    tiled = ParityRow("onnxrt", "int8", "tiled 64x64", delta_psnr=0.09)
    assert _verdict(tiled, 0.10)  # the budget, not the tiled limit of 0.05
    fp16 = ParityRow("onnxrt", "fp16", "whole", delta_psnr=-0.08, psnr_vs_reference=50.0)
    assert not _verdict(fp16)  # other precisions keep their limits


@pytest.mark.slow
def test_parity_checks_int8_whole_and_tiled_within_the_budget(int8_export, synth_root, tmp_path):
    from runtime.parity import check_parity

    export = tmp_path / "export"
    shutil.copytree(int8_export, export)
    report = check_parity(export, synth_root, split="test", torch_precisions=(), progress=False)
    rows = {(r.backend, r.precision, r.mode): r for r in report.rows}
    whole, tiled = rows[("onnxrt", "int8", "whole")], rows[("onnxrt", "int8", f"tiled {TILE}x{TILE}")]
    budget = load_manifest(export).data["int8"]["budget_db"]
    for r in (whole, tiled):
        assert r.passed is True and abs(r.delta_psnr) <= budget and r.max_abs_diff > 0  # INT8 ran, within budget
        assert "INT8 budget" in r.status
    assert report.passed
    trt = [r for r in report.rows if r.backend == "trt"]
    assert trt and all(r.passed is None and "cannot run here" in r.status for r in trt)


@pytest.mark.slow
def test_parity_holds_the_tensorrt_form_to_the_budget(tiny_checkpoint, synth_root, tmp_path):
    """Without a cpu form the onnxruntime INT8 rows run the TensorRT form (FP16 float parts, FP16 Q/DQ scales at
    opset 19), within the export's budget."""
    from runtime.parity import check_parity

    export_model(tiny_checkpoint, tmp_path, tiles=[(TILE, TILE)], dynamic=False, int8=True, check=False,
                 int8_options=Int8Options(crops=4, val_images=4, cpu_form="never"))
    m = load_manifest(tmp_path)
    assert m.artifacts[f"onnx-int8-{TILE}x{TILE}"]["int8"]["float_parts"] == "fp16-fp32-islands"
    report = check_parity(tmp_path, synth_root, split="test", torch_precisions=(), progress=False)
    int8 = [r for r in report.rows if r.backend == "onnxrt" and r.precision == "int8"]
    assert int8 and all(r.passed is True and abs(r.delta_psnr) <= m.data["int8"]["budget_db"] and r.max_abs_diff > 0
                        for r in int8), int8
    assert report.passed


@pytest.mark.slow
def test_onnxruntime_runs_the_cpu_form_of_an_int8_export(int8_export):
    from runtime.models import open_runner

    runner = open_runner(int8_export, backend="onnxrt", precision="int8")
    assert runner.precision == "int8" and runner.path.name == "model-int8cpu-dynamic.onnx"
    assert open_runner(int8_export, backend="onnxrt").precision == "fp32"  # never INT8 unless asked
    x = torch.rand(1, 3, 48, 80)
    with runner:
        y = runner.infer(x)
    with open_runner(int8_export, backend="onnxrt") as fp32:
        ref = fp32.infer(x)
    assert y.shape == x.shape and 0 < (y - ref).abs().max() < 0.2


@pytest.mark.slow
def test_auto_takes_int8_only_where_parity_passed(int8_export, tmp_path):
    from runtime.models import BENCH_RECORD, PARITY_RECORD, auto_order, machine_id, open_runner

    export = tmp_path / "export"
    shutil.copytree(int8_export, export)
    rows = [{"backend": "onnxrt", "precision": p, "mode": "whole", "size": "64x64", "median_ms": ms, "status": "ok"}
            for p, ms in (("int8", 5.0), ("fp32", 10.0))]
    (export / BENCH_RECORD).write_text(json.dumps({"size": "64x64", "machine": machine_id(), "rows": rows}))
    assert ("onnxrt", "int8") not in auto_order(export)[0]  # fastest, but no parity record
    passed = {"backend": "onnxrt", "precision": "int8", "pass": True}
    (export / PARITY_RECORD).write_text(json.dumps({"rows": [passed]}))
    assert auto_order(export)[0][0] == ("onnxrt", "int8")
    assert open_runner(export).precision == "int8"
    (export / PARITY_RECORD).write_text(json.dumps({"rows": [
        {"backend": "onnxrt", "precision": "int8", "mode": "whole", "pass": True},
        {"backend": "onnxrt", "precision": "int8", "mode": "tiled 64x64", "pass": False}]}))
    assert ("onnxrt", "int8") not in auto_order(export)[0]  # one failed row is enough


@pytest.mark.slow
def test_bench_times_the_int8_rows(int8_export):
    from runtime.bench import bench_export

    result = bench_export(int8_export, size=(TILE, TILE), repeats=1, warmup=0, include_torch=False,
                          include_openvino=False, progress=False)
    int8 = [r for r in result["rows"] if r["precision"] == "int8"]
    assert {r["backend"] for r in int8} == {"onnxrt"}  # no engine in the export
    assert sorted(r["mode"] for r in int8) == sorted(["whole", f"tiled {TILE}x{TILE}"])  # one row per shape
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in int8)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-fnaf", "tiny-cg", "tiny-fft"])
def test_every_variant_exports_int8_within_its_budget(preset, tmp_path, synth_root):
    torch.manual_seed(0)
    model = make_nontrivial(nc.create_model(preset))
    ckpt = tmp_path / f"{preset}.pt"
    nc.save_checkpoint(ckpt, model, train_size=TRAIN_SIZE)
    export_model(ckpt, tmp_path / "out", tiles=[(TILE, TILE)], dynamic=False, int8=True,
                 int8_options=Int8Options(crops=4, val_images=4, cpu_form="never"))
    m = load_manifest(tmp_path / "out")
    rec = m.artifacts[f"onnx-int8-{TILE}x{TILE}"]
    assert abs(rec["int8"]["val_delta_psnr_db"]) <= 0.10 and rec["int8"]["quantized_convs"] > 0
    assert rec["check"]["psnr_db"] > 30
    findings = lint_path(tmp_path / "out")
    assert all(f.ok for f in findings), [f for f in findings if not f.ok]



@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not has_trt_gpu(), reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_builds_the_int8_engine_from_the_qdq_graph(int8_export, tmp_path):
    from export.shapes import ShapeSpec, make_profile
    from export.tensorrt_build import build_engine, run_engine
    from export.trt_plan import TrtOptions
    from tests.helpers import photo

    m = load_manifest(int8_export)
    options = TrtOptions(workspace_gib=1, timing_cache=tmp_path / "timing.cache")
    rec = build_engine(m.path(f"onnx-int8-{TILE}x{TILE}"), tmp_path / "int8.engine",
                       make_profile(ShapeSpec.tile(TILE, TILE)), "input", options)
    assert rec["strongly_typed"]
    x = photo(TILE, TILE)
    out = torch.from_numpy(run_engine(tmp_path / "int8.engine", x.numpy()))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(m.path(f"onnx-int8-{TILE}x{TILE}")), providers=["CPUExecutionProvider"])
    ref = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    assert nc.psnr(out.clamp(0, 1), ref.clamp(0, 1), data_range=1.0).item() > 35  # the same Q/DQ arithmetic
