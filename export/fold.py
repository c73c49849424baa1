"""Deploy-time rewrites: the same arithmetic as the NAFNet blocks, in the form that runs fastest exported.

Each NAFBlock (eval mode, dropout inactive) becomes a :class:`DeployBlock`:

* Folding. ``norm1``'s affine ``w * n + b`` feeds the 1x1 ``conv1``:
  ``W (w*n + b) + c = (W diag(w)) n + (W b + c)``, so ``conv1.weight[:, i] *= w[i]``, ``conv1.bias += W b``
  and the norm keeps only the normalisation. Same for ``norm2`` -> ``conv4``. ``y = inp + conv3(x) * beta``:
  ``conv3.weight[o] *= beta[o]``, ``conv3.bias[o] *= beta[o]``, beta removed. Same for ``gamma`` -> ``conv5``.
  Per block this removes 6 broadcast Mul/Add over full feature maps.
* Split gates. ``gate(conv2(conv1(n)))`` splits 2C channels into halves ``a, b`` and returns ``act(a) * b``.
  Output channels of a 1x1 or depthwise conv are independent, so the conv pair is split into one pair per
  half and the gate multiplies their outputs: no Split node, and every op between the convs keeps
  onnxruntime's blocked (NCHWc) layout instead of reordering to NCHW and back.
* Channel means as MatMuls. The bare norm (:class:`ChannelNorm`) takes its per-pixel channel mean and variance
  as ``(1, C) @ (C, H*W)`` products by a 1/C row instead of ReduceMean over axis 1.
* TLC attention on the window grid. ``x * conv(pad(means))``: a 1x1 conv commutes with replicate padding, so
  it runs on the H-k1+1 x W-k2+1 grid of window means (a third of a 720x1280 frame at every level) and the
  padding comes after; the means stay transposed (``window_means_t``) through the conv and are transposed
  back on that small grid.

  On the small maps of the deep levels the window means are two MatMuls by band matrices (:data:`BAND_MAX_MACS`).

Measured on ``nafnet-gopro-width32`` with TLC at 720x1280 (onnxruntime CPU, 2 threads, one process, min of 3;
BENCHMARKS.md, "Export"; time relative to folded only): 0.875 with the attention on the grid, 0.725 with
split gates, 0.642 with MatMul channel means, 0.609 with band means on the deep levels.

The folding arithmetic is done in float64 and rounded once; the rest only reorders FP32 operations, so the
deploy model equals the original to FP32 rounding (tests: <= 1e-5). In a half model the window means are
still taken in FP32 and cast to FP16 before the conv, as in :func:`nafnet_core.tlc.local_mean`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from nafnet_core.layers import Gate, GlobalAvgPool2d, LayerNorm2d, NAFBlock, global_mean, to_branch, to_stream
from nafnet_core.model import NAFNet
from nafnet_core.tlc import LocalAvgPool2d, band_means, covers_map, window_means_t


def _fold_affine_into_conv(norm: LayerNorm2d, conv: nn.Conv2d) -> ChannelNorm:
    """Moves ``norm``'s affine into the following 1x1 ``conv`` (in place on ``conv``); returns the bare norm."""
    if norm.weight is not None:
        w, b = norm.weight.double(), norm.bias.double()  # (C,)
        weight = conv.weight.double()  # (O, C, 1, 1)
        bias = conv.bias.double() if conv.bias is not None else weight.new_zeros(weight.shape[0])
        conv.weight.copy_((weight * w.view(1, -1, 1, 1)).to(conv.weight.dtype))
        new_bias = bias + weight[:, :, 0, 0] @ b
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
        else:
            conv.bias.copy_(new_bias.to(conv.bias.dtype))
    return ChannelNorm(conv.in_channels, eps=norm.eps)


