"""input_fft='fs': the frequency-selection image concatenated to the input (docs/DESIGN.md §16 (The input FFT)).

References are written here from the definition with torch.fft in float64, independent of nafnet_core.dft.
"""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from test_model import reference_nafnet

import nafnet_core as nc
from nafnet_core import dft
from nafnet_core.config import ModelConfig, get_config
from tests.helpers import make_nontrivial, photo


def reference_fs(x: torch.Tensor) -> torch.Tensor:
    """irfft2(relu(Re F) + i relu(Im F), s=(H, W)), F = rfft2(x), in float64."""
    spec = torch.fft.rfft2(x.double(), norm="backward")
    return torch.fft.irfft2(torch.complex(spec.real.clamp(min=0), spec.imag.clamp(min=0)), s=x.shape[-2:],
                            norm="backward")


def reference_fs_nafnet(sd, cfg, x):
    """A functional NAFNet whose intro reads [x, fs(x)] of the zero-padded image; residual on the image."""
    return reference_nafnet(sd, cfg, x, extra_input=lambda padded: reference_fs(padded).float())


# --- parameter counts, from the architecture's formula -------------------------------------------------------

def nafnet_parameters(cfg: ModelConfig) -> int:
    """NAFNet's parameter count from docs/DESIGN.md §3 (The model), any input_fft."""
    def block(c):
        dw, ffn = c * cfg.dw_expand, c * cfg.ffn_expand
        return ((c * dw + dw) + (dw * 9 + dw) + (dw // 2 * c + c) + (dw // 2 * dw // 2 + dw // 2)
                + (c * ffn + ffn) + (ffn // 2 * c + c) + 4 * c + 2 * c)

    in_ch = cfg.img_channel * (2 if cfg.input_fft == "fs" else 1)
    c = cfg.width
    total = in_ch * c * 9 + c + c * cfg.img_channel * 9 + cfg.img_channel  # intro, ending
    for n in cfg.enc_blk_nums:
        total += n * block(c) + (c * 2 * c * 4 + 2 * c)  # blocks, down conv 2x2 stride 2
        c *= 2
    total += cfg.middle_blk_num * block(c)
    for n in cfg.dec_blk_nums:
        total += c * 2 * c  # up conv 1x1, no bias
        c //= 2
        total += n * block(c)
    return total


@pytest.mark.parametrize("preset", ["seed-v3", "tiny", "seed-v3-fft", "tiny-fft"])
def test_parameter_counts_follow_the_formula(preset):
    cfg = get_config(preset)
    with torch.device("meta"):
        model = nc.NAFNet(cfg)
    assert nc.count_parameters(model) == nafnet_parameters(cfg) == nc.PRESET_PARAMS.get(preset, 290_715)
    if cfg.input_fft == "fs":
        assert model.intro.in_channels == 6 and model.ending.out_channels == 3
        base = get_config(preset, input_fft="none")
        assert nafnet_parameters(cfg) - nafnet_parameters(base) == 3 * cfg.width * 9


def test_info_prints_the_fs_presets():
    from cli import main

    for preset, count in (("seed-v3-fft", nafnet_parameters(get_config("seed-v3-fft"))),
                          ("tiny-fft", nafnet_parameters(get_config("tiny-fft")))):
        out = CliRunner().invoke(main, ["info", preset])
        assert out.exit_code == 0, out.output
        assert f"{count:,}" in out.output and "input_fft=fs" in out.output


def test_config_key_defaults_and_is_checked():
    old = get_config("tiny").to_dict()
    del old["input_fft"]  # a checkpoint config written before the key existed
    assert ModelConfig.from_dict(old).input_fft == "none"
    with pytest.raises(ValueError, match="input_fft"):
        get_config("tiny", input_fft="fft")


# --- the frequency-selection image ---------------------------------------------------------------------------

@pytest.mark.parametrize("matrices", [False, True])
@pytest.mark.parametrize("h,w", [(1, 1), (1, 8), (7, 1), (13, 17), (37, 53), (64, 96)])
def test_frequency_selection_matches_the_definition(h, w, matrices):
    x = photo(max(h, 2), max(w, 2))[..., :h, :w].repeat(2, 1, 1, 1)
    x[1] = x[1].flip(-1) * 0.5 + 0.25  # a second, different image in the batch
    with dft.matrix_form() if matrices else torch.no_grad():
        out = dft.frequency_selection(x)
    ref = reference_fs(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert (out.double() - ref).abs().max().item() <= 1e-5
    # the selection does something: it is neither the image nor zero
    if h * w > 1:
        assert (ref - x.double()).abs().max().item() > 0.05


def test_eager_and_matrix_forms_agree_and_half_is_an_fp32_island():
    x = photo(48, 80)
    with dft.matrix_form():
        assert dft.uses_matrices()
        m = dft.frequency_selection(x)
    assert not dft.uses_matrices()
    assert (dft.frequency_selection(x) - m).abs().max().item() <= 2e-6
    # a half input: computed in FP32 (the spectrum's DC term is the image sum, 3840 here; sums of squares of
    # such terms leave FP16) and rounded once to half at the end
    xh = x.half()
    out = dft.frequency_selection(xh)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, dft.frequency_selection(xh.float()).half(), atol=0, rtol=0)


# --- the model ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("matrices", [False, True])
@pytest.mark.parametrize("hw", [(37, 53), (64, 48)])
def test_fs_model_matches_functional_reference(hw, matrices):
    torch.manual_seed(2)
    model = make_nontrivial(nc.create_model("tiny-fft", gate="swiglu", enc_blk_nums=[1, 2, 1, 1]))
    x = photo(*hw, index=1)
    with torch.no_grad(), dft.matrix_form() if matrices else torch.no_grad():
        out = model(x)
    with torch.no_grad():
        ref = reference_fs_nafnet(model.state_dict(), model.config, x)
        # the fs channels matter: without them (intro's last 3 input channels zeroed) the output changes
        blind = nc.NAFNet(model.config)
        blind.load_state_dict(model.state_dict())
        blind.intro.weight[:, 3:] = 0
        without = blind(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out - without).abs().max() > 1e-2


def test_spectrum_is_of_the_padded_image():
    # The runtime pads to 16 before calling the model; the model computes fs on its padded input, so the
    # model's own output equals the runtime path's (pad -> model -> crop) exactly.
    torch.manual_seed(3)
    model = make_nontrivial(nc.create_model("tiny-fft"))
    x = photo(37, 53, index=2)
    with torch.no_grad():
        direct = model(x)
        padded = model(F.pad(x, (0, 64 - 53, 0, 48 - 37)))[..., :37, :53]
        # and it is not the spectrum of the unpadded image (that would be another model)
        unpadded = torch.cat([x, reference_fs(x).float()], 1)
        assert (F.pad(unpadded, (0, 11, 0, 11)) - model.intro_input(model.pad_input(x))).abs().max() > 1e-2
    torch.testing.assert_close(direct, padded, atol=0, rtol=0)


def test_half_model_keeps_the_spectrum_in_fp32():
    torch.manual_seed(4)
    model = make_nontrivial(nc.create_model("tiny-fft"))
    x = photo(64, 64)
    with torch.no_grad():
        ref = model(x)
        out = model.half()(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert nc.psnr(out.clamp(0, 1), ref.clamp(0, 1), data_range=1.0).item() > 40


def test_trains_a_few_steps_and_resumes_the_config(tmp_path, synth_root):
    from train.config import build_config
    from train.loop import train

    cfg = build_config("tiny", sets={"model": "tiny-fft", "steps": 2, "crop": 32, "batch": 2, "val_every": 2,
                                     "save_every": 2, "log_every": 1, "val_max": 1, "workers": 0})
    run = train(cfg, tmp_path / "run", progress=False, device="cpu").run_dir
    ckpt = nc.load_checkpoint(run / "best.pt")
    assert ckpt.config.input_fft == "fs" and ckpt.model.intro.in_channels == 6


# --- export: no DFT, no complex, FP32 island in FP16 graphs --------------------------------------------------

def test_check_no_dft_names_the_node_and_complex_tensors(tmp_path):
    from export.lint import check_no_dft

    class TorchFFT(torch.nn.Module):
        def forward(self, x):
            s = torch.fft.rfft2(x)
            return torch.fft.irfft2(torch.complex(s.real.relu(), s.imag.relu()), s=x.shape[-2:])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(TorchFFT(), (torch.rand(1, 3, 8, 8),), dynamo=True, verbose=False).model_proto
    problems = check_no_dft(proto)
    dft_nodes = [n.name for n in proto.graph.node if n.op_type == "DFT"]
    assert dft_nodes and all(any(f"DFT node {name}" in p for p in problems) for name in dft_nodes)
    # a complex graph input, built by hand
    inp = onnx.helper.make_tensor_value_info("z", onnx.TensorProto.COMPLEX64, [2])
    out = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.COMPLEX64, [2])
    g = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["z"], ["y"], name="id")], "g", [inp], [out])
    problems = check_no_dft(onnx.helper.make_model(g))
    assert any("input z is complex64" in p for p in problems) and any("output y" in p for p in problems)


