"""Training speed options, resolved per device: memory format, torch.compile, mixed precision, optimizer kernels.

Four config keys choose them (``auto`` takes the measured default of the device type, :data:`AUTO`):

- ``channels_last``: on | off | auto. Model weights and inputs in NHWC memory order.
- ``compile``: on | off | auto. ``torch.compile`` of the model (the optimizer stays eager); the first steps
  pay the compilation, which ``train --bench`` reports apart from the throughput.
- ``reuse_memory``: on | off | auto. Keep freed CPU memory in the process for the next tensors
  (:func:`nafnet_core.process.keep_freed_memory`): glibc otherwise gives every tensor above 32 MB fresh
  pages from the kernel, which fault in, zeroed, on first touch, in every op of every step. At width32's
  full-resolution level (batch 4 of 256², 34-67 MB maps) that made memory-bound ops 3-4x slower (a
  multiply of two 4x64x256x256 maps: 51.7 ms, 14.8 ms with the heap) and the whole step 1.21x slower; the
  heap costs 9 % more peak RSS (BENCHMARKS.md, "Training step vs the official NAFNet step").
  Process-wide; CUDA tensors have their own caching allocator.
- ``amp``: bf16 | fp16 | off | auto. Autocast of the forward; the loss, the LayerNorm statistics and the
  pooling means stay FP32. On CPU only bf16 (fp16 autocast needs a grad scaler that is CUDA-only here).

The optimizer always uses the fused AdamW/Adam kernel where the parameters' device has one (CPU and CUDA
in torch 2.13), else the multi-tensor (``foreach``) one; all three give the same update up to FP32 rounding.
Gradient clipping uses the multi-tensor norm on every device. Measured for width32's 664 parameters on one
CPU thread (load ~12): AdamW step 1296 ms (per-tensor loop, torch's CPU default), 1228 ms (foreach),
595 ms (fused); clipping 427 ms per tensor, 305 ms foreach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from nafnet_core.errors import UserError
from nafnet_core.process import keep_freed_memory

#: What ``auto`` means per device type; measured with ``python cli.py train --bench`` (BENCHMARKS.md,
#: "Throughput at 256² crops, batch 4"). CUDA could not be measured here: it keeps the previous behaviour (bf16
#: autocast where supported, else fp16) and leaves the other options off.
AUTO: dict[str, dict[str, str]] = {
    "cpu": {"channels_last": "off", "compile": "off", "amp": "off", "reuse_memory": "on"},
    "cuda": {"channels_last": "off", "compile": "off", "amp": "auto", "reuse_memory": "off"},
}
SPEED_KEYS = ("channels_last", "compile", "amp", "reuse_memory")


@dataclass(frozen=True)
class SpeedPlan:
    """The options of one run, resolved for its device."""

    channels_last: bool
    compile: bool
    amp_dtype: torch.dtype | None
    reuse_memory: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        amp = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        parts = [amp] + [name for name, on in (("channels_last", self.channels_last), ("compile", self.compile),
                                               ("reuse_memory", self.reuse_memory)) if on]
        return "+".join(parts)


def resolve(cfg, device: torch.device) -> SpeedPlan:
    """``cfg``'s speed keys for ``device`` (``auto`` -> :data:`AUTO`).

    Args:
        cfg: a :class:`~train.config.TrainConfig`.
        device: where the model trains.
    """
    auto = AUTO.get(device.type, AUTO["cpu"])
    pick = {k: (auto[k] if getattr(cfg, k) == "auto" else getattr(cfg, k)) for k in SPEED_KEYS}
    return SpeedPlan(channels_last=pick["channels_last"] == "on", compile=pick["compile"] == "on",
                     amp_dtype=_amp_dtype(pick["amp"], device), reuse_memory=pick["reuse_memory"] == "on")


def apply_process_settings(plan: SpeedPlan) -> None:
    """What the plan sets for the whole process (before the model is built): ``reuse_memory`` ->
    :func:`nafnet_core.process.keep_freed_memory`."""
    if plan.reuse_memory:
        keep_freed_memory()


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if amp == "fp16":
        raise UserError(f"amp=fp16 is CUDA-only (it needs a CUDA grad scaler); on {device.type} use amp=bf16 or off")
    return torch.bfloat16 if amp == "bf16" else None


def autocast(plan: SpeedPlan, device: torch.device):
    """The forward's autocast context (a disabled one when the plan has no mixed precision)."""
    return torch.autocast(device.type, dtype=plan.amp_dtype or torch.float32, enabled=plan.amp_dtype is not None)


def prepare_model(model: nn.Module, plan: SpeedPlan) -> nn.Module:
    """Puts ``model``'s weights in the plan's memory format (in place); returns ``model``."""
    if plan.channels_last:
        model.to(memory_format=torch.channels_last)
        with torch.no_grad():  # (1, C, 1, 1) scales (beta, gamma) get their gradients in NCHW strides from
            for p in model.parameters():  # a sum: keep them NCHW so DDP's bucket views match the gradients
                if p.dim() == 4 and p.shape[0] == 1 and p.shape[2:] == (1, 1):
                    p.data = p.data.clone(memory_format=torch.contiguous_format)
    return model


def compile_model(net: nn.Module, plan: SpeedPlan) -> nn.Module:
    """``torch.compile(net)`` when the plan says so (wrap DDP first, then compile), else ``net``."""
    return torch.compile(net) if plan.compile else net


def to_input(x: torch.Tensor, plan: SpeedPlan) -> torch.Tensor:
    """A batch in the plan's memory format."""
    return x.contiguous(memory_format=plan.memory_format)


def make_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW/Adam with ``cfg``'s settings, on the fused kernel where the parameters' device has one.

    Args:
        cfg: a :class:`~train.config.TrainConfig` (optimizer, lr, betas, weight_decay).
        model: the parameters' owner.
    """
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    params = [p for p in model.parameters() if p.requires_grad]
    devices = {p.device.type for p in params}
    fused = devices <= set(_get_fused_kernels_supported_devices()) and all(p.dtype.is_floating_point for p in params)
    kernel = {"fused": True} if fused else {"foreach": True}
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **kernel)


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` at ``max_norm`` (0 = only measure) with the multi-tensor kernels.

    torch uses them by default on CUDA only; on CPU they measured 305 ms against 427 ms per tensor for
    width32's 664 gradients (1 thread).
    """
    return nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf, foreach=True)
