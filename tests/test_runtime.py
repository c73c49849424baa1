"""Runners: one interface, same numbers across torch / onnxruntime, clear errors where a backend is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nafnet_core as nc
from runtime.models import open_runner
from runtime.restore import restore
from runtime.runners import (
    OnnxRuntimeRunner,
    RunnerError,
    TensorRTRunner,
    TorchRunner,
    cuda_device_count,
    ort_providers,
)
from runtime.trt import tensorrt_available
from tests.helpers import TILE, photo


def test_torch_runner_lifecycle_and_precisions(tiny_tlc):
    _, model = tiny_tlc
    x = photo(48, 80)
    runner = TorchRunner(model, "fp32", device="cpu")
    with pytest.raises(RuntimeError, match="activate"):
        runner.infer(x)
    with runner:
        ref = runner.infer(x)
        assert runner.is_active
    assert not runner.is_active
    with torch.inference_mode():
        torch.testing.assert_close(ref, model(x))
    for precision in ("bf16", "fp16"):
        with TorchRunner(model, precision, device="cpu") as r:
            y = r.infer(x.numpy())  # arrays in, float32 tensors out
        assert y.dtype == torch.float32 and y.shape == x.shape
        p = nc.psnr(y.clamp(0, 1), ref.clamp(0, 1)).item()
        assert 25 < p < 100, (precision, p)  # lower precision: close, but not identical
    assert next(model.parameters()).dtype == torch.float32  # the runner worked on a copy


def test_torch_runner_on_cpu_keeps_freed_memory_for_the_next_tensors():
    """TorchRunner(reuse_memory=True), the default: eager inference on CPU reuses heap memory instead of fresh
    zeroed mappings for every large activation (2x faster at 720p); reuse_memory=False leaves glibc as it is."""
    from tests.helpers import mmapped_bytes_of_a_64mb_tensor

    setup = "import nafnet_core as nc; from runtime.runners import TorchRunner; " \
            "TorchRunner(nc.create_model('tiny'), device='cpu', reuse_memory={}).activate()"
    assert mmapped_bytes_of_a_64mb_tensor(setup.format(True)) < 64 * 2**20
    assert mmapped_bytes_of_a_64mb_tensor(setup.format(False)) >= 64 * 2**20


def test_onnxruntime_dynamic_matches_torch(tiny_tlc, tiny_onnx):
    _, model = tiny_tlc
    with OnnxRuntimeRunner(tiny_onnx["dynamic"], device="cpu") as r:
        assert r.fixed_shape is None
        for h, w in [(64, 64), (96, 160)]:  # TLC windows clamp at the smaller size, not the larger
            x = photo(h, w)
            with torch.inference_mode():
                torch.testing.assert_close(r.infer(x), model(x), atol=2e-5, rtol=0)


def test_wide_1x1_convs_run_as_matmul_on_the_cpu_provider(tiny_onnx, monkeypatch):
    """``runtime.ort_rewrite``: every plain 1x1 conv at or above the channel threshold becomes a MatMul (depthwise,
    3x3, strided convs stay), the graph stays valid, and the outputs equal the conv graph's, fixed and dynamic."""
    import onnx

    import runtime.ort_rewrite as rw

    for kind in ("tile", "dynamic"):
        model = onnx.load(str(tiny_onnx[kind]))
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        weights = {t.name: t.dims for t in model.graph.initializer}
        pointwise = [n for n in convs if list(weights[n.input[1]][2:]) == [1, 1]
                     and all(a.i == 1 for a in n.attribute if a.name == "group")]
        out, n = rw.conv1x1_as_matmul(model, min_channels=1, min_output=1)
        assert n == len(pointwise) > 0 and sum(x.op_type == "Conv" for x in out.graph.node) == len(convs) - n
        onnx.checker.check_model(out)
        assert rw.conv1x1_as_matmul(model)[1] == 0  # tiny's convs are far below MIN_CHANNELS
        # A fixed tile's maps have known sizes: none of this one's reaches a threshold above the tile's pixels
        # times the widest conv's channels; a dynamic graph's sizes are open and count as large.
        expected = 0 if kind == "tile" else n
        assert rw.conv1x1_as_matmul(model, min_channels=1, min_output=TILE * TILE * 256 + 1)[1] == expected
    monkeypatch.setattr(rw, "MIN_CHANNELS", 1)
    monkeypatch.setattr(rw, "MIN_OUTPUT", 1)
    for kind, sizes in (("tile", [(TILE, TILE)]), ("dynamic", [(64, 64), (48, 80)])):
        with OnnxRuntimeRunner(tiny_onnx[kind], device="cpu") as mm, \
                OnnxRuntimeRunner(tiny_onnx[kind], device="cpu", conv_matmul=False) as conv:
            assert mm.rewritten_convs > 0 and conv.rewritten_convs == 0  # on by default on the CPU provider
            for h, w in sizes:
                x = torch.cat([photo(h, w), photo(h, w).flip(-1)])  # batch 2: the MatMul broadcasts over it
                torch.testing.assert_close(mm.infer(x), conv.infer(x), atol=1e-5, rtol=0)