class ChannelNorm(LayerNorm2d):
    """The folded LayerNorm2d (no affine) with its channel means as MatMuls by a 1/C row, in FP32.

    onnxruntime reduces over the channel axis of NCHW slowly: 52 ms per ReduceMean on 32x720x1280, 634 ms
    of a 5.3 s width32 frame; the (1, C) @ (C, H*W) product takes 94 ms for all of them.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(channels, eps=eps, affine=False)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        dtype = x.dtype
        x = x.float()
        n, c, h, w = x.shape
        avg = torch.full((1, c), 1.0 / c, dtype=torch.float32, device=x.device)
        mu = (avg @ x.reshape(n, c, h * w)).reshape(n, 1, h, w)
        d = x - mu
        var = (avg @ (d * d).reshape(n, c, h * w)).reshape(n, 1, h, w)
        return (d / (var + self.eps).sqrt()).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}"


def _fold_scale_into_conv(scale: torch.Tensor | None, conv: nn.Conv2d) -> None:
    """``conv(x) * scale`` -> ``conv'(x)`` for a per-output-channel ``scale`` of shape (1, O, 1, 1)."""
    if scale is None:
        return
    s = scale.double().view(-1)
    conv.weight.copy_((conv.weight.double() * s.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.copy_((conv.bias.double() * s).to(conv.bias.dtype))


def _half_conv(conv: nn.Conv2d, half: int) -> nn.Conv2d:
    """Output channels ``half`` (0 or 1) of a 1x1 or depthwise ``conv``, as a conv of its own."""
    o = conv.out_channels // 2
    depthwise = conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1
    if not depthwise and conv.groups != 1:
        raise ValueError(f"cannot split a grouped conv with groups={conv.groups}")
    new = nn.Conv2d(o if depthwise else conv.in_channels, o, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=o if depthwise else 1,
                    bias=conv.bias is not None).to(device=conv.weight.device, dtype=conv.weight.dtype)
    new.weight.copy_(conv.weight[half * o:(half + 1) * o])
    if conv.bias is not None:
        new.bias.copy_(conv.bias[half * o:(half + 1) * o])
    return new


class GatedConv(nn.Module):
    """``gate(convs(x))`` with the convs split per gate half: ``act(a(x)) * b(x)``.

    Args:
        convs: the convs that produce the 2C gate input, applied in order (1x1, then optionally depthwise).
        gate: the block's :class:`~nafnet_core.layers.Gate`.
    """

    def __init__(self, convs: list[nn.Conv2d], gate: Gate):
        super().__init__()
        self.a = nn.Sequential(*[_half_conv(c, 0) for c in convs])
        self.b = nn.Sequential(*[_half_conv(c, 1) for c in convs])
        self.act = gate.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        return (a if self.act is None else self.act(a)) * self.b(x)


#: Band-matrix window means (two MatMuls) replace the cumulative sums where they cost at most this many
#: multiply-adds per element: on a 720x1280 frame the two deepest levels (90x160 -> 97, 45x80 -> 50) but not
#: 180x320 (191, no faster in onnxruntime). Measured with width32: 5 % off the frame time (BENCHMARKS.md, "Export").
BAND_MAX_MACS = 120


def band_cost(h: int, w: int, kernel: tuple[int, int]) -> float:
    """Multiply-adds per input element of :func:`~nafnet_core.tlc.band_means` on an h x w map."""
    ho, wo = h - min(h, kernel[0]) + 1, w - min(w, kernel[1]) + 1
    return ho * (1 + wo / h)


class Attention(nn.Module):
    """The SCA's attention map ``conv(pool(x))``; with a TLC kernel the conv runs on the window grid.

    Window means come from band matrices on small fixed-shape maps (:data:`BAND_MAX_MACS`), else from the
    cumulative sums of :func:`~nafnet_core.tlc.window_means_t` (always for symbolic shapes).

    Args:
        conv: the SCA's 1x1 conv.
        kernel: the TLC window (kh, kw), or None for the global mean.
    """

    def __init__(self, conv: nn.Conv2d, kernel: tuple[int, int] | None):
        super().__init__()
        self.conv = conv
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None or covers_map(x, self.kernel):
            return self.conv(global_mean(x))
        h, w = x.shape[-2:]
        if isinstance(h, int) and isinstance(w, int) and band_cost(h, w, self.kernel) <= BAND_MAX_MACS:
            means, pad = band_means(x, self.kernel)
            a = self.conv(means.to(x.dtype))
        else:
            means_t, pad = window_means_t(x, self.kernel)
            a = self.conv(means_t.to(x.dtype)).transpose(-1, -2)
        return F.pad(a, pad, mode="replicate")

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}"


class DeployBlock(nn.Module):
    """A NAFBlock folded and rewritten for deployment (see the module docstring); built by :func:`deploy_block`."""

    def __init__(self, norm1: LayerNorm2d, gated1: GatedConv, sca: Attention, conv3: nn.Conv2d,
                 norm2: LayerNorm2d, gated2: GatedConv, conv5: nn.Conv2d):
        super().__init__()
        self.norm1, self.gated1, self.sca, self.conv3 = norm1, gated1, sca, conv3
        self.norm2, self.gated2, self.conv5 = norm2, gated2, conv5

    #: Residual stream in FP32 inside a half model, as :attr:`NAFBlock.fp32_stream`.
    fp32_stream = False

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        s = self.fp32_stream
        inp = inp.float() if s else inp
        x = self.gated1(to_branch(self.norm1(inp), self.conv3, s))
        y = inp + to_stream(self.conv3(x * self.sca(x)), s)
        return y + to_stream(self.conv5(self.gated2(to_branch(self.norm2(y), self.conv5, s))), s)


def deploy_block(block: NAFBlock) -> DeployBlock:
    """The deploy form of ``block`` (a copy: ``block`` is untouched)."""
    b = copy.deepcopy(block)
    pool = b.sca[0]
    if isinstance(pool, LocalAvgPool2d):
        kernel = pool.kernel
    elif isinstance(pool, GlobalAvgPool2d):
        kernel = None
    else:
        raise TypeError(f"unknown SCA pooling {type(pool).__name__}")
    with torch.no_grad():
        norm1 = _fold_affine_into_conv(b.norm1, b.conv1)
        norm2 = _fold_affine_into_conv(b.norm2, b.conv4)
        _fold_scale_into_conv(b.beta, b.conv3)
        _fold_scale_into_conv(b.gamma, b.conv5)
        gated1, gated2 = GatedConv([b.conv1, b.conv2], b.sg), GatedConv([b.conv4], b.sg)
    return DeployBlock(norm1, gated1, Attention(b.sca[1], kernel), b.conv3, norm2, gated2, b.conv5)


def fold_for_deploy(model: NAFNet) -> NAFNet:
    """A copy of ``model`` with every NAFBlock in its :class:`DeployBlock` form; ``model`` is untouched.

    Blocks of other kinds, subclasses of NAFBlock included (FNAFNet's: its FFT branches read the normed input
    with its affine, so the affine cannot move into conv1/conv4), are kept as written.

    Apply TLC first (``convert_to_tlc``), then fold: the deploy attention takes its window from the TLC
    pooling. Already folded blocks are kept, so folding twice is folding once.

    Args:
        model: a NAFNet (with or without TLC); it is evaluated in eval mode afterwards (dropout off).
    """
    if not isinstance(model, NAFNet):
        raise TypeError(f"fold_for_deploy expects a NAFNet, got {type(model).__name__}")
    new = copy.deepcopy(model).eval()
    for stage in [*new.encoders, new.middle_blks, *new.decoders]:
        for i, block in enumerate(stage):
            if type(block) is NAFBlock:  # other block kinds (FNAFNet's, CascadedGaze's) export as written
                stage[i] = deploy_block(block)
    new.folded = True
    return new.eval()


def is_folded(model: nn.Module) -> bool:
    return any(isinstance(m, DeployBlock) for m in model.modules())
