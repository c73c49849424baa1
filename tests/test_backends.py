"""The backend table (runtime/backends.py) and the model's padding multiple as the runtime reads it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import nafnet_core as nc
from nafnet_core.config import DEFAULT_PAD_MULTIPLE, pad_multiple_of, padded_size
from nafnet_core.errors import UserError
from runtime.backends import AUTO_ORDER, BACKEND_CHOICES, BACKENDS, Artifact, OpenOptions, file_backend
from runtime.restore import choose_tiling, restore
from runtime.runners import OnnxRuntimeRunner, OpenVINORunner, RunnerError, TensorRTRunner, TorchRunner


def test_every_backend_is_one_record_with_its_runner_and_precisions():
    assert BACKEND_CHOICES == ("auto", "torch", "onnxrt", "openvino", "trt")
    assert {n: b.runner for n, b in BACKENDS.items()} == {"torch": TorchRunner, "onnxrt": OnnxRuntimeRunner,
                                                          "openvino": OpenVINORunner, "trt": TensorRTRunner}
    assert BACKENDS["trt"].precisions == ("fp16", "int8") and BACKENDS["torch"].default_precision == "fp32"
    assert BACKENDS["onnxrt"].precisions == ("fp32", "fp16", "int8")
    assert all(b.runner.backend == n for n, b in BACKENDS.items())
    assert AUTO_ORDER == ("trt", "onnxrt", "torch")  # OpenVINO: by measurement or by name only


@pytest.mark.parametrize(("name", "backend", "expected"), [
    ("m.onnx", "auto", "onnxrt"), ("m.xml", "auto", "openvino"), ("m.onnx", "openvino", "openvino"),
    ("m.engine", "auto", "trt"), ("m.plan", "trt", "trt"), ("m.pt", "auto", "torch"), ("m.pth", "torch", "torch"),
    ("m.safetensors", "auto", "torch")])
def test_a_lone_file_goes_to_the_backend_of_its_suffix(name: str, backend: str, expected: str):
    assert file_backend(Path(name), backend).name == expected


@pytest.mark.parametrize(("name", "backend", "needs"), [
    ("m.onnx", "torch", "a checkpoint"), ("m.pt", "onnxrt", "an .onnx file"), ("m.onnx", "trt", "a TensorRT engine"),
    ("m.engine", "openvino", "an .onnx file or OpenVINO IR")])
def test_a_backend_that_cannot_open_a_file_says_what_it_needs(name: str, backend: str, needs: str):
    with pytest.raises(UserError, match=re.escape(f"{name}: --backend {backend} needs {needs}")):
        file_backend(Path(name), backend)


def test_unknown_backend_names_the_choices(tmp_path):
    from runtime.models import open_runner

    with pytest.raises(UserError, match="unknown backend 'cuda'; choose one of auto, torch, onnxrt"):
        open_runner(tmp_path, "cuda")


def test_a_runner_refuses_a_precision_its_record_does_not_list():
    with pytest.raises(RunnerError, match="backend trt cannot run fp32; choose one of fp16"):
        TensorRTRunner("x.engine", "fp32")


def test_probes_say_why_a_backend_cannot_run_here():
    ok, why = BACKENDS["trt"].probe(None)
    if not ok:
        assert "TensorRT" in why or "CUDA" in why
    assert BACKENDS["torch"].probe("bf16") == (True, "")


def test_pick_prefers_fp32_and_the_dynamic_graph_unless_tiles_are_wanted(tmp_path):
    arts = [Artifact("onnxrt", "fp16", tmp_path / "a", None, "onnx-fp16-dynamic"),
            Artifact("onnxrt", "fp32", tmp_path / "b", (64, 64), "onnx-fp32-64x64"),
            Artifact("onnxrt", "fp32", tmp_path / "c", None, "onnx-fp32-dynamic")]
    pick = BACKENDS["onnxrt"].pick
    assert pick(arts, (None, ""), None, None)[0].key == "onnx-fp32-dynamic"
    assert pick(arts, (None, ""), None, True)[0].key == "onnx-fp32-64x64"
    assert pick(arts, (None, ""), "fp16", None)[0].key == "onnx-fp16-dynamic"
    assert pick([], (None, ""), None, None) == (None, "no matching ONNX graph in the export")
    assert BACKENDS["torch"].pick(arts, (None, "source checkpoint x.pt not found"), None, None) == \
        (None, "source checkpoint x.pt not found")
    ov = BACKENDS["openvino"]
    assert [(p, a.key) for p, a in ov.rows(arts)] == [("fp32", "onnx-fp32-dynamic"), ("fp32", "onnx-fp32-64x64"),
                                                      ("bf16", "onnx-fp32-dynamic"), ("bf16", "onnx-fp32-64x64")]


def test_the_padding_multiple_comes_from_the_model():
    assert DEFAULT_PAD_MULTIPLE == nc.get_config("nafnet-gopro-width32").pad_multiple == 16
    assert pad_multiple_of({"enc_blk_nums": [1, 1, 1]}) == 8 and pad_multiple_of(None) == 16
    assert padded_size(37, 8) == 40 and padded_size(37) == 48


def test_a_three_level_model_runs_tiles_of_its_own_multiple():
    """Tiles of 40 px are valid for a model that pads to 8 (not to 16), and tiled equals whole for a
    pointwise-exact check: the runner's multiple reaches the tiling."""
    torch.manual_seed(0)
    model = nc.create_model("tiny", enc_blk_nums=(1, 1, 1), dec_blk_nums=(1, 1, 1)).eval()
    runner = TorchRunner(model, "fp32", device="cpu")
    assert runner.pad_multiple == 8
    spec = choose_tiling(runner, 70, 90, (40, 40), overlap=8)
    assert spec.tile == (40, 40) and spec.multiple == 8
    x = torch.rand(1, 3, 70, 90)
    with runner:
        y = restore(runner, x, (40, 40), overlap=8)
        assert y.shape == x.shape and torch.isfinite(y).all()
    with pytest.raises(UserError, match="multiples of 16"):
        choose_tiling(TorchRunner(nc.create_model("tiny"), "fp32", device="cpu"), 70, 90, (40, 40))


def test_open_options_default_to_library_use():
    o = OpenOptions()
    assert o.reuse_memory is False and o.verify is True and o.tlc is True