def test_onnxruntime_fixed_tile_graph_is_always_tiled(tiny_tlc, tiny_tile_onnx):
    _, model = tiny_tlc
    x = photo(100, 150)
    with OnnxRuntimeRunner(tiny_tile_onnx, device="cpu") as r:
        assert r.fixed_shape == (TILE, TILE)
        with pytest.raises(ValueError, match="tiling"):
            r.infer(photo(96, 96))
        y = restore(r, x, overlap=16)
    with torch.inference_mode():
        ref = restore(TorchRunner(model, device="cpu").activate(), x, tile=TILE, overlap=16)
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=0)  # same tiles, same blend, another backend


def test_onnxruntime_picks_cpu_provider_without_gpu():
    if cuda_device_count():
        pytest.skip("a CUDA GPU is present")
    assert ort_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(RunnerError, match="CUDA"):
        ort_providers("cuda")


def test_tensorrt_missing_is_one_clear_error(tmp_path):
    ok, why = tensorrt_available()
    if ok:
        pytest.skip("TensorRT and a GPU are present")
    assert "TensorRT" in why or "CUDA" in why
    runner = TensorRTRunner(tmp_path / "model.engine")
    with pytest.raises(RunnerError, match="TensorRT|CUDA"):
        runner.activate()


@pytest.mark.trt
@pytest.mark.gpu
def test_tensorrt_engine_runs(tmp_path, tiny_checkpoint, tiny_tlc):
    """The runner of the export's TensorRT engine (fixed tile, FP16 inside, FP32 out): tiled like the onnxruntime
    tile graph, within the FP16 parity limit of PyTorch fp32 on the same tiles."""
    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(f"needs TensorRT and a GPU: {why}")
    from export import export_model

    export = tmp_path / "export"
    export_model(tiny_checkpoint, export, tiles=[(TILE, TILE)], dynamic=False, trt=True, check=False)
    runner = open_runner(export, "trt")
    assert isinstance(runner, TensorRTRunner) and runner.precision == "fp16"
    x = photo(100, 150)
    with runner:
        assert runner.fixed_shape == (TILE, TILE)
        y = restore(runner, x, overlap=16)
    with torch.inference_mode():
        ref = restore(TorchRunner(tiny_tlc[1], device="cpu").activate(), x, tile=TILE, overlap=16)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert nc.psnr(y.clamp(0, 1), ref.clamp(0, 1), data_range=1.0).item() > 45


def test_open_runner_from_export_dir(tiny_export):
    auto = open_runner(tiny_export)  # no TensorRT here: onnxruntime, fp32, the dynamic graph
    assert isinstance(auto, OnnxRuntimeRunner) and auto.precision == "fp32" and auto.fixed_shape is None
    tiled = open_runner(tiny_export, "onnxrt", "fp16", tiled_graph=True)
    assert tiled.precision == "fp16" and tiled.fixed_shape == (TILE, TILE)
    assert isinstance(open_runner(tiny_export, "torch"), TorchRunner)  # from the manifest's source checkpoint
    with pytest.raises(RunnerError, match="trt"):
        open_runner(tiny_export, "trt")


