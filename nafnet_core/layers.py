"""The building blocks below every block kind: channel LayerNorm, gates, channel pooling, NAFBlock, and the
branch/residual helpers the block kinds share (``nafnet_core.model`` assembles the U from them; ``cgnet`` and
``fnafnet`` build their block kinds on them).

Mixed precision: the channel LayerNorm and the pooling reductions always compute in FP32, whatever the
module's dtype (a residual stream reaching |x| ~ 175 makes the channel sums overflow FP16).

A block with ``fp32_stream = True`` (set by ``export.fp16_stream`` on a half model whose residual stream
would overflow FP16) reads its input as FP32, hands the convs their own dtype, casts the conv3/conv5
outputs to FP32 for the two residual adds and returns FP32. Without the flag nothing changes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def eager_training() -> bool:
    """True where the training fast paths apply: gradients on, in eager mode (not compiling, tracing or
    exporting: the compiler and the exporters see the plain ops, which they fuse or fold themselves)."""
    return torch.is_grad_enabled() and not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                                            or torch.onnx.is_in_onnx_export())


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    """FP32 for half/bf16/FP32 tensors, FP64 for FP64 ones (gradient checks)."""
    return torch.promote_types(x.dtype, torch.float32)


class _LayerNorm2dFunction(torch.autograd.Function):
    """Channel LayerNorm with a hand-written backward, in FP32 whatever the input dtype.

    Autograd of the plain form keeps the upcast, the centred input and the normalised map alive and runs
    eight ops backwards; this keeps one full-size tensor: the normalised ``y`` (FP32 input) or the input
    itself (half/bf16 input: half the bytes of an FP32 ``y``, recomputed in the backward), plus the
    per-pixel ``1/std``. With ``g = dL/dout * weight``:
    ``dx = (g - mean_C(g) - y * mean_C(g * y)) / std``, ``dweight = sum_NHW(dL/dout * y)``,
    ``dbias = sum_NHW(dL/dout)``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> torch.Tensor:  # (N, C, H, W)
        xf = x.to(_stats_dtype(x))
        # Two passes (mean, then the mean square of the centred map), as in :meth:`LayerNorm2d.reference`:
        # torch.var_mean over the channel dim of an NCHW map was 15x slower on CPU at (8, 8, 64, 64) and
        # 1.6x at (4, 32, 256, 256), a quarter of a `tiny` training step (BENCHMARKS.md, "Training step
        # vs the official NAFNet step").
        mu = xf.mean(1, keepdim=True)  # (N, 1, H, W)
        y = xf - mu
        rstd = y.square().mean(1, keepdim=True).add_(eps).rsqrt_()
        y.mul_(rstd)
        ctx.keeps_input = xf is not x  # half/bf16 input: keep it, not the 2x larger FP32 y
        ctx.save_for_backward(x if ctx.keeps_input else y, mu if ctx.keeps_input else None, rstd, weight)
        if weight is not None:
            c = x.shape[1]
            y = torch.addcmul(bias.to(y.dtype).view(1, c, 1, 1), y, weight.to(y.dtype).view(1, c, 1, 1))
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved, mu, rstd, weight = ctx.saved_tensors
        y = (saved.to(rstd.dtype) - mu).mul_(rstd) if ctx.keeps_input else saved
        go = grad_out.to(rstd.dtype)
        g = go if weight is None else go * weight.to(go.dtype).view(1, -1, 1, 1)
        dx = (g - g.mean(1, keepdim=True)).addcmul_(y, (g * y).mean(1, keepdim=True), value=-1).mul_(rstd)
        dweight = dbias = None
        if weight is not None:
            dweight = (go * y).sum((0, 2, 3)).to(weight.dtype) if ctx.needs_input_grad[1] else None
            dbias = go.sum((0, 2, 3)).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return dx.to(grad_out.dtype), dweight, dbias, None


