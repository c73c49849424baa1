"""TLC, the Test-time Local Converter (Chu et al., ECCV 2022), with the official semantics.

A model trained on 256-px crops pools every SCA over a 256-px window. At test time a
1280x720 frame pooled globally sees other statistics; TLC replaces each global mean by
the mean over a local window of the training-time extent:

    kernel(level) = feature size at that level during training * base // train,
    base = int(train * base_ratio)            (384, 192, 96, 48, 24 for train 256)

The window is clamped to the map (k1 = min(h, kh), k2 = min(w, kw)), the mean is taken
over every k1 x k2 window with stride 1 and no padding, and the result is
replicate-padded back to h x w (left/top ``d // 2``, right/bottom ``(d + 1) // 2``).

Windows are summed with 1-D cumulative sums, first along H, then (on the map transposed, now
H - k1 + 1 rows tall) along the former W: O(1) per output whatever the kernel (a pooling over
384x384 windows costs more than the whole network), smaller magnitudes than a 2-D integral
image, and always in FP32 (in FP16 the sums pass 65504 and give inf/NaN). Every cumulative sum
runs along the second-to-last axis: onnxruntime's CumSum is ~10x slower along the innermost
axis (96 vs 10 ms on 32x720x1280), and the transposed mean is what the deploy form of the
attention (``export.fold``) feeds its 1x1 conv before transposing back. The same code serves
two exportable forms: with symbolic shapes (torch.export dynamic dims) the bounds stay symbolic;
with a fixed shape every window size and slice bound is a Python int, so the graph carries them
as constants.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DEFAULT_BASE_RATIO, DEFAULT_TRAIN_SIZE, ModelConfig, padded_size
from .family import model_classes
from .layers import GlobalAvgPool2d, global_mean
from .model import NAFNet


def _sym_min(a, b):
    # torch.sym_min keeps min() symbolic under torch.export instead of guarding on one branch.
    return torch.sym_min(a, b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else min(a, b)


def covers_map(x: torch.Tensor, kernel: tuple[int, int]) -> bool:
    """True when the shape is concrete and the window covers the whole map: the local mean is the global one."""
    h, w = x.shape[-2:]
    return isinstance(h, int) and isinstance(w, int) and h <= kernel[0] and w <= kernel[1]


def window_means_t(x: torch.Tensor, kernel: tuple[int, int]) -> tuple[torch.Tensor, tuple]:
    """FP32 means of ``x`` (N, C, H, W) over every clamped k1 x k2 window, stride 1, no padding.

    Returns the means *transposed*, (N, C, W - k2 + 1, H - k1 + 1), and the replicate padding
    (left, right, top, bottom) that brings the un-transposed means back to H x W.
    """
    h, w = x.shape[-2:]
    k1, k2 = _sym_min(h, kernel[0]), _sym_min(w, kernel[1])
    s = F.pad(x.float().cumsum(-2), (0, 0, 1, 0))  # (N, C, H + 1, W), s[..., i, :] = sum of x[..., :i, :]
    s = s[..., k1:, :] - s[..., : h + 1 - k1, :]  # (N, C, H - k1 + 1, W): sums over k1 rows
    s = s.transpose(-1, -2)  # (N, C, W, H - k1 + 1)
    s = F.pad(s.cumsum(-2), (0, 0, 1, 0))
    s = s[..., k2:, :] - s[..., : w + 1 - k2, :]  # (N, C, W - k2 + 1, H - k1 + 1)
    return s / (k1 * k2), _border(k1, k2)


def _border(k1, k2) -> tuple:
    """Replicate padding (left, right, top, bottom) from the window grid back to the map: d // 2 before."""
    dh, dw = k1 - 1, k2 - 1  # = h - out_h, w - out_w
    return (dw // 2, (dw + 1) // 2, dh // 2, (dh + 1) // 2)


def band_means(x: torch.Tensor, kernel: tuple[int, int]) -> tuple[torch.Tensor, tuple]:
    """FP32 means of ``x`` (N, C, H, W) over every clamped k1 x k2 window, (N, C, H - k1 + 1, W - k2 + 1),
    and the replicate padding back to H x W, like :func:`window_means_t` but not transposed.

    The windows are summed directly as ``B_h @ x @ B_w^T`` with band matrices of ``1/k``:
    (H - k1 + 1) * (1 + (W - k2 + 1) / H) multiply-adds per element, no scans. Cheaper than the
    cumulative sums on small maps (the deep levels); needs a concrete shape.
    """
    h, w = x.shape[-2:]
    k1, k2 = min(h, kernel[0]), min(w, kernel[1])
    return _band(h, k1, x.device) @ x.float() @ _band(w, k2, x.device).T, _border(k1, k2)


def _band(n: int, k: int, device) -> torch.Tensor:
    """(n - k + 1, n) matrix whose row i is 1/k on columns i .. i + k - 1."""
    i = torch.arange(n - k + 1, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return ((j >= i) & (j < i + k)).float() / k


def local_mean(x: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """TLC local mean of ``x`` (N, C, H, W) over ``kernel`` = (kh, kw) windows; same shape out, same dtype.

    When the shape is concrete and the window covers the whole map this is exactly the global
    mean (returned as (N, C, 1, 1), which broadcasts like the official ``adaptive_avg_pool2d``).
    """
    if covers_map(x, kernel):
        return global_mean(x)
    means_t, pad = window_means_t(x, kernel)
    return F.pad(means_t.transpose(-1, -2).to(x.dtype), pad, mode="replicate")


class LocalAvgPool2d(nn.Module):
    """Drop-in for the SCA's global pooling: the TLC local mean with a fixed kernel.

    Args:
        kernel: (kh, kw) window at this level, fixed from the training size.
    """

    def __init__(self, kernel: tuple[int, int]):
        super().__init__()
        self.kernel = (int(kernel[0]), int(kernel[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_mean(x, self.kernel)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}"


def tlc_kernels(
    config: ModelConfig, train_size: int | tuple[int, int] = DEFAULT_TRAIN_SIZE, base_ratio: float = DEFAULT_BASE_RATIO
) -> list[tuple[int, int]]:
    """TLC kernels per level, encoder level 0 first and the middle level last.

    Follows the official ``Local_Base.convert``: features are measured on a padded
    ``train_size`` input, ``base = int(train * base_ratio)`` and ``kernel = feature * base // train``.
    Decoder level i uses encoder level i's kernel (same feature size).
    """
    th, tw = (train_size, train_size) if isinstance(train_size, int) else train_size
    if th < 1 or tw < 1:
        raise ValueError(f"train_size must be positive, got {train_size}")
    if base_ratio <= 0:
        raise ValueError(f"base_ratio must be positive, got {base_ratio}")
    bh, bw = int(th * base_ratio), int(tw * base_ratio)
    fh, fw = padded_size(th, config.pad_multiple), padded_size(tw, config.pad_multiple)
    kernels = []
    for level in range(len(config.enc_blk_nums) + 1):
        h, w = fh >> level, fw >> level
        kernels.append((h * bh // th, w * bw // tw))
    return kernels


def convert_to_tlc(
    model: NAFNet, train_size: int | tuple[int, int] = DEFAULT_TRAIN_SIZE, base_ratio: float = DEFAULT_BASE_RATIO
) -> NAFNet:
    """A copy of ``model`` whose every SCA pooling is the TLC local mean; ``model`` is left untouched.

    Args:
        model: a NAFNet with global SCA pooling.
        train_size: crop size the model was trained on (int or (h, w)).
        base_ratio: TLC window / training feature size (official 1.5).
    """
    if not isinstance(model, model_classes()):
        raise TypeError(f"convert_to_tlc expects a NAFNet, got {type(model).__name__}")
    kernels = tlc_kernels(model.config, train_size, base_ratio)
    new = copy.deepcopy(model)
    for stage, level in new.tlc_sites():
        for block in stage:
            if any(isinstance(m, LocalAvgPool2d) for m in block.modules()):
                raise ValueError("model already has TLC pooling; convert the original model instead")
            if not _swap_pools(block, LocalAvgPool2d(kernels[level])):
                raise ValueError("model is already folded for deployment; apply TLC first, then fold")
    new.tlc = {"train_size": train_size, "base_ratio": base_ratio, "kernels": kernels}
    return new


def _swap_pools(block: nn.Module, pool: LocalAvgPool2d) -> int:
    """Replaces every global SCA pooling inside ``block`` (any block kind) by ``pool``; returns how many."""
    swapped = 0
    for module in list(block.modules()):
        for name, child in module.named_children():
            if isinstance(child, GlobalAvgPool2d):
                setattr(module, name, copy.deepcopy(pool))
                swapped += 1
    return swapped


def is_tlc(model: nn.Module) -> bool:
    """True for a model :func:`convert_to_tlc` made (also once folded for deployment, which keeps ``tlc``)."""
    return getattr(model, "tlc", None) is not None or any(isinstance(m, LocalAvgPool2d) for m in model.modules())
