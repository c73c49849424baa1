"""OpenVINO backend: runner parity with onnxruntime, the IR in the manifest, BF16 islands, bad input.

Needs the openvino extra (in the test extra); without it the tests that run OpenVINO skip with the reason.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from click.testing import CliRunner

from cli import main
from export.openvino_ir import OpenVINOUnavailable, island_layers, openvino_available
from tests.helpers import TILE, photo

HAVE_OV, WHY_NOT = openvino_available()
needs_ov = pytest.mark.skipif(not HAVE_OV, reason=f"openvino is not installed ({WHY_NOT})")


@pytest.fixture(scope="module")
def ov_export(tiny_export, tmp_path_factory):
    """A copy of the tiny export with OpenVINO IRs for both shapes, written by the exporter's own step."""
    from export.api import _write_openvino
    from export.manifest import load_manifest, write_manifest
    from export.shapes import ShapeSpec

    d = tmp_path_factory.mktemp("ov") / "export"
    shutil.copytree(tiny_export, d)
    data = load_manifest(d).data
    _write_openvino(data, d, [ShapeSpec.dynamic(), ShapeSpec.tile(TILE, TILE, 1)], progress=False)
    write_manifest(d, data)
    return d


def test_island_rule_on_a_hand_graph():
    # Parameter -> Pad -> Conv -> MatMul(mean) -> Subtract -> Multiply -> Conv -> Add(stream) ; Add(Pad, Conv) global
    layers = {"in": ("Parameter", True), "pad": ("Pad", True), "c1": ("Convolution", True), "mm": ("MatMul", True),
              "sub": ("Subtract", True), "mul": ("Multiply", True), "c2": ("Convolution", True),
              "stream": ("Add", True), "shape": ("ShapeOf", False), "glob": ("Add", True)}
    inputs = {"pad": ["in"], "c1": ["pad"], "mm": ["c1"], "sub": ["c1", "mm"], "mul": ["sub", "sub"], "c2": ["mul"],
              "stream": ["c1", "c2"], "glob": ["pad", "stream"]}
    assert island_layers(layers, inputs) == {"in", "pad", "mm", "sub", "mul", "glob"}


@needs_ov
def test_runner_matches_onnxruntime_fixed_and_dynamic(tiny_onnx):
    from runtime.restore import restore
    from runtime.runners import OnnxRuntimeRunner, OpenVINORunner

    x = photo(72, 100)  # not a multiple of the tile: the fixed graph runs through tiling
    for kind in ("dynamic", "tile"):
        with OpenVINORunner(tiny_onnx[kind]) as ov_r, OnnxRuntimeRunner(tiny_onnx[kind], device="cpu") as ort_r:
            assert ov_r.fixed_shape == (None if kind == "dynamic" else (TILE, TILE))
            a, b = restore(ov_r, x, "auto"), restore(ort_r, x, "auto")
            assert a.shape == x.shape and (a - b).abs().max().item() < 1e-4
            assert (a - x).abs().max().item() > 1e-2  # the model does something
    with OpenVINORunner(tiny_onnx["dynamic"], shapes_kept=1) as r:  # batch 2, another size, then back
        for shape in ((2, 3, 48, 80), (1, 3, 32, 32), (2, 3, 48, 80)):
            assert r.infer(torch.rand(shape)).shape == shape
        assert len(r._compiled) == 1


@needs_ov
def test_ir_in_manifest_and_lint(ov_export):
    from export.lint import lint_path
    from export.manifest import verify

    m = verify(ov_export)  # every artifact and file, the IR weights included
    rec = m.artifacts[f"openvino-fp32-{TILE}x{TILE}"]
    assert rec["runtime"] == "openvino" and rec["file"].endswith(".xml") and rec["openvino"]["fp32_islands"] > 0
    (weights,) = rec["companions"]
    assert m.data["files"][weights]["file"] == rec["file"].replace(".xml", ".bin")
    findings = [f for f in lint_path(ov_export, run=False) if "OpenVINO" in f.check]
    assert len(findings) == 4 and all(f.ok for f in findings), findings


@needs_ov
def test_island_check_fails_without_marks(tiny_onnx):
    import openvino as ov

    from export.openvino_ir import island_problems, read_marked

    core = ov.Core()
    assert island_problems(read_marked(core, tiny_onnx["dynamic"])) == []
    problems = island_problems(core.read_model(str(tiny_onnx["dynamic"])))  # the plain graph: nothing kept FP32
    assert any("CumSum" in p for p in problems) and any("MatMul" in p for p in problems)


