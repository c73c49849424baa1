"""Metrics against independent references: scikit-image SSIM, a direct 3-D SSIM, hand-computed PSNR."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import nafnet_core as nc
from tests.helpers import photo


def _u8(x):
    return nc.quantize(x)


def test_psnr_hand_computed():
    a = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, 0, 0] = 10  # MSE = 100 / 48
    assert nc.psnr(b, a).item() == pytest.approx(10 * math.log10(255**2 / (100 / 48)), abs=1e-9)
    assert nc.psnr(a, a).item() == math.inf
    x = torch.rand(2, 3, 8, 8)
    y = (x + 0.1).clamp(0, 1)
    expected = [peak_signal_noise_ratio(y[i].numpy(), x[i].numpy(), data_range=1.0) for i in range(2)]
    assert nc.psnr(y, x).tolist() == pytest.approx(expected, abs=1e-6)


def _skimage_ssim(a, b):
    return structural_similarity(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy(), gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1)


@pytest.mark.parametrize("kind", ["random", "natural"])
def test_ssim_equals_skimage(kind):
    torch.manual_seed(0)
    if kind == "random":
        a = torch.randint(0, 256, (2, 3, 40, 57), dtype=torch.uint8)
        b = (a.int() + torch.randint(-40, 41, a.shape)).clamp(0, 255).to(torch.uint8)
    else:
        x = torch.cat([photo(96, 128, 0), photo(96, 128, 1)])
        a = _u8(x)
        b = _u8(F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False))  # blurred
    ours = nc.ssim(b, a)
    ref = [_skimage_ssim(b[i], a[i]) for i in range(a.shape[0])]
    assert ours.tolist() == pytest.approx(ref, abs=1e-6)
    assert all(r < 0.99 for r in ref)  # a real difference to measure


def test_ssim_identical_is_one_and_float_input_uses_unit_range():
    x = photo(32, 32)
    assert nc.ssim(x, x).item() == pytest.approx(1.0)
    y = (x * 0.9).clamp(0, 1)
    ref = structural_similarity(y[0].permute(1, 2, 0).double().numpy(), x[0].permute(1, 2, 0).double().numpy(),
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
                                channel_axis=-1)
    assert nc.ssim(y, x).item() == pytest.approx(ref, abs=1e-6)
    with pytest.raises(ValueError, match="at least 11"):
        nc.ssim(torch.rand(1, 3, 8, 30), torch.rand(1, 3, 8, 30))


def _official_ssim3d(a: np.ndarray, b: np.ndarray, max_value: float) -> float:
    """Direct form of the official 3-D SSIM: the full 11x11x11 kernel over an (H, W, C) volume, replicate pad 5."""
    g = np.exp(-0.5 * (np.arange(-5, 6) / 1.5) ** 2)
    g /= g.sum()
    kernel = torch.from_numpy(np.einsum("i,j,k->ijk", g, g, g))[None, None]

    def blur(v):
        t = torch.from_numpy(v)[None, None]
        return F.conv3d(F.pad(t, (5,) * 6, mode="replicate"), kernel)[0, 0].numpy()

    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
    ma, mb = blur(a), blur(b)
    saa, sbb, sab = blur(a * a) - ma**2, blur(b * b) - mb**2, blur(a * b) - ma * mb
    return float((((2 * ma * mb + c1) * (2 * sab + c2)) / ((ma**2 + mb**2 + c1) * (saa + sbb + c2))).mean())


def test_ssim3d_matches_direct_official_form():
    x = photo(48, 64, 2)
    a = _u8(x)
    b = _u8((x + 0.05 * torch.randn_like(x, generator=torch.Generator().manual_seed(0))).clamp(0, 1))
    ours = nc.ssim3d(b, a).item()
    ref = _official_ssim3d(b[0].permute(1, 2, 0).numpy(), a[0].permute(1, 2, 0).numpy(), 255.0)
    assert ours == pytest.approx(ref, abs=1e-7)
    assert ours != pytest.approx(nc.ssim(b, a).item(), abs=1e-3)  # the two SSIMs are different figures


def test_psnr_loss_is_negative_psnr():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 16)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    assert nc.psnr_loss(y, x).item() == pytest.approx(-nc.psnr(y, x).mean().item(), abs=1e-4)


def test_quantize_rounds_and_clamps():
    x = torch.tensor([-0.5, 0.0, 0.5 / 255, 1.4 / 255, 0.5, 1.0, 3.0])
    assert nc.quantize(x).tolist() == [0, 0, 0, 1, 128, 255, 255]
