"""FP32 residual streams in the FP16 graph (export/fp16_stream.py) for a checkpoint that overflows FP16.

The checkpoint is the ``tiny`` preset with non-trivial weights whose level-0 stream is scaled by 6e4
(intro conv and the level-0 blocks' beta/gamma up, the convs that read the stream down): its stream
reaches ~1e5, past FP16's 65504, while the block convs and gates stay inside FP16's range. A plain
half model computes inf and then NaN; the export keeps encoders.0 and its mirrored decoder in FP32,
with the convs that write and read their streams.
"""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import nafnet_core as nc
from cli import main
from export import fp16_stream, graph
from export.api import prepare_model
from export.lint import lint_path
from nafnet_core.metrics import psnr
from tests.helpers import make_nontrivial, photo

SCALE = 6e4
TILE = (32, 48)
#: Max |FP16 - FP32| on outputs of order 1: FP16 keeps 11 significant bits (4.9e-4 relative per rounding);
#: measured here 5e-4 through the width-8 model. 5e-3 leaves 10x room and is still far below what a broken
#: stream gives (NaN, or errors of order 1).
TOLERANCE = 5e-3


def hot_model() -> nc.NAFNet:
    torch.manual_seed(0)
    m = make_nontrivial(nc.create_model("tiny"))
    with torch.no_grad():
        m.intro.weight.mul_(SCALE), m.intro.bias.mul_(SCALE)
        for b in [*m.encoders[0], *m.decoders[-1]]:
            b.beta.mul_(SCALE), b.gamma.mul_(SCALE)
        m.downs[0].weight.div_(SCALE)  # the next level sees normal values again
        m.ups[-1][0].weight.mul_(SCALE)  # the decoder's stream matches its skip's scale
        m.ending.weight.div_(SCALE)
    return m.eval()


def test_stage_plan_is_pure():
    assert (fp16_stream.stage_of("encoders.2.7") == "encoders.2"
            and fp16_stream.stage_of("middle_blks.3") == "middle_blks")
    limit = fp16_stream.FP16_MAX / fp16_stream.STREAM_MARGIN
    stream = {"encoders.0.0": limit * 1.01, "encoders.1.0": limit * 0.99, "middle_blks.0": 3 * limit}
    stages = fp16_stream.fp32_stream_stages(stream, levels=4)
    assert stages == ["encoders.0", "middle_blks", "decoders.3"]  # encoders.0's skip feeds decoders.3
    assert fp16_stream.fp32_convs(stages, 4) == ["intro", "downs.0", "downs.3", "ups.0.0", "ups.3.0", "ending"]
    assert fp16_stream.fp32_stream_stages({"decoders.1.0": limit * 2}, 4) == ["decoders.1"]
    assert fp16_stream.fp32_convs(["decoders.1"], 4) == ["ups.1.0", "ups.2.0"]
    assert fp16_stream.fp32_stream_stages({k: v / 2 for k, v in stream.items()}, 4) == ["middle_blks"]


@pytest.fixture(scope="module")
def hot_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("hot")
    ckpt = nc.save_checkpoint(d / "hot.pt", hot_model(), train_size=32)
    res = CliRunner().invoke(main, ["export", str(ckpt), "--tile", f"{TILE[0]}x{TILE[1]}", "--fp16", "--no-check",
                                    "--out", str(d / "exp")])
    assert res.exit_code == 0, res.output
    return d / "exp", res.output


def test_overflowing_stream_is_kept_fp32_and_matches(hot_export):
    out_dir, output = hot_export
    deploy = prepare_model(hot_model(), train_size=32)
    with torch.no_grad():
        plain = fp16_stream.to_half(deploy)(photo(*TILE, index=1)).float()  # = deploy.half()
    assert not torch.isfinite(plain).all()  # the plain half model overflows

    data = json.loads((out_dir / "manifest.json").read_text())
    rec = data["fp16"]
    assert (rec["fp32_stream"] == ["encoders.0", "decoders.3"]
            and rec["fp32_convs"] == ["intro", "downs.0", "ups.3.0", "ending"])
    assert rec["max_stream"] > fp16_stream.FP16_MAX and rec["gate_overflow"] == []
    [line] = [ln for ln in output.splitlines() if "residual stream" in ln]  # said once, in one line
    assert "encoders.0, decoders.3" in line and "FP32" in line

    half = fp16_stream.to_half(deploy, rec["fp32_stream"])  # what the FP16 graph computes, in PyTorch
    sess = ort.InferenceSession(str(out_dir / "model-fp16-32x48.onnx"), providers=["CPUExecutionProvider"])
    for x in (photo(*TILE, index=0), photo(*TILE, index=1), photo(64, 64, index=0)):
        with torch.no_grad():
            ref, emulated = deploy(x), half(x).float()
        outs = [emulated]
        if tuple(x.shape[-2:]) == TILE:
            outs.append(torch.from_numpy(sess.run(["output"], {"input": x.numpy()})[0]))
        for out in outs:
            assert torch.isfinite(out).all() and (out - ref).abs().max().item() < TOLERANCE
        assert psnr(emulated.clamp(0, 1), ref.clamp(0, 1), data_range=1.0).item() > 60


def test_lint_accepts_the_fp32_stream_readers(hot_export):
    out_dir, _ = hot_export
    findings = {(f.file, f.check): f for f in lint_path(out_dir, run=False)}
    placement = findings[("model-fp16-32x48.onnx", "FP16 placement")]
    assert placement.ok, placement.detail
    assert "intro/downs.0/ups.3.0/ending" in placement.detail
    model = onnx.load(str(out_dir / "model-fp16-32x48.onnx"))
    assert graph.fp16_placement_problems(model, 4) == []
    assert len(graph.fp16_placement_problems(model, 0)) == 4  # undeclared FP32 convs are still caught
    assert (graph.fp16_placement_problems(model, 5)[-1]
            == "5 FP32 convs (around an FP32 residual stream or in FP32 islands) expected, 4 found")


def test_torch_fp16_runner_keeps_the_overflowing_stream_fp32():
    """``--backend torch --precision fp16`` (parity's torch-fp16 row) runs the same placement as the export."""
    from runtime.runners import TorchRunner

    model = hot_model()
    x = photo(*TILE, index=1)
    with torch.no_grad():
        ref = model(x)
    with TorchRunner(model, precision="fp16", device="cpu") as runner:
        out = runner.infer(x)
    assert torch.isfinite(out).all() and (out - ref).abs().max().item() < TOLERANCE
