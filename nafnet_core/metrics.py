"""Image-quality metrics in torch, batched, on CPU or GPU.

All functions take ``(N, C, H, W)`` or ``(C, H, W)`` tensors and return one value per image
(shape ``(N,)``). ``data_range`` defaults to 255 for uint8 input and 1.0 otherwise. The
project's evaluations feed them uint8-rounded images (:func:`quantize`), as docs/DESIGN.md §6 (Metrics) says.

- :func:`psnr`: 10 log10(range^2 / MSE) over all channels.
- :func:`ssim`: the standard SSIM: Gaussian window 11, sigma 1.5, per channel, averaged over
  the valid region; equal to scikit-image's ``structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, channel_axis=-1)``.
- :func:`ssim3d`: the official NAFNet variant: one 11x11x11 Gaussian over (H, W, C) with
  replicate padding (the figure the paper's 0.9606 / 0.9668 use).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float image -> the uint8 image it is saved as (clamp, x255, round half to even)."""
    return (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)


def _prepare(pred: torch.Tensor, target: torch.Tensor,
             data_range: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.dim() == 3:
        pred, target = pred[None], target[None]
    if pred.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) or (C, H, W) tensors, got shape {tuple(pred.shape)}")
    if data_range is None:
        data_range = 255.0 if pred.dtype == torch.uint8 else 1.0
    return pred.double(), target.double(), float(data_range)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """PSNR in dB per image (inf where the images are identical)."""
    pred, target, r = _prepare(pred, target, data_range)
    mse = (pred - target).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(r * r / mse)


def _gaussian_1d(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = SSIM_WINDOW // 2
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    g = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return g / g.sum()


def _blur_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of every (N, C) plane, 'valid' region only."""
    n, c, h, w = x.shape
    x = x.reshape(n * c, 1, h, w)
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    x = F.conv2d(x, g.view(1, 1, 1, -1))
    return x.reshape(n, c, x.shape[-2], x.shape[-1])


def _ssim_map(x: torch.Tensor, y: torch.Tensor, r: float, blur) -> torch.Tensor:
    c1, c2 = (SSIM_K1 * r) ** 2, (SSIM_K2 * r) ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """Standard SSIM per image: mean over channels of the mean SSIM over the valid region."""
    pred, target, r = _prepare(pred, target, data_range)
    if min(pred.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(pred.shape[-2:])}")
    g = _gaussian_1d(pred.dtype, pred.device)
    return _ssim_map(pred, target, r, lambda t: _blur_valid(t, g)).flatten(1).mean(1)


def ssim3d(pred: torch.Tensor, target: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """The official NAFNet SSIM: an 11x11x11 Gaussian across H, W and C with replicate padding."""
    pred, target, r = _prepare(pred, target, data_range)
    g = _gaussian_1d(pred.dtype, pred.device)
    pad = SSIM_WINDOW // 2

    def blur(t: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) treated as a (C, H, W) volume per image
        v = F.pad(t[:, None], (pad, pad, pad, pad, pad, pad), mode="replicate")  # (N, 1, C+10, H+10, W+10)
        v = F.conv3d(v, g.view(1, 1, -1, 1, 1))
        v = F.conv3d(v, g.view(1, 1, 1, -1, 1))
        v = F.conv3d(v, g.view(1, 1, 1, 1, -1))
        return v[:, 0]

    return _ssim_map(pred, target, r, blur).flatten(1).mean(1)


def psnr_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The official PSNR loss: (10 / ln 10) * mean over the batch of ln(MSE_CHW + eps), i.e. -PSNR."""
    mse = (pred - target).pow(2).flatten(1).mean(1)
    return (10.0 / math.log(10.0)) * torch.log(mse + eps).mean()
