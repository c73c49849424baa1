"""CascadedGaze (Ghasemabadi et al., "CascadedGaze: Efficiency in Global Context Extraction for Image
Restoration", TMLR 2024): the block kind ``block="cg"`` of the NAFNet family.

Only the *first* block of every encoder level is a :class:`CascadedGazeBlock`; every other block (the
rest of the encoder level, the middle and all decoders) is a :class:`~nafnet_core.layers.NAFBlock`, as in
the official ``GCENetMH``. Module and parameter names are the official ones (``GCE.depthwise_separable_convs.
0.depthwise``, ``project_out``, ``sca.1``...), so official ``{'params': ...}`` files load strictly.

CascadedGazeBlock(c), with ``d = dw_expand * c`` (2c officially)::

    t = norm1(inp); x = gelu(conv2(conv1(t)))              # (N, d, H, W), exact GELU, no gate
    g = x[:, :d/2] + x[:, d/2:]                            # (N, d/2, H, W)
    g1 = GELU(pointwise(depthwise_k3_s2(g)))               # the global-context cascade, each step applied
    g2 = GELU(pointwise(depthwise_k3_s3(g1)))              # to the previous one (no padding, no bias)
    g3 = GELU(pointwise(depthwise_k5_s4(g2)))              # levels 0-1 only
    x = cat[x, up(g1), up(g2), (up(g3))]                   # nearest upsampling to (H, W): 2.5d or 2d channels
    x = project_out(x * sca(x)); y = inp + beta * x        # SCA over all of them, 1x1 projection to c
    out = y + gamma * conv5(gate(conv4(norm2(y))))         # the FFN of NAFNet

Gates (``gate=``): every NAFBlock takes the configured gate in both of its gates; the CascadedGaze block
takes it in its FFN (the official SimpleGate there). Its token mixer has no gate (exact GELU on all d
channels), so the option leaves that part unchanged.

Sizes (where this departs from the official code):

* The official network only runs on sizes that are multiples of 16 (it reshapes the padded output
  with the unpadded size). Here the input is zero-padded right/bottom to a multiple of 16 and the output
  cropped back, like NAFNet; on multiples of 16 the outputs are the official ones.
* A cascade step needs a map at least as large as its kernel; the official code fails below that (below
  64x64 input pixels, after padding). Here a step whose input is smaller than its kernel zero-pads it
  right/bottom to the kernel size first (one output row/column then). Maps that are large enough are
  not padded, so every input the official code accepts gives its output.
* Nearest upsampling uses the index PyTorch's ``interpolate(mode='nearest')`` uses, ``floor(o * (in/out))``
  in FP32, not the exact rational ``o * in // out`` (they differ at 37 (input size, level) pairs of the
  multiples of 16 up to 4200 px, e.g. a 592-px side at level 0), written as a gather along H and W so
  that every backend computes exactly the same index (ONNX ``Resize`` implementations round their own
  way). For a fixed shape the indices are
  constants; for symbolic shapes they are computed in the graph (FP32 Range/Div/Mul/Floor).

TLC: the SCA pooling is a :class:`~nafnet_core.layers.GlobalAvgPool2d`, which ``convert_to_tlc`` swaps in
both block kinds, as the official ``GCENetMHLocal``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import BlockSite, GlobalAvgPool2d, NAFBlock, add_ffn_and_residual_parts, residual_and_ffn, to_branch

#: (kernel, stride) of the cascade steps; levels below :data:`THREE_STEP_LEVELS` use all three, the others
#: the first two (official ``GCE_CONVS_nums = [3, 3, 2, 2]``).
CASCADE = ((3, 2), (3, 3), (5, 4))
THREE_STEP_LEVELS = 2


def _pad_amount(size, kernel: int):
    """How much a map of ``size`` must grow to hold one ``kernel`` window (symbolic sizes stay symbolic)."""
    if isinstance(size, torch.SymInt):
        return torch.sym_max(kernel - size, 0)
    return max(kernel - size, 0)


def nearest_index(n_in, n_out, device: torch.device) -> torch.Tensor:
    """Source index of every output position of nearest upsampling ``n_in`` -> ``n_out``, as PyTorch's
    ``interpolate(mode='nearest')`` computes it: ``floor(o * fp32(n_in / n_out))`` (torch also clamps to
    ``n_in - 1``, which upsampling, ``n_in <= n_out``, never reaches).

    Args:
        n_in / n_out: input and output length (ints, or symbolic sizes under ``torch.export``).
        device: where the index lives.
    """
    o = torch.arange(n_out, device=device, dtype=torch.float32)
    scale = torch.full((1,), n_in, device=device, dtype=torch.float32) / n_out  # an FP32 division, as torch's
    return (o * scale).floor().long()


def upsample_nearest(x: torch.Tensor, size: tuple) -> torch.Tensor:
    """Nearest upsampling of ``x`` (N, C, h, w) to ``size`` = (H, W), as gathers (see the module docstring)."""
    h, w = x.shape[-2:]
    H, W = size
    if not (isinstance(w, int) and isinstance(W, int) and w == W):
        x = x.index_select(3, nearest_index(w, W, x.device))
    if not (isinstance(h, int) and isinstance(H, int) and h == H):
        x = x.index_select(2, nearest_index(h, H, x.device))
    return x


class depthwise_separable_conv(nn.Module):  # noqa: N801 - the official module name (state-dict keys)
    """One cascade step's convs: depthwise k x k with stride, then pointwise 1x1; no padding, no bias.

    Args:
        c: channels.
        kernel: depthwise kernel size.
        stride: depthwise stride.
    """

    def __init__(self, c: int, kernel: int, stride: int):
        super().__init__()
        self.pointwise = nn.Conv2d(c, c, 1, bias=False)
        self.depthwise = nn.Conv2d(c, c, kernel, stride=stride, groups=c, bias=False)
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, c, h, w) -> (N, c, ~h/s, ~w/s)
        h, w = x.shape[-2:]
        ph, pw = _pad_amount(h, self.kernel), _pad_amount(w, self.kernel)
        if not (isinstance(ph, int) and isinstance(pw, int) and ph == pw == 0):
            x = F.pad(x, (0, pw, 0, ph))  # a map smaller than the kernel (the official code fails there)
        return self.pointwise(self.depthwise(x))


class GlobalContextExtractor(nn.Module):
    """The cascade: each step ``GELU(depthwise_separable_conv(previous))``; returns every step's output.

    Args:
        c: channels.
        steps: number of steps of :data:`CASCADE` (3 or 2 officially).
    """

    def __init__(self, c: int, steps: int):
        super().__init__()
        self.depthwise_separable_convs = nn.ModuleList(
            depthwise_separable_conv(c, k, s) for k, s in CASCADE[:steps])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for conv in self.depthwise_separable_convs:
            x = F.gelu(conv(x))
            outputs.append(x)
        return outputs


class CascadedGazeBlock(nn.Module):
    """The CascadedGaze block (see the module docstring).

    Args:
        c: channels in and out.
        steps: cascade steps (3 at encoder levels 0-1, 2 below).
        dw_expand: expansion of the depthwise branch.
        ffn_expand: expansion of the feed-forward branch.
        drop_out_rate: dropout after the projection and after conv5.
        gate: gate kind of the FFN (see :class:`~nafnet_core.layers.Gate`).
    """

    #: The conv that reads the attention product ``x * sca(x)`` (NAFBlock: ``conv3``); read by ``export.lint``.
    sca_reader = "project_out"

    def __init__(self, c: int, steps: int, dw_expand: int = 2, ffn_expand: int = 2, drop_out_rate: float = 0.0,
                 gate: str = "simple"):
        super().__init__()
        dw = c * dw_expand
        cat = dw + steps * (dw // 2)  # x and every upsampled step
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.GCE = GlobalContextExtractor(dw // 2, steps)
        self.project_out = nn.Conv2d(cat, c, 1)
        # SCA over x and the context maps. TLC swaps sca[0] for a local mean.
        self.sca = nn.Sequential(GlobalAvgPool2d(), nn.Conv2d(cat, cat, 1))
        add_ffn_and_residual_parts(self, c, ffn_expand, drop_out_rate, gate)

    #: Residual stream in FP32 inside a half model, as :attr:`NAFBlock.fp32_stream`.
    fp32_stream = False

    def forward(self, inp: torch.Tensor) -> torch.Tensor:  # (N, c, H, W)
        s = self.fp32_stream
        inp = inp.float() if s else inp
        size = inp.shape[-2:]
        x = F.gelu(self.conv2(self.conv1(to_branch(self.norm1(inp), self.conv1, s))))  # (N, d, H, W)
        a, b = x.chunk(2, dim=1)
        context = [upsample_nearest(g, size) for g in self.GCE(a + b)]  # each (N, d/2, H, W)
        x = torch.cat([x, *context], dim=1)
        return residual_and_ffn(self, inp, x * self.sca(x), s, conv=self.project_out)


def cascade_steps(level: int) -> int:
    """Cascade steps of the CascadedGaze block at encoder ``level``."""
    return len(CASCADE) if level < THREE_STEP_LEVELS else len(CASCADE) - 1


def cg_block(config: ModelConfig, c: int, site: BlockSite) -> nn.Module:
    """The block at ``site`` of a ``block="cg"`` model: CascadedGaze for the first block of each encoder
    level, NAFBlock everywhere else (official ``GCENetMH``).

    Args:
        config: the model's config (expansions, dropout, gate).
        c: channels.
        site: where the block sits.
    """
    if site.stage == "enc" and site.index == 0:
        return CascadedGazeBlock(c, cascade_steps(site.level), config.dw_expand, config.ffn_expand,
                                 config.drop_out_rate, config.gate)
    return NAFBlock(c, config.dw_expand, config.ffn_expand, config.drop_out_rate, config.gate)