@pytest.fixture(scope="module")
def fs_export(tmp_path_factory):
    """``tiny-fft`` exported fp32 + FP16 for a 64x64 tile and as the dynamic fp32 graph. The dynamic FP16 graph is
    left out to keep the suite's time (its FP16 placement is the tile's, checked here; its in-graph matrices are
    the dynamic fp32 graph's)."""
    from export import export_model

    torch.manual_seed(5)
    model = make_nontrivial(nc.create_model("tiny-fft"))
    out = tmp_path_factory.mktemp("fs_export")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tile = export_model(model, out / "tile", tiles=[(64, 64)], dynamic=False, fp16=True, check=True)
        dynamic = export_model(model, out / "dynamic", tiles=None, dynamic=True, fp16=False, check=True)
    return model, (tile, dynamic)


def test_export_fp32_fp16_dynamic_and_tile_lint_clean(fs_export):
    from export import graph
    from export.lint import check_no_dft, lint_path

    model, manifests = fs_export
    records = [(m, rec) for m in manifests for rec in m.artifacts.values()]
    assert sorted((r["precision"], r["shape"]["kind"]) for _, r in records) == [
        ("fp16", "tile"), ("fp32", "dynamic"), ("fp32", "tile")], records
    for manifest, rec in records:
        # onnxruntime vs PyTorch fp32 on a photo: fp32 exact to 1e-4, FP16 (computed in FP32 by ORT on CPU,
        # from FP16-rounded weights) within a few 1e-4
        limit = 1e-4 if rec["precision"] == "fp32" else 3e-3
        assert rec["check"]["max_abs_diff"] <= limit, rec["check"]
        proto = onnx.load(str(manifest.directory / rec["file"]))
        assert not check_no_dft(proto)
        counts = graph.op_counts(proto)
        assert counts["MatMul"] >= 8 and "DFT" not in counts
        if rec["shape"]["kind"] == "dynamic":  # matrices built in the graph from the input's size
            assert {"Cos", "Sin", "Mod"} <= set(counts)
        if rec["precision"] == "fp16":  # the transforms are FP32 islands (MatMul is an FP32 op of the lint)
            prec = graph.node_precisions(proto)
            assert prec["MatMul"].get("fp16", 0) == 0 and prec["Conv"]["fp16"] > 0
    findings = [f for m in manifests for f in lint_path(m.directory)]
    bad = [f for f in findings if not f.ok]
    assert not bad, bad
    assert sum(f.check == "no DFT op, no complex tensor" for f in findings) == 3


