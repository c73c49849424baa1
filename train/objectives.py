"""Losses and the learning-rate schedule: pure functions, pinned by unit tests.

Losses take ``(N, C, H, W)`` float tensors and return a scalar to minimise:

- ``psnr``: the official NAFNet PSNR loss (``nafnet_core.psnr_loss``, = -PSNR of each image, batch mean);
- ``l1``: mean absolute error;
- ``charbonnier``: ``mean(sqrt((pred - gt)^2 + eps^2))`` with eps = 1e-3;
- ``charfreq``: FNAFNet's official ``CharFreqLoss``: charbonnier + 0.01 * mean of the modulus of
  ``rfft2(pred) - rfft2(gt)`` (per image and channel over H x W, norm 'backward');
- ``l1freq``: AdaRevD's official ``FreqLoss``: L1 + 0.01 * the same spectral term.

AdaRevD models (``decoder="adarevd"``) output every exit depth; the loss is the mean over the depths of the
loss of each (:func:`depth_mean_loss`, the official ``FreqLoss`` on the list of sub-decoder outputs).

Multi-head models (``heads > 1``) are trained on their best output: :func:`best_output` picks, per image,
the output closest to the target (MSE), and the loss is computed on it. With ``psnr`` this is exactly the
official CascadedGaze ``MultiHeadPSNRLoss``, ``(10/ln10) * mean_batch(ln(min_outputs MSE + 1e-8))``, with
the same gradient (the minimum routes it to the chosen output); a single-head model has one output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from nafnet_core.metrics import psnr_loss


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).abs().mean()


def charbonnier_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    return torch.sqrt((pred - target).pow(2) + eps * eps).mean()


#: Weight of the frequency term of ``charfreq`` (the official CharFreqLoss, loss_weight 1, scales it by 0.01).
FREQ_LOSS_WEIGHT = 0.01


def charfreq_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """FNAFNet's training loss: Charbonnier + ``FREQ_LOSS_WEIGHT`` * mean |rfft2(pred) - rfft2(target)|.

    The spectra are taken in FP32 (``torch.fft`` has no bf16/fp16 kernels on CPU); training only, never exported.
    """
    diff = torch.fft.rfft2(pred.float()) - torch.fft.rfft2(target.float())
    return charbonnier_loss(pred, target) + FREQ_LOSS_WEIGHT * diff.abs().mean()
def l1freq_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """AdaRevD's training loss (official ``FreqLoss``): L1 + ``FREQ_LOSS_WEIGHT`` * mean |rfft2 difference|."""
    diff = torch.fft.rfft2(pred.float()) - torch.fft.rfft2(target.float())
    return l1_loss(pred, target) + FREQ_LOSS_WEIGHT * diff.abs().mean()


def depth_mean_loss(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], outs: torch.Tensor,
                    target: torch.Tensor) -> torch.Tensor:
    """The mean over the K outputs of ``outs`` (N, K, C, H, W) of ``loss_fn(output, target)`` (AdaRevD)."""
    return sum(loss_fn(outs[:, k].float(), target) for k in range(outs.shape[1])) / outs.shape[1]


def best_output(outs: torch.Tensor, target: torch.Tensor | None = None, default: int = 0) -> torch.Tensor:
    """Per image, the output of ``outs`` (N, K, C, H, W) with the smallest MSE to ``target`` (N, C, H, W):
    (N, C, H, W), differentiable through the chosen outputs. Without a target: output ``default``.

    Args:
        outs: every output of the model (``model(x, all_heads=True)``).
        target: the sharp batch; None to take ``default``.
        default: the output taken without a target (the deployment head).
    """
    if outs.shape[1] == 1:
        return outs[:, 0]
    if target is None:
        return outs[:, default]
    with torch.no_grad():
        mse = (outs.detach().float() - target.float().unsqueeze(1)).pow(2).flatten(2).mean(2)  # (N, K)
        chosen = mse.argmin(1)
    return outs[torch.arange(outs.shape[0], device=outs.device), chosen]


LOSS_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "psnr": psnr_loss,
    "l1": l1_loss,
    "charbonnier": charbonnier_loss,
    "charfreq": charfreq_loss,
    "l1freq": l1freq_loss,
}


def lr_at(step: int, *, lr: float, lr_min: float, total_steps: int, schedule: str = "cosine", warmup: int = 0,
          steps_per_epoch: float = 1.0, total_epochs: int = 1) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Args:
        step: the step about to be taken.
        lr / lr_min: peak and final rate.
        total_steps: steps of the whole run.
        schedule: ``cosine`` (per step, the official TrueCosineAnnealingLR: ``lr_min`` reached at
            ``total_steps``), ``cosine_epoch`` (the rate changes once per epoch, like torch's
            CosineAnnealingLR stepped per epoch with ``T_max = total_epochs``), or ``constant``.
        warmup: linear warm-up steps from ``lr / warmup`` to ``lr``; the cosine then spans the remaining steps.
        steps_per_epoch: training pairs / global batch (fractional allowed).
        total_epochs: epochs of the run (``cosine_epoch``).
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, total_steps - warmup)
        t = min(1.0, (step - warmup) / span)
    elif schedule == "cosine_epoch":
        t = min(1.0, math.floor(step / steps_per_epoch) / max(1, total_epochs))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * t))
