"""AdaRevD (decoder='adarevd'): parameter counts, official names, tiles and blend, exits, and exactness.

Two oracles:

* an independent functional reference written here from the published facts (``torch.fft`` with complex
  tensors, explicit per-tile loops, the exit rule "a tile of depth d runs sub-decoders 0..d-1 and leaves
  through head d-1"), run always;
* the official ``AdaRevIDSlide(encoder='NAFNet')`` of ``INVOKERer/AdaRevD`` (tests named ``official``), imported
  from the checkout that the environment variable ``ADAREVD_OFFICIAL`` names (never part of this repository;
  its licence is non-commercial). Its imports outside the architecture (kornia, timm, einops, basicsr's
  utilities, UFPNet, the losses) are stubbed at import time; they are not on the NAFNet-encoder path.

Every parameter that starts at a trivial value is randomised (beta/gamma, norm affines, alphas, feature scales,
biases), else every block is the identity and differences hide.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nafnet_core as nc
from nafnet_core.adarevd import (
    AdaRevD,
    normalized_axis_weights,
    official_axis_weights,
    split_parameters,
    tile_starts,
)
from nafnet_core.checkpoint import CheckpointError, load_checkpoint, load_encoder, save_checkpoint, save_official
from nafnet_core.config import PRESET_PARAMS, get_config
from nafnet_core.dft import matrix_form
from nafnet_core.tlc import LocalAvgPool2d, convert_to_tlc

#: tiny-adarevd with the official encoder layout (the official NAFNet encoder always has [1, 1, 1, 28] / 1)
OFFICIAL_LAYOUT = dict(enc_blk_nums=(1, 1, 1, 28))


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every trivially initialised parameter random (in place); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            last = name.rsplit(".", 1)[-1]
            if last in ("beta", "gamma"):
                p.copy_(r * 0.5)
            elif last.startswith("alpha") and "subdenets" in name:
                p.copy_((0.5 + 0.25 * r.abs()) * torch.sign(torch.randn(p.shape, generator=g)))
            elif "conv_features" in name:
                p.copy_(1 + 0.3 * r)
            elif last == "alpha":
                p.copy_(r)
            elif last == "weight" and p.dim() == 1:  # norm affines
                p.copy_(1 + 0.2 * r)
            elif last == "bias":
                p.copy_(0.2 * r)
            elif ".sca." in name and p.dim() == 4:
                p.mul_(4.0)
    return model.eval()


def tiny(seed: int = 0, **overrides) -> AdaRevD:
    torch.manual_seed(seed)
    return randomise(nc.create_model("tiny-adarevd", **overrides), seed)


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None, :]
    base = torch.stack([torch.sin(6 * x + 3 * y), torch.cos(5 * y - 2 * x), x * y])
    return (0.5 + 0.3 * base + 0.1 * torch.rand(3, h, w, generator=g)).unsqueeze(0)


class ForcedClasses(nn.Module):
    """Stands in for the classifier's last stage: prescribed logits per tile (so that every exit is taken)."""

    def __init__(self, classes: list[int], n_classes: int):
        super().__init__()
        self.logits = F.one_hot(torch.tensor(classes), n_classes).float() * 5

    def forward(self, x):
        assert x.shape[0] == len(self.logits), "one forced class per tile"
        return self.logits.clone()


# ---------------------------------------------------------------------------------------------------------
# The reference, from the facts


def ref_ln(x, w, b, eps):
    mu = x.mean(1, keepdim=True)
    var = ((x - mu) ** 2).mean(1, keepdim=True)
    return w.view(1, -1, 1, 1) * (x - mu) / torch.sqrt(var + eps) + b.view(1, -1, 1, 1)