def test_dynamic_export_builds_the_matrices_for_any_size(fs_export):
    import onnxruntime as ort

    from export.api import prepare_model

    model, (_, manifest) = fs_export
    rec = manifest.artifacts["onnx-fp32-dynamic"]
    sess = ort.InferenceSession(str(manifest.directory / rec["file"]), providers=["CPUExecutionProvider"])
    deploy = prepare_model(model, train_size=manifest.data["tlc"]["train_size"])
    for hw in ((37, 53), (80, 112)):
        x = photo(*hw, index=3)
        with torch.no_grad():
            ref = deploy(x)
        out = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
        assert (out - ref).abs().max().item() <= 1e-4


def test_official_file_of_the_wrong_input_names_the_preset(tmp_path):
    from nafnet_core.checkpoint import infer_config

    model = nc.create_model("tiny-fft")
    nc.save_official(tmp_path / "fs.pth", model)
    assert nc.load_checkpoint(tmp_path / "fs.pth", preset="tiny-fft").config.input_fft == "fs"
    with pytest.raises(nc.CheckpointError, match="tiny-fft") as e:
        nc.load_checkpoint(tmp_path / "fs.pth", preset="tiny")
    assert str(tmp_path / "fs.pth") in str(e.value) and "\n" not in str(e.value)
    custom = nc.create_model("tiny-fft", width=6).state_dict()
    assert infer_config(custom) == get_config("tiny-fft", width=6)


