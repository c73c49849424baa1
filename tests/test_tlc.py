"""TLC: kernels per level, the cumulative-sum local mean vs a direct reference, model conversion."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nafnet_core as nc
from nafnet_core.layers import GlobalAvgPool2d
from nafnet_core.tlc import LocalAvgPool2d, band_means, local_mean, tlc_kernels, window_means_t
from tests.helpers import make_nontrivial, photo


def reference_local_mean(x, kernel):
    """docs/DESIGN.md §4 (TLC) written directly: avg_pool2d over the clamped window, then replicate pad
    (d//2, (d+1)//2)."""
    h, w = x.shape[-2:]
    k1, k2 = min(h, kernel[0]), min(w, kernel[1])
    out = F.avg_pool2d(x.double(), (k1, k2), stride=1)
    dh, dw = h - out.shape[-2], w - out.shape[-1]
    return F.pad(out, (dw // 2, (dw + 1) // 2, dh // 2, (dh + 1) // 2), mode="replicate").to(x.dtype)


def test_kernels_width32_train256():
    assert tlc_kernels(nc.get_config("nafnet-gopro-width32"), 256) == [(384, 384), (192, 192), (96, 96), (48, 48),
                                                                        (24, 24)]


def test_kernels_follow_official_integer_arithmetic():
    cfg = nc.get_config("tiny")
    assert tlc_kernels(cfg, 64) == [(96, 96), (48, 48), (24, 24), (12, 12), (6, 6)]
    # 250 px crops: features measured on the padded 256 input, base = int(250 * 1.5) = 375
    assert tlc_kernels(cfg, 250)[0] == (256 * 375 // 250,) * 2 == (384, 384)
    assert tlc_kernels(cfg, (128, 256)) == [(192, 384), (96, 192), (48, 96), (24, 48), (12, 24)]
    assert tlc_kernels(cfg, 256, base_ratio=2.0)[0] == (512, 512)


SHAPES = [
    ((2, 3, 37, 53), (8, 8)),      # larger than the kernel, odd sizes
    ((1, 4, 20, 7), (24, 24)),     # smaller than the kernel
    ((1, 2, 24, 24), (24, 24)),    # equal to the kernel
    ((1, 2, 50, 30), (24, 40)),    # taller than the kernel, narrower than it
    ((1, 1, 9, 64), (9, 5)),       # window equals height, smaller than width
    ((1, 2, 97, 131), (48, 48)),
    ((3, 1, 1, 1), (6, 6)),
    ((1, 3, 5, 40), (2, 3)),       # even-odd window
]


@pytest.mark.parametrize("shape,kernel", SHAPES)
def test_local_mean_matches_direct_reference(shape, kernel):
    torch.manual_seed(hash(shape) % 1000)
    x = torch.randn(shape) * 2 + 0.5
    out = local_mean(x, kernel)
    ref = reference_local_mean(x, kernel)
    assert out.shape[:2] == x.shape[:2]
    torch.testing.assert_close(out.expand_as(x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape,kernel", [sk for sk in SHAPES if sk[0][-2] > sk[1][0] or sk[0][-1] > sk[1][1]])
def test_window_grids_match_direct_reference(shape, kernel):
    """The two window-mean forms of the deploy attention (transposed cumulative sums, band matrices) give the
    reference's un-padded grid and the padding back to H x W."""
    torch.manual_seed(hash(shape) % 1000)
    x = torch.randn(shape) * 2 + 0.5
    means_t, pad_t = window_means_t(x, kernel)
    means, pad = band_means(x, kernel)
    h, w = x.shape[-2:]
    k1, k2 = min(h, kernel[0]), min(w, kernel[1])
    grid = F.avg_pool2d(x.double(), (k1, k2), stride=1).float()
    torch.testing.assert_close(means_t.transpose(-1, -2), grid, atol=1e-5, rtol=0)
    torch.testing.assert_close(means, grid, atol=1e-5, rtol=0)
    assert pad == pad_t
    torch.testing.assert_close(F.pad(means, pad, mode="replicate"), reference_local_mean(x, kernel), atol=1e-5, rtol=0)


def test_local_mean_is_local():
    # a single bright pixel only affects the windows that contain it
    x = torch.zeros(1, 1, 40, 40)
    x[0, 0, 5, 5] = 1.0
    out = local_mean(x, (8, 8))
    assert out[0, 0, 30, 30] == 0 and out[0, 0, 5, 5] > 0


def test_local_mean_fp16_is_finite_and_accurate():
    # 100 + noise summed over 200x300 reaches 6e6: an FP16 cumulative sum would overflow to inf/NaN.
    torch.manual_seed(0)
    x = (100 + torch.randn(1, 4, 200, 300)).half()
    out = local_mean(x, (96, 96))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference_local_mean(x.float(), (96, 96)), atol=0.1, rtol=1e-3)


def test_convert_returns_new_model_and_leaves_input_untouched():
    model = make_nontrivial(nc.create_model("tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tlc = nc.convert_to_tlc(model, train_size=64)
    assert tlc is not model
    assert all(isinstance(b.sca[0], GlobalAvgPool2d) for b in model.modules() if hasattr(b, "sca"))
    assert not nc.is_tlc(model) and nc.is_tlc(tlc)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(tlc.state_dict()) == set(before)
    kernels = sorted({m.kernel for m in tlc.modules() if isinstance(m, LocalAvgPool2d)})
    assert kernels == sorted(tlc_kernels(model.config, 64))
    # encoder level 0 and decoder level 0 share the 96 kernel; the middle has 6
    assert tlc.encoders[0][0].sca[0].kernel == (96, 96) and tlc.decoders[-1][0].sca[0].kernel == (96, 96)
    assert tlc.middle_blks[0].sca[0].kernel == (6, 6)
    with pytest.raises(ValueError, match="already has TLC"):
        nc.convert_to_tlc(tlc)


def test_tlc_equals_global_pooling_up_to_training_size():
    model = make_nontrivial(nc.create_model("tiny"))
    tlc = nc.convert_to_tlc(model, train_size=64)
    x = photo(64, 48)
    with torch.no_grad():
        torch.testing.assert_close(tlc(x), model(x), atol=1e-6, rtol=0)


class _RefPool(nn.Module):
    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel

    def forward(self, x):
        return reference_local_mean(x, self.kernel)


def test_tlc_model_matches_reference_pooling_and_differs_from_global():
    torch.manual_seed(0)
    model = make_nontrivial(nc.create_model("tiny"), sca_gain=8.0)
    tlc = nc.convert_to_tlc(model, train_size=32)  # kernels 48..3: the 75x101 image is larger than all of them
    ref = nc.convert_to_tlc(model, train_size=32)
    for m in ref.modules():
        if hasattr(m, "sca"):
            m.sca[0] = _RefPool(m.sca[0].kernel)
    x = photo(75, 101)
    with torch.no_grad():
        out, expected, glob = tlc(x), ref(x), model(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # the effect the comparison must be able to detect is far larger than its tolerance
    assert (out - glob).abs().max() > 1e-3