def test_auto_picks_the_fastest_measured_backend_that_passed_parity(tiny_export, tmp_path):
    import json
    import shutil

    from runtime.models import BENCH_RECORD, PARITY_RECORD, auto_order, machine_id
    from runtime.runners import OpenVINORunner

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    order, note = auto_order(export)
    assert [b for b, _ in order] == ["trt", "onnxrt", "torch"] and "no bench.json" in note

    def row(backend, precision, ms, status="ok", size="64x96"):
        return {"backend": backend, "precision": precision, "mode": "whole", "size": size, "median_ms": ms,
                "status": status}

    rows = [row("torch", "fp32", 90.0), row("onnxrt", "fp32", 30.0), row("openvino", "fp32", 20.0),
            row("openvino", "bf16", 5.0, status="skipped: no BF16 here"), row("onnxrt", "fp32", 1.0, size="8x8")]
    bench = {"size": "64x96", "machine": machine_id(), "rows": rows}
    (export / BENCH_RECORD).write_text(json.dumps(bench))
    order, note = auto_order(export)
    assert order[:3] == [("openvino", "fp32"), ("onnxrt", "fp32"), ("torch", "fp32")] and "by measurement" in note
    assert order[3][0] == "trt"  # not timed in the record: after the measured ones
    assert isinstance(open_runner(export), OpenVINORunner)  # what auto picks, and why it says so
    assert "by measurement" in open_runner(export).auto_note
    # a backend that failed parity is passed over
    (export / PARITY_RECORD).write_text(json.dumps({"rows": [
        {"backend": "openvino", "precision": "fp32", "pass": False},
        {"backend": "trt", "precision": "fp16", "pass": False},
    ]}))
    assert "trt" not in [b for b, _ in auto_order(export)[0]]  # untimed, but failed parity at its default fp16
    runner = open_runner(export)
    assert isinstance(runner, OnnxRuntimeRunner) and "parity.json failed" in runner.auto_note
    assert [o for o, _ in auto_order(export, "fp32")[0]][:2] == ["onnxrt", "torch"]
    # a record from another machine (or an unreadable one) is not a measurement of this one
    (export / BENCH_RECORD).write_text(json.dumps({**bench, "machine": {**machine_id(), "cores": 999}}))
    assert "another machine" in auto_order(export)[1]
    (export / BENCH_RECORD).write_text("{not json")
    assert "unreadable" in auto_order(export)[1] and isinstance(open_runner(export), OnnxRuntimeRunner)


def test_open_runner_dispatch(tiny_checkpoint, tiny_onnx):
    assert isinstance(open_runner(tiny_checkpoint), TorchRunner)
    assert isinstance(open_runner(tiny_onnx["dynamic"]), OnnxRuntimeRunner)
    with pytest.raises(nc.UserError, match="export"):
        open_runner(tiny_checkpoint, backend="onnxrt")
    with pytest.raises(nc.UserError, match="no such"):
        open_runner(tiny_checkpoint.parent / "missing.pt")
    with pytest.raises(nc.UserError, match="fp16"):
        TorchRunner(torch.nn.Identity(), "int8")
    # the checkpoint's TLC training size is honoured: same output as the TLC model of the fixture
    x = photo(96, 128)
    with open_runner(tiny_checkpoint, device="cpu") as a, OnnxRuntimeRunner(tiny_onnx["dynamic"]) as b:
        np.testing.assert_allclose(a.infer(x).numpy(), b.infer(x).numpy(), atol=2e-5)


def test_onnxruntime_cuda_provider_turns_tf32_off(monkeypatch):
    """With a GPU, the CUDA EP is asked for with TF32 off: the FP32 islands' MatMuls must stay FP32."""
    import onnxruntime as ort

    import runtime.runners as runners

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runners, "cuda_device_count", lambda: 1)
    assert ort_providers("auto") == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert ort_providers("cpu") == ["CPUExecutionProvider"]