def ref_naf(sd, p, x, pool):
    t = ref_ln(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
    t = F.conv2d(t, sd[p + "conv1.weight"], sd[p + "conv1.bias"])
    t = F.conv2d(t, sd[p + "conv2.weight"], sd[p + "conv2.bias"], padding=1, groups=t.shape[1])
    a, b = t.chunk(2, 1)
    t = a * b
    t = t * F.conv2d(pool(t), sd[p + "sca.1.weight"], sd[p + "sca.1.bias"])
    y = x + sd[p + "beta"] * F.conv2d(t, sd[p + "conv3.weight"], sd[p + "conv3.bias"])
    t = F.conv2d(ref_ln(y, sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6), sd[p + "conv4.weight"],
                 sd[p + "conv4.bias"])
    a, b = t.chunk(2, 1)
    return y + sd[p + "gamma"] * F.conv2d(a * b, sd[p + "conv5.weight"], sd[p + "conv5.bias"])


def ref_fft(sd, p, x):
    h, w = x.shape[-2:]
    y = torch.fft.rfft2(x)
    y = F.conv2d(torch.cat([y.real, y.imag], 1), sd[p + "complex_conv1.weight"], sd[p + "complex_conv1.bias"])
    y = F.conv2d(F.gelu(y), sd[p + "complex_conv2.weight"], sd[p + "complex_conv2.bias"])
    re, im = y.chunk(2, 1)
    return torch.fft.irfft2(torch.complex(re, im), s=(h, w))


def ref_fcnaf(sd, p, x):
    t = ref_ln(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
    u = F.conv2d(t, sd[p + "conv1.weight"], sd[p + "conv1.bias"])
    u = F.conv2d(u, sd[p + "conv2.weight"], sd[p + "conv2.bias"], padding=1, groups=u.shape[1])
    a, b = u.chunk(2, 1)
    u = a * b
    u = u * F.conv2d(u.mean((2, 3), keepdim=True), sd[p + "sca.0.weight"], sd[p + "sca.0.bias"])
    u = F.conv2d(u, sd[p + "conv3.weight"], sd[p + "conv3.bias"]) + ref_fft(sd, p + "fft_block1.", t)
    y = x + sd[p + "beta"] * u
    t = ref_ln(y, sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
    u = F.conv2d(t, sd[p + "conv4.weight"], sd[p + "conv4.bias"])
    a, b = u.chunk(2, 1)
    u = ref_fft(sd, p + "fft_block2.", t) + F.conv2d(a * b, sd[p + "conv5.weight"], sd[p + "conv5.bias"])
    return y + sd[p + "gamma"] * u


def ref_level(sd, p, level, n_blocks, coarse, fine):
    x = F.pixel_shuffle(F.conv2d(coarse, sd[p + "fusion.up.0.weight"]), 2)
    if level < 3:
        d = F.conv2d(fine, sd[p + "fusion.down.0.weight"], sd[p + "fusion.down.0.bias"], stride=2)
        x = ref_ln(d, sd[p + "fusion.down.1.body.weight"], sd[p + "fusion.down.1.body.bias"], 1e-5) + x
    for j in range(n_blocks):
        x = ref_fcnaf(sd, f"{p}blocks.{j}.", x)
    return x


def ref_encoder(sd, cfg, x, kernels):
    def pool(level):
        return (lambda t: t.mean((2, 3), keepdim=True)) if kernels is None else \
            (lambda t: nc.local_mean(t, kernels[level]))

    t = F.conv2d(x, sd["encoder.intro.weight"], sd["encoder.intro.bias"], padding=1)
    feats = []
    for i, n in enumerate(cfg.enc_blk_nums):
        for j in range(n):
            t = ref_naf(sd, f"encoder.encoders.{i}.{j}.", t, pool(i))
        feats.append(t)
        t = F.conv2d(t, sd[f"encoder.downs.{i}.weight"], sd[f"encoder.downs.{i}.bias"], stride=2)
    for j in range(cfg.middle_blk_num):
        t = ref_naf(sd, f"encoder.middle_blks.{j}.", t, pool(4))
    feats.append(t)
    return [sd[f"conv_features.{i}"] * f for i, f in enumerate(feats)]


def ref_classify(sd, cfg, e3):
    t = F.conv2d(e3, sd["ape.0.weight"], sd["ape.0.bias"], stride=2)
    t = ref_naf(sd, "ape.1.", t, lambda v: v.mean((2, 3), keepdim=True)).mean((2, 3))
    c = t.shape[1]
    t = F.layer_norm(t, (c,), sd["ape.2.classifier.0.weight"], sd["ape.2.classifier.0.bias"], 1e-6)
    t = F.gelu(F.linear(t, sd["ape.2.classifier.1.weight"], sd["ape.2.classifier.1.bias"]))
    t = F.linear(t, sd["ape.2.classifier.3.weight"], sd["ape.2.classifier.3.bias"])
    return t * sd["ape.2.alpha"]


def reference(sd, cfg, x, kernels=None, classes=None):
    """Every depth's assembled residual image (list of K + 1, depth 0 first) and each tile's depth, from the
    facts: reflect padding to 16, the encoder on the whole image, per-tile sub-decoders, normalised
    neighbour ramps. ``classes``: forced classifier classes per tile (else the classifier's argmax)."""
    n, _, h, w = x.shape
    xp = F.pad(x, (0, (16 - w % 16) % 16, 0, (16 - h % 16) % 16), mode="reflect")
    H, W = xp.shape[-2:]
    feats = ref_encoder(sd, cfg, xp, kernels)
    rows, cols = tile_starts(H, cfg.tile, cfg.tile_overlap), tile_starts(W, cfg.tile, cfg.tile_overlap)
    k1, k2 = min(H, cfg.tile), min(W, cfg.tile)
    images = [torch.zeros(n, 3, H, W) for _ in range(cfg.sub_decoders + 1)]
    weight = torch.zeros(H, W)
    depths = []
    tiles = [(r, c) for r in rows for c in cols]
    for t, (r, c) in enumerate(tiles):
        e = [f[:, :, r >> lv:(r >> lv) + (k1 >> lv), c >> lv:(c >> lv) + (k2 >> lv)] for lv, f in enumerate(feats)]
        if cfg.exits:
            cls = classes[t] if classes is not None else int(ref_classify(sd, cfg, e[3]).argmax())
            depths.append(cfg.exits[cls])
        e4, e3, e2, e1, e0 = e[4], e[3], e[2], e[1], e[0]
        # ramps over the overlaps with the neighbouring tiles
        wr, wc = torch.ones(k1), torch.ones(k2)
        for vec, starts, pos, k in ((wr, rows, rows.index(r), k1), (wc, cols, cols.index(c), k2)):
            if pos > 0:
                length = starts[pos - 1] + k - starts[pos]
                vec[:length] *= torch.linspace(0, 1, length)
            if pos + 1 < len(starts):
                length = starts[pos] + k - starts[pos + 1]
                vec[k - length:] *= torch.linspace(1, 0, length)
        wt = wr[:, None] * wc[None, :]
        weight[r:r + k1, c:c + k2] += wt
        for d in range(cfg.sub_decoders):
            p = f"subdenets.{d}."
            nb = cfg.dec_blk_nums
            e3 = sd[p + "alpha0"] * e3 + ref_level(sd, p + "level0.", 0, nb[0], e4, e2)
            e2 = sd[p + "alpha1"] * e2 + ref_level(sd, p + "level1.", 1, nb[1], e3, e1)
            e1 = sd[p + "alpha2"] * e1 + ref_level(sd, p + "level2.", 2, nb[2], e2, e0)
            e0 = sd[p + "alpha3"] * e0 + ref_level(sd, p + "level3.", 3, nb[3], e1, None)
            res = F.conv2d(e0, sd[f"outputs.{d}.0.weight"], sd[f"outputs.{d}.0.bias"], padding=1)
            images[d + 1][:, :, r:r + k1, c:c + k2] += res * wt
    images = [(im / weight)[:, :, :h, :w] for im in images]
    return images, depths


# ---------------------------------------------------------------------------------------------------------
# Parameters, names, loading


@pytest.mark.parametrize("preset", ["adarevd-b-naf", "adarevd-s-naf", "tiny-adarevd"])
def test_parameter_counts(preset):
    with torch.device("meta"):
        model = nc.create_model(preset)
    assert nc.count_parameters(model) == PRESET_PARAMS[preset]


def test_b_naf_splits_as_the_arithmetic():
    with torch.device("meta"):
        model = nc.create_model("adarevd-b-naf")
        naf64 = nc.create_model("nafnet-gopro-width64")
    parts = split_parameters(model)
    # the encoder is NAFNet-GoPro-width64 without its ups, decoders and ending, plus the 5 feature scales
    dec = sum(p.numel() for m in (naf64.ups, naf64.decoders, naf64.ending) for p in m.parameters())
    assert parts["encoder"] == nc.count_parameters(naf64) - dec + 64 * (1 + 2 + 4 + 8 + 16)
    assert round(parts["encoder"] / 1e6, 1) == 62.6 and round(parts["sub-decoder 1"] / 1e6, 1) == 17.1
    assert round(parts["classifier"] / 1e6, 1) == 10.0 and round(sum(parts.values()) / 1e6, 1) == 141.0
    assert len({v for k, v in parts.items() if k.startswith("sub-decoder")}) == 1


def test_config_checks():
    with pytest.raises(ValueError, match="exits must be depths"):
        get_config("tiny-adarevd", exits=(4,))
    with pytest.raises(ValueError, match="multiples of 16"):
        get_config("tiny-adarevd", tile=40)
    with pytest.raises(ValueError, match="options of decoder 'adarevd'"):
        get_config("tiny", sub_decoders=2)
    with pytest.raises(ValueError, match="four-level NAFNet encoder"):
        get_config("tiny-adarevd", block="fnaf")
    with pytest.raises(ValueError, match="blend must be"):
        get_config("tiny-adarevd", blend="mean")


def test_checkpoint_round_trip_and_params_file(tmp_path):
    model = tiny(1)
    save_checkpoint(tmp_path / "m.pt", model)
    back = load_checkpoint(tmp_path / "m.pt")
    assert isinstance(back.model, AdaRevD) and back.preset == "tiny-adarevd"
    x = image(40, 56)
    with torch.no_grad():
        assert torch.equal(back.model(x), model(x))
    save_official(tmp_path / "o.pth", model)
    official = load_checkpoint(tmp_path / "o.pth", preset="tiny-adarevd")
    assert official.source == "official"
    with pytest.raises(CheckpointError, match="unexpected keys: ape"):
        load_checkpoint(tmp_path / "o.pth", preset="tiny-adarevd", exits=())


def test_encoder_loads_from_a_nafnet_checkpoint(tmp_path):
    naf = randomise(nc.create_model("tiny"), 3)
    save_official(tmp_path / "naf.pth", naf)
    save_checkpoint(tmp_path / "best.pt", naf)
    for path in (tmp_path / "naf.pth", tmp_path / "best.pt"):
        model = nc.create_model("tiny-adarevd")
        load_encoder(model, path)
        got, want = model.encoder.state_dict(), naf.state_dict()
        assert all(torch.equal(v, want[k]) for k, v in got.items())
    wide = nc.create_model("tiny", width=16)
    save_official(tmp_path / "wide.pth", wide)
    with pytest.raises(CheckpointError, match="wide.pth.*the AdaRevD encoder.*shape mismatch"):
        load_encoder(nc.create_model("tiny-adarevd"), tmp_path / "wide.pth")


def test_tlc_converts_the_encoder_only():
    model = convert_to_tlc(tiny(), train_size=64)
    pools = [name for name, m in model.named_modules() if isinstance(m, LocalAvgPool2d)]
    assert pools and all(name.startswith("encoder.") for name in pools)
    assert len(pools) == sum(get_config("tiny-adarevd").enc_blk_nums) + 1


# ---------------------------------------------------------------------------------------------------------
# Tiles and blend


def test_tile_grid_at_720x1280():
    assert tile_starts(720, 384, 32) == [0, 336]
    assert tile_starts(1280, 384, 32) == [0, 352, 704, 896]
    assert tile_starts(384, 384, 32) == [0] and tile_starts(256, 384, 32) == [0]


def _sums(axis, n, tile=384, overlap=32):
    total = torch.zeros(n)
    for s, w in zip(tile_starts(n, tile, overlap), axis(n, tile, overlap)):
        total[s:s + len(w)] += w
    return total


def test_official_weights_quirks():
    for n in (720, 1280):
        assert torch.allclose(_sums(official_axis_weights, n), torch.ones(n), atol=1e-6)
    one = _sums(official_axis_weights, 256)
    assert one[0] == 0 and (one[1:31] < 1).all() and (one[32:] == 1).all()  # a one-tile side
    for n in (752, 1104):
        s = _sums(official_axis_weights, n)
        assert 1.004 < s.max() < 1.006


@pytest.mark.parametrize("n", [16, 48, 256, 384, 400, 720, 752, 1104, 1280, 1920])
def test_normalized_weights_are_positive_ramps(n):
    weights = normalized_axis_weights(n, 384, 32)
    assert all((w > 0).any() and (w >= 0).all() for w in weights)
    assert (_sums(normalized_axis_weights, n) > 0).all()
    if n in (720, 1280):  # where the official weights are a partition of unity, they are these ramps
        assert all(torch.equal(a, b) for a, b in zip(weights, official_axis_weights(n, 384, 32)))


def test_blend_of_a_constant_is_the_constant():
    model = tiny()
    for h, w in ((96, 160), (64, 64), (48, 112)):
        tiles, rows, cols = model.tiles([torch.zeros(1, 1, h, w)] + [torch.zeros(1, 1, h >> i, w >> i)
                                                                     for i in range(1, 5)])
        from nafnet_core.adarevd import blend
        out = blend(torch.full((tiles[0].shape[0], 3, *tiles[0].shape[-2:]), 2.5), 1, (h, w), model.config)
        torch.testing.assert_close(out, torch.full((1, 3, h, w), 2.5), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Exactness against the reference


@pytest.mark.parametrize("size", [(90, 150), (40, 56)])
def test_matches_the_reference_at_every_depth(size):
    model = convert_to_tlc(tiny(2), train_size=64)
    sd = model.state_dict()
    x = image(*size)
    want, _ = reference(sd, model.config, x, kernels=model.tlc["kernels"])
    with torch.no_grad():
        every = model(x, all_depths=True)
        for d in range(model.depth + 1):
            got = model(x, depth=d)
            torch.testing.assert_close(got, x + want[d], atol=1e-5, rtol=0)
            if d:
                torch.testing.assert_close(every[:, d - 1], got, atol=1e-6, rtol=0)


def test_adaptive_exits_match_the_reference_and_run_all_select():
    model = convert_to_tlc(tiny(4), train_size=64)
    x = image(90, 150, seed=1)  # padded 96 x 160: 2 x 3 tiles of 64
    classes = [0, 2, 3, 4, 1, 2]  # depths 3, 2, 1, 0, 3, 2
    model.ape[2] = ForcedClasses(classes, 5)
    want, depths = reference(model.state_dict(), model.config, x, kernels=model.tlc["kernels"], classes=classes)
    assert depths == [3, 2, 1, 0, 3, 2]
    with torch.no_grad():
        got, got_depths = model(x, return_depths=True)
        assert got_depths.tolist() == depths
        # run every depth on every tile, then pick each tile's own depth
        features = model.encode(model.pad_input(x))
        tiles, rows, cols = model.tiles(features)
        every = [model.decode_fixed(tiles[::-1], d) for d in range(model.depth + 1)]
        picked = torch.stack([every[d][t] for t, d in enumerate(depths)])
        from nafnet_core.adarevd import blend
        select = (blend(picked, 1, (96, 160), model.config) + model.pad_input(x))[..., :90, :150]
    torch.testing.assert_close(got, select, atol=1e-6, rtol=0)
    # the reference: each tile blended from its own depth's residual
    rows, cols = tile_starts(96, 64, 16), tile_starts(160, 64, 16)
    assert len(rows) * len(cols) == len(depths)


def test_classifier_matches_the_reference():
    model = tiny(5)
    e3 = torch.randn(6, 64, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.exit_logits(e3), ref_classify(model.state_dict(), model.config, e3),
                                   atol=1e-5, rtol=1e-5)


def test_matrix_form_equals_torch_fft():
    model = tiny(6)
    x = image(48, 80)
    with torch.no_grad():
        eager = model(x, depth=3)
        with matrix_form():
            matrices = model(x, depth=3)
    torch.testing.assert_close(matrices, eager, atol=2e-5, rtol=0)


def test_half_model_keeps_fp32_islands():
    model = tiny(7)
    x = image(48, 64)
    with torch.no_grad():
        want = model(x, depth=2)
        got = model.half()(x, depth=2)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - want).abs().max() < 0.05


# ---------------------------------------------------------------------------------------------------------
# Training: reversible backward


def test_reversible_backward_equals_plain_autograd():
    torch.manual_seed(0)
    grads = []
    for reversible in (False, True):
        model = tiny(8)
        model.train()
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        model.reversible = reversible
        x = image(32, 48)
        out = model(x, all_depths=True)
        (out.square().mean() + out[:, 0].abs().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    plain, rev = grads
    assert set(plain) == set(rev) and any(n.startswith("conv_features") for n in plain)
    assert not any(n.startswith("encoder.") for n in plain)
    for name in plain:
        torch.testing.assert_close(rev[name], plain[name], atol=1e-4, rtol=1e-3, msg=name)


# ---------------------------------------------------------------------------------------------------------
# The official code (ADAREVD_OFFICIAL)


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _rearrange(x, pattern, **sizes):
    """The two einops patterns on the NAFNet-encoder path (the Fusion LayerNorm's reshapes)."""
    if pattern == "b c h w -> b (h w) c":
        return x.flatten(2).transpose(1, 2)
    if pattern == "b (h w) c -> b c h w":
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], sizes["h"], sizes["w"])
    raise NotImplementedError(f"einops stub: {pattern}")


@pytest.fixture(scope="module")
def official():
    root = os.environ.get("ADAREVD_OFFICIAL")
    if not root:
        pytest.skip("set ADAREVD_OFFICIAL to a checkout of github.com/INVOKERer/AdaRevD to compare with the official "
                    "code")
    root = Path(root)
    saved = dict(sys.modules)
    try:
        for pkg, sub in (("basicsr", ""), ("basicsr.models", "models"), ("basicsr.models.archs", "models/archs"),
                         ("basicsr.models.archs.modules", "models/archs/modules"),
                         ("basicsr.models.losses", "models/losses")):
            _stub(pkg, __path__=[str(root / "basicsr" / sub)])
        _stub("basicsr.utils", get_root_logger=lambda *a, **k: None)
        _stub("kornia", filters=_stub("kornia.filters"))
        timm = _stub("timm")
        timm.models = _stub("timm.models")
        timm.models.layers = _stub("timm.models.layers", trunc_normal_=nn.init.trunc_normal_)
        _stub("einops", rearrange=_rearrange)
        _stub("einops.layers")
        _stub("einops.layers.torch", Rearrange=nn.Identity, Reduce=nn.Identity)
        _stub("basicsr.models.archs.UFPNet")
        _stub("basicsr.models.archs.UFPNet.UFPNet_code_uncertainty_arch", UFPNet=None, UFPNetLocal=None)
        _stub("basicsr.models.losses.losses", AdaptiveLoss=None)
        arch = importlib.import_module("basicsr.models.archs.AdaRevID_arch")
    finally:
        added = set(sys.modules) - set(saved)
        for name in added:
            if not name.startswith("basicsr.models.archs.AdaRevID_arch"):
                pass
    yield arch
    for name in set(sys.modules) - set(saved):
        del sys.modules[name]


def official_model(arch, cfg, pretrain: bool, decoder_idx: int = 1):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return arch.AdaRevIDSlide(
            width=cfg.width, train_size=[cfg.tile, cfg.tile], overlap_size=[cfg.tile_overlap] * 2,
            baseblock=["fcnaf"] * cfg.sub_decoders, encoder="NAFNet", save_memory_decoder=False, pretrain=pretrain,
            dx="e3", classifier_type="hard_simple", num_classes=len(cfg.exits), exit_idx=list(cfg.exits),
            decoder_idx=decoder_idx, state_dict_pth_encoder=None, test_only=True).eval()


def without_classifier(model: AdaRevD) -> dict:
    """The state dict without the classifier (the official model built with ``pretrain=True`` has none)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("ape.")}


def ours_official_layout(seed: int) -> AdaRevD:
    return convert_to_tlc(tiny(seed, blend="official", **OFFICIAL_LAYOUT), train_size=256)


def test_official_names_and_parameter_count(official):
    ours = ours_official_layout(10)
    theirs = official_model(official, ours.config, pretrain=False)
    assert set(theirs.state_dict()) == set(ours.state_dict())
    assert nc.count_parameters(theirs) == nc.count_parameters(ours)
    theirs.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.slow
@pytest.mark.parametrize("size", [(90, 150), (64, 100)])
def test_official_every_depth(official, size):
    ours = ours_official_layout(11)
    x = image(*size, seed=2)
    theirs = official_model(official, ours.config, pretrain=True)
    theirs.load_state_dict(without_classifier(ours), strict=True)
    with torch.no_grad():
        every = ours(x, all_depths=True)
        for d in range(1, ours.depth + 1):
            theirs.decoder_idx = d  # the official pretrain forward: sub-decoders 0..d-1, head d-1, on every tile
            want = theirs(x.clone())
            torch.testing.assert_close(ours(x, depth=d), want, atol=1e-5, rtol=0)
            torch.testing.assert_close(every[:, d - 1], want, atol=1e-5, rtol=0)


def test_official_sub_decoder_tiles_and_classifier(official):
    ours = ours_official_layout(12)
    theirs = official_model(official, ours.config, pretrain=False)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = image(96, 160, seed=3)
    with torch.no_grad():
        feats = [f * e for f, e in zip(theirs.conv_features, theirs.encoder(x))]
        their_tiles = [theirs.grids(f, i) for i, f in enumerate(feats)]
        tiles, _, _ = ours.tiles(ours.encode(x))
        for a, b in zip(tiles, their_tiles):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.exit_logits(tiles[3]), theirs.ape(their_tiles[3]), atol=1e-5, rtol=1e-5)
        state = [t.clone() for t in their_tiles[::-1]]
        for k, sub in enumerate(theirs.subdenets):
            e3, e2, e1, e0 = sub(*state)
            state = [state[0], e3, e2, e1, e0]
            torch.testing.assert_close(ours.decode_fixed(tiles[::-1], k + 1), theirs.outputs[k](e0), atol=1e-5,
                                       rtol=0)


def test_official_adaptive_exits(official):
    ours = ours_official_layout(13)
    theirs = official_model(official, ours.config, pretrain=False)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    classes = [0, 2, 3, 4, 1, 2]  # depths 3, 2, 1, 0, 3, 2: every exit
    ours.ape[2] = ForcedClasses(classes, 5)
    theirs.ape[2] = ForcedClasses(classes, 5)
    x = image(90, 150, seed=4)
    with torch.no_grad():
        got, depths = ours(x, return_depths=True)
        want = theirs(x.clone())
    assert depths.tolist() == [3, 2, 1, 0, 3, 2]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    ours_normalized = ours_official_layout(13)
    ours_normalized.load_state_dict(ours.state_dict(), strict=False)
    ours_normalized.ape[2] = ForcedClasses(classes, 5)
    normalized = nc.build_model(get_config("tiny-adarevd", **OFFICIAL_LAYOUT))  # blend='normalized'
    normalized = convert_to_tlc(normalized, train_size=256)
    normalized.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("ape.2")},
                               strict=False)
    normalized.ape[2] = ForcedClasses(classes, 5)
    with torch.no_grad():  # 96 x 160 is a size where the official weights are a partition of unity
        torch.testing.assert_close(normalized(x), want, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("tile,overlap", [(384, 32), (64, 16)])
def test_official_blend_weights_over_sizes(official, tile, overlap):
    cfg = get_config("tiny-adarevd", tile=tile, tile_overlap=overlap, **OFFICIAL_LAYOUT)
    theirs = official_model(official, cfg, pretrain=True)
    checked = 0
    for n in range(16, 1441 if tile == 384 else 401, 16):
        for m in (n, 160 if tile == 64 else 720):
            try:
                theirs.grids(torch.zeros(1, 1, n, m))
                tiles = len(theirs.idxes)
                blended = theirs.grids_inverse(torch.ones(tiles, 1, min(n, tile), min(m, tile)))[0, 0]
            except (RuntimeError, ZeroDivisionError):  # the official code fails here; so does blend='official'
                with pytest.raises(ValueError, match="official blend is undefined"):
                    official_axis_weights(n, tile, overlap), official_axis_weights(m, tile, overlap)
                continue
            total = torch.zeros(n, m)
            wr, wc = official_axis_weights(n, tile, overlap), official_axis_weights(m, tile, overlap)
            rows, cols = tile_starts(n, tile, overlap), tile_starts(m, tile, overlap)
            for r, a in zip(rows, wr):
                for c, b in zip(cols, wc):
                    total[r:r + len(a), c:c + len(b)] += a[:, None] * b[None, :]
            assert [(d["i"], d["j"]) for d in theirs.idxes] == [(r, c) for r in rows for c in cols]
            torch.testing.assert_close(total, blended, atol=1e-6, rtol=0, msg=f"{n}x{m}")
            checked += 1
    assert checked > 20


def test_info_prints_the_count_and_split():
    from click.testing import CliRunner

    from cli import main

    result = CliRunner().invoke(main, ["info", "adarevd-b-naf"])
    assert result.exit_code == 0, result.output
    assert "141,037,848" in result.output
    assert "encoder 62,635,008 + 4 x sub-decoder 17,100,227 + classifier 10,001,932" in result.output
    assert "exit table [4, 4, 3, 3, 2, 1]" in result.output and "384 px, overlap 32" in result.output


def test_tile_runtime_refuses_adarevd_with_one_line(tmp_path):
    from click.testing import CliRunner

    from cli import main

    save_checkpoint(tmp_path / "a.pt", tiny())
    args = ["infer", str(tmp_path), "--model", str(tmp_path / "a.pt"), "--backend", "torch", "--out",
            str(tmp_path / "o")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "does not take AdaRevD models" in result.output and "Traceback" not in result.output, result.output
    result = CliRunner().invoke(main, ["export", str(tmp_path / "a.pt"), "--int8", "--out", str(tmp_path / "e")])
    assert result.exit_code != 0 and "--int8 not available for AdaRevD models" in result.output, result.output
    assert not (tmp_path / "e" / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------------------
# Training (stage 1) and evaluation through the training loop


@pytest.mark.slow
def test_stage1_trains_sub_decoders_with_the_encoder_frozen_and_eval_reports_depths(tmp_path):
    from click.testing import CliRunner

    from cli import main
    from tests.helpers import short_cfg
    from train.loop import train

    naf = randomise(nc.create_model("tiny"), 3)
    save_checkpoint(tmp_path / "naf.pt", naf)
    cfg = short_cfg(model="tiny-adarevd", loss="l1freq", dropout=0.0, steps=6, crop=64, batch=2, val_every=3,
                    init=str(tmp_path / "naf.pt"))
    start = nc.create_model("tiny-adarevd")
    result = train(cfg, tmp_path / "run", progress=False)
    model = result.model
    assert isinstance(model, AdaRevD) and model.reversible
    enc = naf.state_dict()
    assert all(torch.equal(v, enc[k]) for k, v in model.encoder.state_dict().items())  # frozen, from NAFNet
    torch.manual_seed(0)
    fresh = start.state_dict()
    changed = [k for k, v in model.state_dict().items() if k.startswith("subdenets.") and
               not torch.equal(v, fresh[k])]
    assert changed  # the sub-decoders trained
    assert not any(p.requires_grad for p in model.ape.parameters())
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert isinstance(best.model, AdaRevD)
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "run" / "best.pt"), "--split", "val", "--max-images", "1",
                                  "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    assert "exit depth" in r.output and "adaptive" in r.output and "exit histogram (tiles per depth)" in r.output
    import json
    summary = json.loads((tmp_path / "e.json").read_text())
    assert len(summary["heads"]) == 4 and sum(summary["exit_histogram"]) > 0


@pytest.mark.slow
def test_stage1_resume_is_exact(tmp_path):
    from tests.helpers import assert_resume_is_exact, short_cfg

    assert_resume_is_exact(short_cfg(model="tiny-adarevd", loss="l1freq", dropout=0.0, crop=32, batch=2), tmp_path)


def test_exit_labels_count_the_thresholds_exceeded():
    from nafnet_core.adarevd import exit_labels

    sharp = torch.full((5, 3, 8, 8), 0.5)
    offsets = [0.2, 0.05, 0.03, 0.012, 0.001]  # PSNR 14, 26, 30.5, 38.4, 60 dB
    blur = torch.stack([s + o for s, o in zip(sharp, offsets)])
    assert exit_labels(blur, sharp, 6).tolist() == [0, 2, 3, 4, 5]
    assert exit_labels(blur, sharp, 5).tolist() == [0, 2, 3, 4, 4]  # tiny: 4 thresholds


@pytest.mark.slow
def test_stage2_trains_only_the_classifier(tmp_path):
    from tests.helpers import short_cfg
    from train.loop import train

    base = dict(model="tiny-adarevd", dropout=0.0, steps=3, crop=64, batch=2, val_every=3)
    first = train(short_cfg(loss="l1freq", **base), tmp_path / "s1", progress=False)
    cfg = short_cfg(stage=2, lr=1e-2, init=str(tmp_path / "s1" / "last.pt"), **base)
    second = train(cfg, tmp_path / "s2", progress=False)
    a, b = first.model.state_dict(), second.model.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith("ape.") for k in changed)
    rows = (tmp_path / "s2" / "metrics.csv").read_text()
    assert "val" in rows
    from train.config import ConfigError
    with pytest.raises(ConfigError, match="stage 2 trains an AdaRevD exit classifier"):
        short_cfg(stage=2)
    with pytest.raises(ConfigError, match="crop 96 must be at most the tile"):
        short_cfg(model="tiny-adarevd", stage=2, crop=96)
