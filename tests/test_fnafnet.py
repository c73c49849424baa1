"""FNAFNet (block='fnaf') against an independent reference written here from the published facts.

The reference uses ``torch.fft`` with complex tensors and explicit loops over windows; the model uses DFT
matrices and reshaped windows. Window facts: ws x ws windows from the top-left; when a side is not a multiple
of ws, an extra column (row) of windows aligned to the right (bottom) edge plus the corner window; each pixel
takes its value from the top-left grid where the grid covers it, else from the edge window. Non-zero
beta/gamma, norm affines and complex biases, sizes whose padded maps are not multiples of the windows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nafnet_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_official
from nafnet_core.config import PRESET_PARAMS, get_config
from nafnet_core.fnafnet import FNAFBlock, window_merge, window_partition
from nafnet_core.layers import GlobalAvgPool2d
from nafnet_core.model import NAFNet, count_parameters
from nafnet_core.tlc import LocalAvgPool2d, convert_to_tlc
from tests.helpers import assert_resume_is_exact, make_nontrivial, photo, short_cfg


def fnaf_model(seed: int = 0, preset: str = "tiny-fnaf", **overrides) -> NAFNet:
    """A model with every parameter that starts at zero randomised (beta, gamma, complex biases, norm affines)."""
    torch.manual_seed(seed)
    model = make_nontrivial(NAFNet(get_config(preset, **overrides)), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".b1_" in name or ".b2_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# The reference


def ref_layernorm(x, w, b):
    mu = x.mean(1, keepdim=True)
    var = ((x - mu) ** 2).mean(1, keepdim=True)
    return w.view(1, -1, 1, 1) * (x - mu) / torch.sqrt(var + 1e-6) + b.view(1, -1, 1, 1)


def ref_windowed(x, ws, fn):
    """Applies ``fn`` to every window (grid + edge windows) and writes each pixel from the window owning it."""
    n, c, H, W = x.shape
    if ws == 0:
        return fn(x)
    a, b = H // ws, W // ws
    # (window start, first row/column it owns): an edge window owns only what the grid leaves
    rows = [(i * ws, i * ws) for i in range(a)] + ([(H - ws, a * ws)] if H % ws else [])
    cols = [(j * ws, j * ws) for j in range(b)] + ([(W - ws, b * ws)] if W % ws else [])
    out = None
    for top, r0 in rows:
        for left, c0 in cols:
            y = fn(x[:, :, top:top + ws, left:left + ws])
            if out is None:
                out = torch.zeros(n, y.shape[1], H, W, dtype=y.dtype)
            out[:, :, r0:top + ws, c0:left + ws] = y[:, :, r0 - top:, c0 - left:]
    return out


def ref_fft_branch(sd, p, x, ws):
    def branch(win):
        h, w = win.shape[-2:]
        y = torch.fft.rfft2(win, norm="backward").permute(0, 2, 3, 1)  # (B, h, w//2+1, C) complex
        w1 = torch.complex(sd[p + "complex_weight1_real"], sd[p + "complex_weight1_imag"])
        w2 = torch.complex(sd[p + "complex_weight2_real"], sd[p + "complex_weight2_imag"])
        y = y @ w1 + torch.complex(sd[p + "b1_real"], sd[p + "b1_imag"])[0]
        y = torch.complex(F.gelu(y.real), F.gelu(y.imag))
        y = y @ w2 + torch.complex(sd[p + "b2_real"], sd[p + "b2_imag"])[0]
        return torch.fft.irfft2(y.permute(0, 3, 1, 2), s=(h, w), norm="backward")

    return ref_windowed(x, ws, branch)


def ref_block(sd, p, x, sca_ws, fft_ws):
    conv = lambda name, t, **kw: F.conv2d(t, sd[p + name + ".weight"], sd[p + name + ".bias"], **kw)  # noqa: E731
    t = ref_layernorm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    h = conv("conv2", conv("conv1", t), padding=1, groups=sd[p + "conv2.weight"].shape[0])
    a, b = h.chunk(2, 1)
    h = a * b
    h = ref_windowed(h, sca_ws, lambda win: win * conv("sca.1", win.mean((2, 3), keepdim=True)))
    h = conv("conv3", h)
    if fft_ws >= 0:
        h = h + torch.sin(ref_fft_branch(sd, p + "fft_block1.", t, fft_ws))
    y = x + h * sd[p + "beta"]
    u = ref_layernorm(y, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
    a, b = conv("conv4", u).chunk(2, 1)
    h = conv("conv5", a * b)
    if fft_ws >= 0:
        h = torch.sin(ref_fft_branch(sd, p + "fft_block2.", u, fft_ws)) + h
    return y + h * sd[p + "gamma"]


def ref_forward(model: NAFNet, x: torch.Tensor) -> torch.Tensor:
    cfg, sd = model.config, model.state_dict()
    levels = len(cfg.enc_blk_nums)
    # pad (zeros, right/bottom) to a multiple of 2**levels and to at least the largest window x its downscale
    least = max(w * 2 ** i for windows in (cfg.sca_windows, cfg.fft_windows) for i, w in enumerate(windows))
    H, W = x.shape[-2:]
    ph, pw = max(H, least), max(W, least)
    ph, pw = -(-ph // 2**levels) * 2**levels, -(-pw // 2**levels) * 2**levels
    xp = F.pad(x, (0, pw - W, 0, ph - H))
    t = F.conv2d(xp, sd["intro.weight"], sd["intro.bias"], padding=1)
    skips = []
    for i, n in enumerate(cfg.enc_blk_nums):
        for j in range(n):
            t = ref_block(sd, f"encoders.{i}.{j}.", t, cfg.sca_windows[i], cfg.fft_windows[i])
        skips.append(t)
        t = F.conv2d(t, sd[f"downs.{i}.weight"], sd[f"downs.{i}.bias"], stride=2)
    for j in range(cfg.middle_blk_num):
        t = ref_block(sd, f"middle_blks.{j}.", t, cfg.sca_windows[levels], cfg.fft_windows[levels])
    for i, n in enumerate(cfg.dec_blk_nums):
        level = levels - 1 - i
        t = F.pixel_shuffle(F.conv2d(t, sd[f"ups.{i}.0.weight"]), 2) + skips[level]
        for j in range(n):
            t = ref_block(sd, f"decoders.{i}.{j}.", t, cfg.sca_windows[level], cfg.fft_windows[level])
    out = F.conv2d(t, sd["ending.weight"], sd["ending.bias"], padding=1) + xp
    return out[:, :, :H, :W]


# ---------------------------------------------------------------------------------------------------------
# Tests


def test_presets_parameter_counts():
    for preset, count in (("fnafnet-gopro-width32", 17_805_411), ("fnafnet-gopro-width64", 68_021_443)):
        assert PRESET_PARAMS[preset] == count
        with torch.device("meta"):
            assert count_parameters(NAFNet(get_config(preset))) == count
    # 16 c^2 + 12 c per block with FFT branches, over NAFNet's count
    assert PRESET_PARAMS["fnafnet-gopro-width32"] - PRESET_PARAMS["nafnet-gopro-width32"] == \
        2 * sum(16 * c * c + 12 * c for c in (32, 64, 128))


@pytest.mark.parametrize("hw", [(50, 70), (64, 80), (7, 13), (1, 1)])
def test_forward_matches_reference(hw):
    model = fnaf_model()
    x = photo(*hw) if min(hw) > 4 else torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, ref = model(x), ref_forward(model, x)
    assert out.shape == x.shape
    assert (out - ref).abs().max().item() <= 1e-5
    assert (out - x).abs().max().item() > 0.05  # the blocks change the image: the check can fail


def test_every_branch_kind_is_built():
    model = fnaf_model()
    blocks = [m for m in model.modules() if isinstance(m, FNAFBlock)]
    assert {b.fft_window for b in blocks} == {24, 0, 6, -1, 3}
    assert all((b.fft_block1 is None) == (b.fft_window < 0) for b in blocks)
    assert model.decoders[0][0].sca_window == 3 and model.decoders[3][0].fft_window == 24  # decoders mirror


@pytest.mark.parametrize("hw", [(24, 24), (30, 50), (48, 36), (25, 24)])
def test_window_partition_merge_round_trip(hw):
    x = torch.randn(2, 3, *hw)
    t = window_partition(x, 12)
    assert t.shape[1:] == (3, 12, 12)
    assert torch.equal(window_merge(t, 2, hw, 12), x)
    # the merge takes grid windows where the grid covers a pixel: mark each window with its index
    marked = window_merge(torch.arange(t.shape[0], dtype=torch.float32).view(-1, 1, 1, 1).expand_as(t).contiguous(),
                          2, hw, 12)
    a, b = hw[0] // 12, hw[1] // 12
    assert marked[0, 0, :12, :12].unique().tolist() == [0.0]
    assert marked[1, 0, :12, :12].unique().tolist() == [float(a * b)]  # image 1's first grid window


def test_official_format_round_trip_loads_strictly(tmp_path):
    model = fnaf_model(3)
    path = save_official(tmp_path / "fnaf.pth", model)
    loaded = load_checkpoint(path, preset="tiny-fnaf").model
    x = photo(40, 56)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert any(k.endswith("fft_block1.complex_weight1_real") for k in torch.load(path, weights_only=True)["params"])


def test_wrong_variant_file_names_the_fitting_preset(tmp_path):
    torch.manual_seed(0)
    naf = save_official(tmp_path / "naf.pth", NAFNet(get_config("tiny")))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(naf, preset="fnafnet-gopro-width32")
    msg = str(e.value)
    assert "\n" not in msg and str(naf) in msg and "'tiny'" in msg
    fnaf = save_official(tmp_path / "fnaf.pth", fnaf_model())
    with pytest.raises(CheckpointError, match="'tiny-fnaf'"):
        load_checkpoint(fnaf, preset="tiny")


def test_project_checkpoint_round_trip(tmp_path):
    model = fnaf_model(5)
    path = save_checkpoint(tmp_path / "m.pt", model)
    loaded = load_checkpoint(path)
    assert loaded.preset == "tiny-fnaf" and loaded.config.block == "fnaf"
    x = photo(33, 47)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


def test_tlc_is_a_no_op_when_windows_are_smaller_than_the_kernels():
    model = fnaf_model(1)
    tlc = convert_to_tlc(model, train_size=256)  # kernels 384 ... 24 >= windows 24 ... 3
    pools = [m for m in tlc.modules() if isinstance(m, (GlobalAvgPool2d, LocalAvgPool2d))]
    assert pools and all(isinstance(m, LocalAvgPool2d) for m in pools)  # every windowed SCA pool was swapped
    x = photo(50, 60)
    with torch.no_grad():
        assert torch.equal(tlc(x), model(x))
        # kernels smaller than the windows (train 16: 24, 12, 6, 3, 1 vs 24, 12, 6, 3, 3): TLC acts
        assert (convert_to_tlc(model, train_size=16)(x) - model(x)).abs().max().item() > 1e-4


def test_half_model_keeps_the_fft_branch_in_fp32():
    model = fnaf_model(2)
    x = photo(30, 40)
    with torch.no_grad():
        ref = model(x)
        out = model.half()(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max().item() < 0.05


# ---------------------------------------------------------------------------------------------------------
# Training


def test_charfreq_loss_is_charbonnier_plus_a_hundredth_of_the_spectrum_l1():
    import numpy as np

    from train.objectives import LOSS_FUNCTIONS

    g = torch.Generator().manual_seed(0)
    pred, gt = torch.rand(2, 3, 12, 9, generator=g), torch.rand(2, 3, 12, 9, generator=g)
    d = (pred - gt).numpy().astype(np.float64)
    expected = np.sqrt(d**2 + 1e-6).mean() + 0.01 * np.abs(np.fft.rfft2(d)).mean()
    assert abs(LOSS_FUNCTIONS["charfreq"](pred, gt).item() - expected) < 1e-6


@pytest.mark.slow
def test_tiny_fnaf_trains_and_resumes_exactly(cache_dir, tmp_path):
    """The resume test of tests/test_train.py on tiny-fnaf with the official Charbonnier + frequency loss."""
    cfg = short_cfg(model="tiny-fnaf", loss="charfreq", steps=8)
    assert_resume_is_exact(cfg, tmp_path)
    from train.config import build_config

    assert build_config("fnafnet-gopro").loss == "charfreq"
    assert build_config("fnafnet-gopro").model == "fnafnet-gopro-width32"


# ---------------------------------------------------------------------------------------------------------
# Export


def test_fold_leaves_fnaf_blocks_as_written():
    from export.fold import fold_for_deploy

    model = fnaf_model(6)
    folded = fold_for_deploy(model)
    assert all(type(b) is FNAFBlock for stage in [*folded.encoders, folded.middle_blks, *folded.decoders]
               for b in stage)
    x = photo(30, 40)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


@pytest.fixture(scope="module")
def fnaf_export(tmp_path_factory):
    """A one-level tiny-fnaf checkpoint (a windowed and a whole-map FFT branch) exported with TLC (train size 4:
    TLC kernels 6 and 3, smaller than the windows 12 and 6, so TLC acts): fp32 + FP16 for a 48x64 tile, and the
    dynamic fp32 graph. The dynamic FP16 graph is left out: its export alone took 146 s on this machine (the
    dynamo exporter's symbolic-shape tracing), and the FP16 placement it would check is the tile's, checked here,
    while the dynamic graph's shape logic is the fp32 one's."""
    from export.api import export_model

    tmp = tmp_path_factory.mktemp("fnaf_export")
    model = fnaf_model(4, enc_blk_nums=(1,), dec_blk_nums=(1,), sca_windows=(12, 6), fft_windows=(12, 0))
    ckpt = save_checkpoint(tmp / "fnaf.pt", model, train_size=4)
    tile = export_model(ckpt, tmp / "tile", tiles=[(48, 64)], dynamic=False, fp16=True, tlc=True, check=True)
    dynamic = export_model(ckpt, tmp / "dynamic", tiles=None, dynamic=True, fp16=False, tlc=True, check=True)
    return tile, dynamic


def test_export_fp32_fp16_dynamic_tile_matches_and_lints(fnaf_export):
    import onnx

    from export.lint import check_no_dft, lint_path

    arts = {name: (manifest, rec) for manifest in fnaf_export for name, rec in manifest.artifacts.items()}
    assert sorted(arts) == ["onnx-fp16-48x64", "onnx-fp32-48x64", "onnx-fp32-dynamic"]
    for name, (manifest, rec) in arts.items():
        if rec["precision"] == "fp32":
            assert rec["check"]["max_abs_diff"] <= 1e-4, (name, rec["check"])
        proto = onnx.load(str(manifest.directory / rec["file"]))
        assert check_no_dft(proto) == []
        ops = {n.op_type for n in proto.graph.node}
        assert "DFT" not in ops and "MatMul" in ops and "Sin" in ops
    for manifest in fnaf_export:
        failed = [f for f in lint_path(manifest.directory) if not f.ok]
        assert not failed, failed


def test_parity_passes_for_both_fnaf_exports(fnaf_export, synth_root):
    """`parity` (the command's function) on the synthetic test split: every row that runs passes, whole and
    tiled, fp32 and FP16, onnxruntime and OpenVINO, against PyTorch fp32 of the exported checkpoint."""
    from runtime.parity import check_parity

    for manifest in fnaf_export:
        report = check_parity(manifest.directory, synth_root, torch_precisions=("fp16",), progress=False, limit=2)
        ran = [r for r in report.rows if r.passed is not None]
        assert report.passed and {r.backend for r in ran} >= {"torch", "onnxrt"}, report.table()


def test_fp16_range_report_covers_fnaf_blocks():
    from export.ranges import fp16_range_report

    report = fp16_range_report(fnaf_model(), [photo(48, 64)], half_size=(32, 32))
    assert len(report.blocks) == 9 and not report.overflows
    assert report.half_psnr_db > 40  # PyTorch half (FFT branches as FP32 islands) vs FP32