def test_tiler_runs_fs_models_whole_and_warns_about_tiles(tmp_path):
    from runtime.models import open_runner
    from runtime.restore import AUTO_WHOLE_MAX_PIXELS, TilingWarning, choose_tiling
    from runtime.runners import TorchRunner

    fs, plain = TorchRunner(nc.create_model("tiny-fft")), TorchRunner(nc.create_model("tiny"))
    assert fs.whole_image_input and not plain.whole_image_input
    big = (1088, 1920)  # above AUTO_WHOLE_MAX_PIXELS: a plain model is tiled, an fs model runs whole
    assert big[0] * big[1] > AUTO_WHOLE_MAX_PIXELS
    assert choose_tiling(plain, *big) is not None and choose_tiling(fs, *big) is None
    with pytest.warns(TilingWarning, match="input_fft=fs"):
        assert choose_tiling(fs, *big, tile=512) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choose_tiling(fs, 256, 256, tile=512)  # one tile holds the image: nothing changes, no warning
        choose_tiling(plain, *big, tile=512)
    # a checkpoint opened through the runtime knows it too
    nc.save_checkpoint(tmp_path / "fs.pt", nc.create_model("tiny-fft"), train_size=64)
    assert open_runner(tmp_path / "fs.pt", backend="torch").whole_image_input


def test_exported_fs_graphs_tell_the_runtime(fs_export):
    from runtime.models import open_runner

    _, (tile, dynamic) = fs_export
    assert open_runner(dynamic.directory, backend="onnxrt").whole_image_input
    assert open_runner(tile.directory, backend="onnxrt", tiled_graph=True).whole_image_input
    lone = tile.artifacts["onnx-fp32-64x64"]
    assert open_runner(tile.directory / lone["file"]).whole_image_input


def test_parity_of_the_fs_exports(fs_export, synth_root, tmp_path):
    """`parity` on both fs exports: the dynamic graph's whole-image rows pass the limits; tiled rows (the
    64x64 graph on 192x256 images) are checked against the tiled limit, and where they fall outside it they are
    reported with no verdict and the reason (the input FFT spans the whole image), not as a pass."""
    from runtime.parity import WHOLE_INPUT_TILED_NOTE, check_parity

    model, (tile, dynamic) = fs_export
    ckpt = nc.save_checkpoint(tmp_path / "fs.pt", model, train_size=dynamic.data["tlc"]["train_size"])
    report = check_parity(dynamic.directory, synth_root, checkpoint=ckpt, torch_precisions=(), progress=False,
                          limit=2)
    whole = next(r for r in report.rows if r.backend == "onnxrt" and r.mode == "whole")
    assert whole.passed and abs(whole.delta_psnr) <= 0.01, report.table()
    assert report.passed, report.table()
    report = check_parity(tile.directory, synth_root, checkpoint=ckpt, torch_precisions=(), progress=False, limit=2)
    tiled = [r for r in report.rows if r.mode.startswith("tiled") and r.psnr is not None]
    assert {r.backend for r in tiled} >= {"torch", "onnxrt"}
    for r in tiled:
        assert r.passed is True or (r.passed is None and r.status == WHOLE_INPUT_TILED_NOTE), r


def test_tiled_rows_of_whole_input_models_get_no_verdict_outside_the_limit():
    from runtime.parity import TILED_LIMIT, WHOLE_INPUT_TILED_NOTE, ParityRow, _Case, _finish

    class Stub:
        whole_image_input = True

    ref = _Case(ParityRow("torch", "fp32", "whole"), None, None, psnrs=[30.0], ssims=[0.9], vs_ref=[float("inf")])
    for whole_input, delta, expected in [(True, 0.01, True), (True, 0.5, None), (False, 0.5, False)]:
        runner = Stub()
        runner.whole_image_input = whole_input
        case = _Case(ParityRow("onnxrt", "fp32", "tiled 64x64"), runner, (64, 64), psnrs=[30.0 + delta],
                     ssims=[0.9], vs_ref=[50.0])
        row = _finish(case, 1, ref)
        assert row.passed is expected and (abs(row.delta_psnr) > TILED_LIMIT) == (delta > TILED_LIMIT)
        assert (row.status == WHOLE_INPUT_TILED_NOTE) == (expected is None)