class LayerNorm2d(nn.Module):
    """LayerNorm over channels at every pixel (biased variance), per-channel affine; statistics in FP32.

    Training (:func:`eager_training`) uses a hand-written backward (:class:`_LayerNorm2dFunction`); inference,
    ``torch.compile``, export and tracing use the plain ops of :meth:`reference`, which the exporters and
    the compiler see through.

    Args:
        channels: number of channels.
        eps: added to the variance.
        affine: learn a per-channel scale and shift (False once folded into the next conv).
    """

    def __init__(self, channels: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if affine else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        if eager_training():
            return _LayerNorm2dFunction.apply(x, self.weight, self.bias, self.eps)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain-ops form (autograd differentiates it; exporters and the compiler trace it)."""
        dtype = x.dtype
        x = x.to(_stats_dtype(x))
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) / (var + self.eps).sqrt()
        if self.weight is not None:
            y = self.weight.to(x.dtype).view(1, -1, 1, 1) * y + self.bias.to(x.dtype).view(1, -1, 1, 1)
        return y.to(dtype)


class Gate(nn.Module):
    """Splits channels in halves (a, b) and returns act(a) * b; ``simple`` is NAFNet's SimpleGate a * b.

    Args:
        kind: one of ``simple``, ``reglu``, ``geglu``, ``swiglu``.
    """

    _ACTS = {"simple": None, "reglu": F.relu, "geglu": F.gelu, "swiglu": F.silu}

    def __init__(self, kind: str = "simple"):
        super().__init__()
        self.kind = kind
        self.act = self._ACTS[kind]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 2C, H, W) -> (N, C, H, W)
        a, b = x.chunk(2, dim=1)
        return (a if self.act is None else self.act(a)) * b

    def extra_repr(self) -> str:
        return self.kind


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over H and W, computed in FP32, in ``x``'s dtype: (N, C, H, W) -> (N, C, 1, 1)."""
    return x.float().mean((2, 3), keepdim=True).to(x.dtype)


class GlobalAvgPool2d(nn.Module):
    """Mean over H and W, computed in FP32 (the official ``nn.AdaptiveAvgPool2d(1)``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, 1, 1)
        return global_mean(x)


def to_branch(x: torch.Tensor, conv: nn.Conv2d, fp32_stream: bool) -> torch.Tensor:
    """A LayerNorm output on its way into ``conv``: in the conv's dtype when the stream is kept in FP32."""
    return x.to(conv.weight.dtype) if fp32_stream else x


def to_stream(x: torch.Tensor, fp32_stream: bool) -> torch.Tensor:
    """A branch output (conv3/conv5) on its way into the residual add: FP32 when the stream is kept in FP32."""
    return x.float() if fp32_stream else x


class NAFBlock(nn.Module):
    """NAFNet's block: a gated depthwise branch with channel attention, then a gated FFN.

    Args:
        c: channels in and out.
        dw_expand: expansion of the depthwise branch.
        ffn_expand: expansion of the feed-forward branch.
        drop_out_rate: dropout after conv3 and conv5.
        gate: gate kind (see :class:`Gate`).
    """

    def __init__(self, c: int, dw_expand: int = 2, ffn_expand: int = 2, drop_out_rate: float = 0.0,
                 gate: str = "simple"):
        super().__init__()
        dw = c * dw_expand
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        # Simplified Channel Attention: x * conv1x1(avgpool(x)). TLC swaps sca[0] for a local mean.
        self.sca = nn.Sequential(GlobalAvgPool2d(), nn.Conv2d(dw // 2, dw // 2, 1))
        add_ffn_and_residual_parts(self, c, ffn_expand, drop_out_rate, gate)

    #: Residual stream in FP32 inside a half model (see the module docstring); a class default, set per block.
    fp32_stream = False

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        s = self.fp32_stream
        inp = inp.float() if s else inp
        x = self.conv2(self.conv1(to_branch(self.norm1(inp), self.conv1, s)))
        x = self.sg(x)
        x = x * self.sca(x)
        return residual_and_ffn(self, inp, x, s, conv=self.conv3)


def add_ffn_and_residual_parts(block: nn.Module, c: int, ffn_expand: int, drop_out_rate: float, gate: str) -> None:
    """Adds to ``block`` the parts every NAFNet-family block shares after its first branch's own convs, in the
    official creation order (so seeded initialisations match): the gate ``sg``, the FFN ``conv4``/``conv5``, both
    LayerNorms, both dropouts and the residual scales ``beta``/``gamma`` (zero: a fresh block is the identity)."""
    ffn = c * ffn_expand
    block.sg = Gate(gate)
    block.conv4 = nn.Conv2d(c, ffn, 1)
    block.conv5 = nn.Conv2d(ffn // 2, c, 1)
    block.norm1 = LayerNorm2d(c)
    block.norm2 = LayerNorm2d(c)
    block.dropout1 = nn.Dropout(drop_out_rate) if drop_out_rate > 0 else nn.Identity()
    block.dropout2 = nn.Dropout(drop_out_rate) if drop_out_rate > 0 else nn.Identity()
    block.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
    block.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))


def scaled_branch(x: torch.Tensor, scale: torch.Tensor | None, dropout: nn.Module,
                  conv: nn.Conv2d | None = None) -> torch.Tensor:
    """``dropout(conv(x)) * scale`` (``conv`` None: ``dropout(x) * scale``; ``scale`` None once folded for deploy).

    In eager training (:func:`eager_training`) with a conv, the per-channel scale goes into the conv's weight
    and bias instead, ``conv(x; W * scale, b * scale)``, as ``export.fold`` does for deployment (dropout
    commutes with a per-channel scale). The product is the same up to FP32 rounding and so are the
    gradients, but autograd no longer keeps the conv's full-size output for the scale's gradient and the
    step runs one full-size multiply fewer: two maps of c channels per block (BENCHMARKS.md, "Training
    step vs the official NAFNet step").
    """
    if isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and scale is not None and eager_training():
        s = scale.reshape(-1)
        w = conv.weight * s.to(conv.weight.dtype).view(-1, *[1] * (conv.weight.dim() - 1))
        b = None if conv.bias is None else conv.bias * s.to(conv.bias.dtype)
        return dropout(F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups))
    x = dropout(x if conv is None else conv(x))
    return x if scale is None else x * scale


def residual_and_ffn(block: nn.Module, inp: torch.Tensor, x: torch.Tensor, fp32_stream: bool,
                     conv: nn.Conv2d | None = None) -> torch.Tensor:
    """The second half of a NAFNet-family block (parts from :func:`add_ffn_and_residual_parts`): the first branch's
    output joins the stream, ``y = inp + beta * dropout1(conv(x))``, then the gated FFN's does,
    ``y + gamma * dropout2(conv5(sg(conv4(norm2(y)))))``. ``conv`` is the first branch's last conv (``x`` its
    input; None when ``x`` is already the branch's output); ``beta``/``gamma`` are None once folded. Both scales
    go through :func:`scaled_branch`."""
    y = inp + to_stream(scaled_branch(x, block.beta, block.dropout1, conv), fp32_stream)
    x = block.sg(block.conv4(to_branch(block.norm2(y), block.conv4, fp32_stream)))
    return y + to_stream(scaled_branch(x, block.gamma, block.dropout2, block.conv5), fp32_stream)


class BlockSite(NamedTuple):
    """Where a block sits in the U: ``stage`` ``enc`` / ``mid`` / ``dec``, ``level`` 0 at full resolution
    (the middle is level ``len(enc_blk_nums)``; a decoder level has its encoder level's number), and
    ``index`` within that stage's level."""

    stage: str
    level: int
    index: int