@needs_ov
def test_infer_cli_openvino_equals_onnxrt(ov_export, tmp_path):
    from PIL import Image

    from nafnet_core.images import Decoded, write_image

    img = (photo(70, 90)[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    write_image(tmp_path / "in" / "a.png", Decoded(img))
    import numpy as np

    def run(backend: str, model) -> torch.Tensor:
        out = tmp_path / f"out-{backend}-{model.name}"
        res = CliRunner().invoke(main, ["infer", str(tmp_path / "in"), "-m", str(model), "--backend", backend,
                                        "--out", str(out), "-q"])
        assert res.exit_code == 0, res.output
        return torch.from_numpy(np.array(Image.open(out / "a.png"))).int()

    # the export directory (dynamic graphs, whole image), then the lone tile IR vs the tile ONNX (tiled)
    assert (run("openvino", ov_export) - run("onnxrt", ov_export)).abs().max() <= 1
    tile = f"model-fp32-{TILE}x{TILE}"
    assert (run("openvino", ov_export / f"{tile}.xml") - run("onnxrt", ov_export / f"{tile}.onnx")).abs().max() <= 1


@needs_ov
def test_bf16_says_why_it_cannot_run(ov_export):
    from export.openvino_ir import bf16_support
    from runtime.models import open_runner
    from runtime.runners import RunnerError

    ok, why = bf16_support()
    runner = open_runner(ov_export, "openvino", "bf16")
    if ok:  # a CPU with BF16: it runs, close to fp32 (the islands keep the statistics in FP32)
        x = photo(64, 64)
        with runner, open_runner(ov_export, "openvino", "fp32") as ref:
            assert (runner.infer(x) - ref.infer(x)).abs().max().item() < 0.05
        return
    assert "BF16" in why
    with pytest.raises(RunnerError, match="no BF16"):
        runner.activate()


@needs_ov
def test_parity_has_openvino_rows(ov_export, synth_root):
    from runtime.parity import check_parity

    report = check_parity(ov_export, synth_root, torch_precisions=(), progress=False, limit=1)
    rows = {(r.backend, r.precision, r.mode): r for r in report.rows}
    fp32 = rows[("openvino", "fp32", "whole")]
    assert fp32.passed and abs(fp32.delta_psnr) <= 0.01 and fp32.psnr_vs_reference > 60
    assert rows[("openvino", "fp32", f"tiled {TILE}x{TILE}")].passed
    bf16 = rows[("openvino", "bf16", "whole")]
    from export.openvino_ir import bf16_support

    if not bf16_support()[0]:
        assert bf16.passed is None and bf16.status.startswith("cannot run here") and "BF16" in bf16.status


@needs_ov
def test_modified_ir_weights_are_refused(ov_export, tmp_path):
    from export.manifest import ManifestError
    from runtime.models import open_runner
    from runtime.runners import RunnerError

    d = tmp_path / "e"
    shutil.copytree(ov_export, d)
    bin_path = d / f"model-fp32-{TILE}x{TILE}.bin"
    data = bytearray(bin_path.read_bytes())
    data[100] ^= 0xFF
    bin_path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"\.bin: modified since export"):
        open_runner(d, "openvino", tiled_graph=True)
    with pytest.raises(ManifestError, match=r"\.bin: modified since export"):
        open_runner(d / f"model-fp32-{TILE}x{TILE}.xml")
    xml = d / "model-fp32-dynamic.xml"
    xml.write_text(xml.read_text()[:5000])  # truncated IR, loaded anyway with --no-verify
    with pytest.raises(RunnerError, match="OpenVINO cannot read this model") as e:
        open_runner(xml, verify=False).activate()
    assert "\n" not in str(e.value)


def test_missing_openvino_is_one_line(monkeypatch, tiny_tile_onnx, tiny_checkpoint, tmp_path):
    from runtime.models import open_runner

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(OpenVINOUnavailable, match=r'pip install -e "\.\[openvino\]"'):
        open_runner(tiny_tile_onnx, "openvino").activate()
    res = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "--tile", "64x64", "--openvino", "--no-check",
                                    "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "pip install" in res.output
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())  # nothing written


@needs_ov
def test_manifest_json_lists_ir_hashes(ov_export):
    data = json.loads((ov_export / "manifest.json").read_text())
    ir = [k for k, r in data["artifacts"].items() if r["runtime"] == "openvino"]
    assert set(ir) == {"openvino-fp32-dynamic", f"openvino-fp32-{TILE}x{TILE}"}
