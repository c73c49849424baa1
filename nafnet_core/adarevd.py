"""AdaRevD (Mao et al., CVPR 2024, "Adaptive Reversible Decoder"): the decoder kind ``decoder="adarevd"`` of the
NAFNet family, in the form its authors configured with a NAFNet encoder (``GoPro-AdaRevIDB-pretrain-8gpu.yml``:
no normalizing-flow noise, so the model is deterministic).

Parts (module and parameter names are the official ``AdaRevIDSlide``'s, so its state dicts load strictly)::

    encoder          NAFNet's intro, encoders, downs and middle (TLC applies here, as the official NAFNetLocal)
    conv_features.i  a learned per-channel scale of each encoder feature e0..e4 (init 1)
    subdenets.k      K sub-decoders; each updates the four decoder-level maps in turn, coarse to fine:
                       e3 = alpha0 * e3 + level0(e4, e2)    level = Fusion + FCNAFBlocks
                       e2 = alpha1 * e2 + level1(e3, e1)    Fusion(coarse, fine) = up(coarse) + down(fine)
                       e1 = alpha2 * e1 + level2(e2, e0)    up: 1x1 conv + PixelShuffle(2); down: 2x2/2 conv +
                       e0 = alpha3 * e0 + level3(e1)        channel LayerNorm (eps 1e-5); level3 has no down
    outputs.k        the head of sub-decoder k: a 3x3 conv width -> 3 (the residual of exit depth k + 1)
    ape              the exit classifier on e3 (``dx='e3'``): 2x2/2 conv 8w -> 16w, NAFBlock(16w), global mean,
                     LayerNorm, Linear 16w -> 8w, GELU, Linear -> classes, times a learned ``alpha``

FCNAFBlock: a NAFBlock (LayerNorm2d eps 1e-6, global SCA per tile, no TLC) whose token mixer adds
``fft_block1(norm1(inp))`` to conv3's output and whose FFN adds ``fft_block2(norm2(y))``; an FFT branch is
``rfft2 -> cat[Re, Im] -> 1x1 2c -> 4c -> GELU -> 1x1 4c -> 2c -> split -> irfft2(s=(H, W))`` over the whole
tile. Exported, traced or inside :func:`~nafnet_core.dft.matrix_form` the transforms are the DFT matrices of
:mod:`nafnet_core.dft` (no DFT op, no complex type); in eager mode they are ``torch.fft`` (the same values to
FP32 rounding). The branch, spectra and its two convs included, is an FP32 island in a half model.

Tiles (the official ``grids``): the input is reflect-padded to a multiple of 16 (the official
``check_image_size(img, 16)``; zero padding where a side is too small to reflect), the encoder runs on the
whole padded image, and every feature is cut into tiles: at level l the tile is ``min(side, tile) / 2**l``
with overlap ``tile_overlap / 2**l``, starts 0, s, 2s, ... and the last one flush with the far edge
(:func:`tile_starts`); 720x1280 with 384/32 gives rows {0, 336} and columns {0, 352, 704, 896}. Each tile's
depth d is ``exits[argmax(ape(e3 tile))]`` (no classifier: K); it runs sub-decoders 0..d-1 and returns head
d-1 (d = 0: a zero residual). Exiting only truncates a sequential chain, so running every depth and
selecting one per tile gives the same output; :meth:`AdaRevD.decode` runs each sub-decoder once on all the
tiles that still need it.

Blend (where this departs from the official code): the official ``grids_inverse`` multiplies each tile's
residual by separable linear ramps and sums without normalising (:func:`official_axis_weights`). The weights
sum to 1 at 720 and 1280, but on a side that is one tile the first ``tile_overlap`` rows are ramped (row 0
gets weight 0) and at some sizes (752, 1104 for 384/32) three tiles overlap and the sum reaches ~1.005.
``blend='normalized'`` (the default) ramps each tile only over its overlap with a neighbour
(:func:`normalized_axis_weights`) and divides by the sum of the weights: the same result where the official
weights sum to 1 without border ramps (720 and 1280 among them), a proper partition of unity elsewhere.
``blend='official'`` reproduces the official weights exactly (and fails where the official code fails).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dft
from .config import ModelConfig
from .layers import (
    BlockSite,
    GlobalAvgPool2d,
    LayerNorm2d,
    NAFBlock,
    add_ffn_and_residual_parts,
    scaled_branch,
    to_branch,
    to_stream,
)
from .model import make_block

#: Lower bound of |alpha| of the sub-decoders' level shortcuts (official ``_clamp_abs(alpha, 1e-3)``): the
#: reversible backward divides by them.
ALPHA_MIN = 1e-3


# ---------------------------------------------------------------------------------------------------------
# Blocks


class ChannelLayerNorm(nn.Module):
    """The official Restormer-style ``LayerNorm`` of the Fusion down path: channel LayerNorm, eps 1e-5, with its
    affine under ``body`` (state-dict keys ``body.weight`` / ``body.bias``)."""

    def __init__(self, c: int):
        super().__init__()
        self.body = LayerNorm2d(c, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class FFTConvBranch(nn.Module):
    """The official ``fft_bench_complex_conv`` (GELU, with bias) over a whole map, FP32 in and out.

    Args:
        c: channels in and out.
        expand: hidden channels = ``c * expand`` (complex: twice that many real channels).
    """

    #: Computes in FP32 inside a half model (the FP16 range report of ``export lint`` skips its output).
    fp32_island = True

    def __init__(self, c: int, expand: int):
        super().__init__()
        hid = c * expand
        self.complex_conv1 = nn.Conv2d(2 * c, 2 * hid, 1)
        self.complex_conv2 = nn.Conv2d(2 * hid, 2 * c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, c, H, W) -> (N, c, H, W) FP32
        if x.device.type not in ("cpu", "cuda"):  # meta (FLOP counts): no autocast there
            return self._forward(x)
        with torch.autocast(x.device.type, enabled=False):  # an FP32 island under mixed precision too
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        c = x.shape[1]
        matrices = dft.uses_matrices()
        if matrices:
            re, im = dft.rfft2(x)
        else:
            spectrum = torch.fft.rfft2(x.float(), norm="backward")
            re, im = spectrum.real, spectrum.imag
        y = torch.cat([re, im], 1)
        y = F.conv2d(y, self.complex_conv1.weight.float(), self.complex_conv1.bias.float())
        y = F.gelu(y)
        y = F.conv2d(y, self.complex_conv2.weight.float(), self.complex_conv2.bias.float())
        yr, yi = y[:, :c], y[:, c:]
        if matrices:
            return dft.irfft2(yr, yi, (h, w))
        return torch.fft.irfft2(torch.complex(yr, yi), s=(h, w), norm="backward")


class FCNAFBlock(nn.Module):
    """The official ``FCNAFBlock``: a NAFBlock with an FFT branch beside each of its two branches (see the module
    docstring); global SCA over the map it is given (a tile).

    Args:
        c: channels in and out.
        dw_expand: expansion of the depthwise branch (and the FFT branches' hidden expansion).
        ffn_expand: expansion of the feed-forward branch.
        drop_out_rate: dropout after each branch.
        gate: gate kind (see :class:`~nafnet_core.layers.Gate`; official: ``simple``).
    """

    #: Residual stream in FP32 inside a half model, as :attr:`NAFBlock.fp32_stream`.
    fp32_stream = False

    def __init__(self, c: int, dw_expand: int = 2, ffn_expand: int = 2, drop_out_rate: float = 0.0,
                 gate: str = "simple"):
        super().__init__()
        dw = c * dw_expand
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.avg = GlobalAvgPool2d()
        self.sca = nn.Sequential(nn.Conv2d(dw // 2, dw // 2, 1))
        self.fft_block1 = FFTConvBranch(c, dw_expand)
        self.fft_block2 = FFTConvBranch(c, dw_expand)
        add_ffn_and_residual_parts(self, c, ffn_expand, drop_out_rate, gate)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        s = self.fp32_stream
        inp = inp.float() if s else inp
        t = self.norm1(inp)
        x = self.sg(self.conv2(self.conv1(to_branch(t, self.conv1, s))))
        x = self.conv3(x * self.sca(self.avg(x)))
        x = x + self.fft_block1(t).to(x.dtype)
        y = inp + to_stream(scaled_branch(x, self.beta, self.dropout1), s)
        u = self.norm2(y)
        x = self.conv5(self.sg(self.conv4(to_branch(u, self.conv4, s))))
        x = self.fft_block2(u).to(x.dtype) + x
        return y + to_stream(scaled_branch(x, self.gamma, self.dropout2), s)


class Fusion(nn.Module):
    """Official ``Fusion_DecoderV1``: ``up(coarse) + down(fine)`` into decoder level ``level`` (0 coarsest).

    Args:
        level: decoder level, 0 (1/8 resolution) to 3 (full resolution; no finer map, no down path).
        channels: channels per decoder level, coarsest first (8w, 4w, 2w, w).
    """

    def __init__(self, level: int, channels: Sequence[int]):
        super().__init__()
        self.level = level
        c = channels[level]
        self.down = (nn.Sequential(nn.Conv2d(channels[level + 1], c, 2, stride=2), ChannelLayerNorm(c))
                     if level < 3 else nn.Identity())
        self.up = nn.Sequential(nn.Conv2d(2 * c, 4 * c, 1, bias=False), nn.PixelShuffle(2))

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor | None) -> torch.Tensor:
        up = self.up(coarse)
        return up if self.level == 3 else self.down(fine) + up


class LevelDecoder(nn.Module):
    """Official ``Level_Decoder``: the fusion into one level, then its FCNAFBlocks."""

    def __init__(self, config: ModelConfig, level: int, channels: Sequence[int]):
        super().__init__()
        self.fusion = Fusion(level, channels)
        self.blocks = nn.Sequential(*[
            FCNAFBlock(channels[level], config.dw_expand, config.ffn_expand, config.drop_out_rate, config.gate)
            for _ in range(config.dec_blk_nums[level])])

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor | None) -> torch.Tensor:
        return self.blocks(self.fusion(coarse, fine))


class SubDecoder(nn.Module):
    """One reversible sub-decoder (official ``UniDecoder``): four level updates ``c_l = alpha_l c_l + level_l``.

    The state is ``(e4, e3, e2, e1, e0)``: the middle's map (never changed) and the four decoder-level maps,
    coarsest first. :meth:`inverse` recovers the input state from the output (the reversible backward).
    """

    def __init__(self, config: ModelConfig, channels: Sequence[int]):
        super().__init__()
        for i, c in enumerate(channels):
            setattr(self, f"alpha{i}", nn.Parameter(0.5 * torch.ones(1, c, 1, 1)))
        for i in range(4):
            setattr(self, f"level{i}", LevelDecoder(config, i, channels))

    def alphas(self) -> list[torch.Tensor]:
        return [self.alpha0, self.alpha1, self.alpha2, self.alpha3]

    def levels(self) -> list[LevelDecoder]:
        return [self.level0, self.level1, self.level2, self.level3]

    def clamp_alphas(self) -> None:
        """The official projection ``|alpha| >= 1e-3`` (in place, sign kept), applied before a training step."""
        with torch.no_grad():
            for a in self.alphas():
                sign = a.sign()
                a.abs_().clamp_(ALPHA_MIN).mul_(sign)

    def forward(self, state: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x, c0, c1, c2, c3 = state
        a0, a1, a2, a3 = self.alphas()
        c0 = a0 * c0 + self.level0(x, c1)
        c1 = a1 * c1 + self.level1(c0, c2)
        c2 = a2 * c2 + self.level2(c1, c3)
        c3 = a3 * c3 + self.level3(c2, None)
        return [x, c0, c1, c2, c3]

    def inverse(self, state: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The input state of :meth:`forward` from its output (exact up to FP32 rounding)."""
        x, c0, c1, c2, c3 = state
        a0, a1, a2, a3 = self.alphas()
        c3 = (c3 - self.level3(c2, None)) / a3
        c2 = (c2 - self.level2(c1, c3)) / a2
        c1 = (c1 - self.level1(c0, c2)) / a1
        c0 = (c0 - self.level0(x, c1)) / a0
        return [x, c0, c1, c2, c3]


class ExitClassifier(nn.Module):
    """Official ``Classifier``: global mean, LayerNorm (eps 1e-6), Linear c -> c/2, GELU, Linear -> classes, times
    ``alpha``; computed in FP32 (a vector per tile)."""

    def __init__(self, c: int, n_classes: int):
        super().__init__()
        self.avgpool = GlobalAvgPool2d()
        self.classifier = nn.Sequential(nn.LayerNorm(c, eps=1e-6), nn.Linear(c, c // 2), nn.GELU(),
                                        nn.Linear(c // 2, n_classes))
        self.alpha = nn.Parameter(torch.ones(1, n_classes) / math.sqrt(n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, c, h, w) -> (T, classes) FP32
        x = self.avgpool(x).flatten(1).float()
        norm, lin1, _, lin2 = self.classifier
        x = F.layer_norm(x, norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
        x = F.gelu(F.linear(x, lin1.weight.float(), lin1.bias.float()))
        return F.linear(x, lin2.weight.float(), lin2.bias.float()) * self.alpha.float()


class AdaRevDEncoder(nn.Module):
    """NAFNet without its decoders: intro, encoders, downs, middle; returns ``[e0, e1, e2, e3, e4]``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config.width
        self.intro = nn.Conv2d(config.img_channel, c, 3, padding=1)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        for level, n in enumerate(config.enc_blk_nums):
            self.encoders.append(nn.Sequential(*[make_block(config, c, BlockSite("enc", level, i)) for i in range(n)]))
            self.downs.append(nn.Conv2d(c, 2 * c, 2, stride=2))
            c *= 2
        levels = len(config.enc_blk_nums)
        self.middle_blks = nn.Sequential(*[make_block(config, c, BlockSite("mid", levels, i))
                                           for i in range(config.middle_blk_num)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.intro(x)
        features = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            features.append(x)
            x = down(x)
        features.append(self.middle_blks(x))
        return features


# ---------------------------------------------------------------------------------------------------------
# Tiles and blend


def pad_reflect(x: torch.Tensor, m: int) -> torch.Tensor:
    """``x`` (N, C, H, W) reflect-padded right and bottom to a multiple of ``m`` (zeros where a side is too small
    to reflect)."""
    h, w = x.shape[-2:]
    ph, pw = (m - h % m) % m, (m - w % m) % m
    if ph == pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "constant")


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along a side of ``n`` (official ``grids``): tiles of ``min(n, tile)``, stride
    ``tile - overlap``, the last one at ``n - tile``."""
    k = min(n, tile)
    stride = k - overlap
    starts, i = [], 0
    while True:
        if i + k >= n:
            starts.append(n - k)
            return starts
        starts.append(i)
        i += stride


def _ramp(length: int, up: bool) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, length) if up else torch.linspace(1.0, 0.0, length)


def official_axis_weights(n: int, tile: int, overlap: int) -> list[torch.Tensor]:
    """The official ``grids_inverse`` weights along one side, one (k,) FP32 vector per tile of
    :func:`tile_starts` (a tile's 2-D weight is the outer product of its row and column vectors).

    Raises ValueError at the sizes where the official code fails (its ramp lengths do not fit the tile).
    """
    k = min(n, tile)
    stride = k - overlap
    if stride == 0:  # the official code divides by it (a negative one it floors, as Python does)
        raise ValueError(f"the official blend is undefined for a side of {n} (tile {tile}, overlap {overlap}: "
                         "as long as the overlap); use blend='normalized'")
    n_tiles = (n - overlap - 1) // stride + 1
    ek = n_tiles * stride + 2 * overlap - n  # the official length of the last tile's overlap
    out = []
    for s in tile_starts(n, tile, overlap):
        w = torch.ones(k)
        if s != 0 and s + k != n:
            w[:overlap] *= _ramp(overlap, True)
        if s + 2 * k - ek < n:
            w[-overlap:] *= _ramp(overlap, False)
        if s + k == n or s + 2 * k - ek == n:
            if not 0 < ek <= k:
                raise ValueError(f"the official blend is undefined for a side of {n} (tile {tile}, overlap "
                                 f"{overlap}); use blend='normalized'")
        if s + k == n:
            w[:ek] *= _ramp(ek, True)
        if s + 2 * k - ek == n:
            w[-ek:] *= _ramp(ek, False)
        out.append(w)
    return out


def normalized_axis_weights(n: int, tile: int, overlap: int) -> list[torch.Tensor]:
    """Ramps over each tile's overlap with its neighbours only (none at the image border), before
    normalisation: ``linspace(0, 1, L)`` over the overlap with the previous tile, ``linspace(1, 0, L)`` over
    the overlap with the next one (their product where both apply). Every pixel keeps a positive weight."""
    k = min(n, tile)
    starts = tile_starts(n, tile, overlap)
    out = []
    for a, s in enumerate(starts):
        w = torch.ones(k)
        if a > 0:
            length = starts[a - 1] + k - s
            w[:length] *= _ramp(length, True)
        if a + 1 < len(starts):
            length = s + k - starts[a + 1]
            w[k - length:] *= _ramp(length, False)
        out.append(w)
    return out


def blend_weights(h: int, w: int, config: ModelConfig) -> tuple[list[int], list[int], list[torch.Tensor]]:
    """Tile rows, columns and each tile's FP32 (k1, k2) weight, row-major, for a padded ``h`` x ``w`` map, as
    ``config.blend`` defines them (``normalized``: already divided by the sum over tiles)."""
    axis = official_axis_weights if config.blend == "official" else normalized_axis_weights
    rows, cols = tile_starts(h, config.tile, config.tile_overlap), tile_starts(w, config.tile, config.tile_overlap)
    wr, wc = axis(h, config.tile, config.tile_overlap), axis(w, config.tile, config.tile_overlap)
    weights = [r[:, None] * c[None, :] for r in wr for c in wc]
    if config.blend == "normalized":
        k1, k2 = weights[0].shape
        total = torch.zeros(h, w)
        for (r, c), wt in zip(((r, c) for r in rows for c in cols), weights):
            total[r:r + k1, c:c + k2] += wt
        weights = [wt / total[r:r + k1, c:c + k2] for (r, c), wt in zip(((r, c) for r in rows for c in cols), weights)]
    return rows, cols, weights


def blend(tiles: torch.Tensor, n: int, size: tuple[int, int], config: ModelConfig) -> torch.Tensor:
    """The image (n, C, h, w) FP32 from tile residuals (T * n, C, k1, k2) ordered tile-major (tile t of image i at
    ``t * n + i``): each tile times its weight (:func:`blend_weights`), summed."""
    h, w = size
    rows, cols, weights = blend_weights(h, w, config)
    k1, k2 = weights[0].shape
    out = tiles.new_zeros((n, tiles.shape[1], h, w), dtype=torch.float32)
    for t, ((r, c), wt) in enumerate(zip(((r, c) for r in rows for c in cols), weights)):
        out[:, :, r:r + k1, c:c + k2] += tiles[t * n:(t + 1) * n].float() * wt.to(tiles.device)
    return out


def cut_tiles(feature: torch.Tensor, level: int, rows: Sequence[int], cols: Sequence[int], k1: int,
              k2: int) -> torch.Tensor:
    """The level-``level`` tiles of ``feature`` (n, c, H / 2**l, W / 2**l) for level-0 starts ``rows`` x
    ``cols`` and tile ``k1`` x ``k2``: (T * n, c, k1 / 2**l, k2 / 2**l), tile-major."""
    a, b = k1 >> level, k2 >> level
    return torch.cat([feature[:, :, (r >> level):(r >> level) + a, (c >> level):(c >> level) + b]
                      for r in rows for c in cols], 0)


# ---------------------------------------------------------------------------------------------------------
# Reversible backward


class _ReversibleChain(torch.autograd.Function):
    """Sub-decoders ``0..K-1`` and their heads with a backward that recomputes each sub-decoder's input from its
    output (:meth:`SubDecoder.inverse`) instead of storing it: memory does not grow with K (RevCol's reverse
    function; the forward is the plain one)."""

    @staticmethod
    def forward(ctx, model: AdaRevD, n_state: int, *args):
        state = list(args[:n_state])
        ctx.model = model
        device = state[0].device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        outs = []
        with torch.no_grad():
            for k, sub in enumerate(model.subdenets):
                state = sub(state)
                outs.append(model.outputs[k](state[4]))
        ctx.save_for_backward(*[s.detach() for s in state])
        ctx.input_needs_grad = ctx.needs_input_grad[2:2 + n_state]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        model = ctx.model
        state = list(ctx.saved_tensors)
        grads = [None] * len(state)
        for k in range(len(model.subdenets) - 1, -1, -1):
            sub = model.subdenets[k]
            with torch.no_grad():
                inputs = sub.inverse(state)
            inputs = [t.detach().requires_grad_(True) for t in inputs]
            device, enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                outputs = sub(inputs)
                head = model.outputs[k](outputs[4])
            tensors = [head] + [o for o, g in zip(outputs, grads) if g is not None]
            tensor_grads = [grad_outs[k]] + [g for g in grads if g is not None]
            params = [p for p in list(sub.parameters()) + list(model.outputs[k].parameters()) if p.requires_grad]
            # accumulates into the parameters' .grad through their hooks (DDP's reducer sees them)
            torch.autograd.backward(tensors, tensor_grads, inputs=inputs + params)
            grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs]
            state = [t.detach() for t in inputs]
        return (None, None, *[g if need else None for g, need in zip(grads, ctx.input_needs_grad)])


# ---------------------------------------------------------------------------------------------------------
# The model


class AdaRevD(nn.Module):
    """AdaRevD with a NAFNet encoder (see the module docstring).

    ``model(x)`` returns the adaptive result (each tile's depth from the classifier; K without one);
    ``model(x, depth=d)`` forces depth d on every tile; ``model(x, all_depths=True)`` returns every depth's
    image, (N, K, C, H, W) (training: the official loss averages over them).

    Args:
        config: a config with ``decoder="adarevd"``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.decoder != "adarevd":
            raise ValueError(f"AdaRevD needs decoder='adarevd', got {config.decoder!r}")
        self.config = config
        w = config.width
        self.encoder = AdaRevDEncoder(config)
        channels = [w, 2 * w, 4 * w, 8 * w]
        self.conv_features = nn.ParameterList([nn.Parameter(torch.ones(1, c, 1, 1)) for c in channels + [16 * w]])
        self.subdenets = nn.ModuleList(SubDecoder(config, channels[::-1]) for _ in range(config.sub_decoders))
        self.outputs = nn.ModuleList(nn.Sequential(nn.Conv2d(w, config.img_channel, 3, padding=1))
                                     for _ in range(config.sub_decoders))
        self.ape = (nn.Sequential(nn.Conv2d(8 * w, 16 * w, 2, stride=2),
                                  NAFBlock(16 * w, config.dw_expand, config.ffn_expand, config.drop_out_rate,
                                           config.gate),
                                  ExitClassifier(16 * w, len(config.exits)))
                    if config.exits else None)
        self.padder_size = config.pad_multiple
        #: Training: backpropagate through the sub-decoders reversibly (memory independent of K).
        self.reversible = False
        self.head = 0

    # -- the parts ---------------------------------------------------------------------------------------

    @property
    def head(self) -> int:
        """Always 0: one output (kept for the checkpoint format shared with NAFNet)."""
        return 0

    @head.setter
    def head(self, k: int) -> None:
        if k != 0:
            raise ValueError(f"head must be 0 (an AdaRevD model has one output), got {k!r}")

    @property
    def depth(self) -> int:
        """The deepest exit, K."""
        return self.config.sub_decoders

    def tlc_sites(self) -> list[tuple[nn.Sequential, int]]:
        """The stages whose SCA pooling TLC converts, with their levels: the encoder's (the sub-decoders and the
        classifier pool per tile, as officially)."""
        sites = [(enc, i) for i, enc in enumerate(self.encoder.encoders)]
        return sites + [(self.encoder.middle_blks, len(self.encoder.encoders))]

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """Reflect-pads right and bottom to a multiple of 16 (the official ``check_image_size(img, 16)``); zero
        padding where a side is too small to reflect (the official code fails there)."""
        return pad_reflect(x, self.padder_size)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Scaled encoder features ``conv_features[l] * e_l`` of the padded image ``x``; without gradients while
        the encoder is frozen (official: always ``no_grad``)."""
        x = x.to(self.encoder.intro.weight.dtype)
        if torch.is_grad_enabled() and not any(p.requires_grad for p in self.encoder.parameters()):
            with torch.no_grad():
                features = self.encoder(x)
        else:
            features = self.encoder(x)
        return [f * e for f, e in zip(self.conv_features, features)]

    def tiles(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[int], list[int]]:
        """The tiles of every level's feature (tile-major, T * n each) and the level-0 rows and columns."""
        h, w = features[0].shape[-2:]
        c = self.config
        rows, cols = tile_starts(h, c.tile, c.tile_overlap), tile_starts(w, c.tile, c.tile_overlap)
        k1, k2 = min(h, c.tile), min(w, c.tile)
        return [cut_tiles(f, level, rows, cols, k1, k2) for level, f in enumerate(features)], rows, cols

    def exit_logits(self, e3: torch.Tensor) -> torch.Tensor:
        """The classifier's logits (T, classes), FP32, from the level-3 tiles."""
        if self.ape is None:
            raise ValueError("this AdaRevD model has no exit classifier (exits is empty)")
        return self.ape(e3)

    def exit_depths(self, logits: torch.Tensor) -> torch.Tensor:
        """Each tile's depth (T,) int64: ``exits[argmax(logits)]``."""
        table = torch.tensor(self.config.exits, dtype=torch.int64, device=logits.device)
        return table[logits.argmax(-1)]

    def step(self, k: int, state: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Sub-decoder ``k`` on a state ``(e4, e3, e2, e1, e0)`` of tiles."""
        return self.subdenets[k](state)

    def head_output(self, k: int, e0: torch.Tensor) -> torch.Tensor:
        """The residual of depth ``k + 1`` from e0 after ``k + 1`` sub-decoders."""
        return self.outputs[k](e0)

    def decode(self, state: Sequence[torch.Tensor], depths: torch.Tensor) -> torch.Tensor:
        """Residual tiles (T, C, k1, k2) for each tile's depth: sub-decoder k runs once on every tile deeper than
        k (tiles sorted by depth, so those are a prefix), each tile leaves through its own head."""
        order = torch.argsort(depths, descending=True, stable=True)
        d = depths[order].tolist()
        state = [s[order] for s in state]
        e0 = state[4]
        parts = []
        for k in range(self.depth + 1):
            still = sum(1 for v in d if v > k)
            done = state[4][still:]  # tiles of depth k: they ran k sub-decoders
            if len(done):
                parts.append(self.head_output(k - 1, done) if k > 0 else
                             e0.new_zeros((len(done), self.config.img_channel, *e0.shape[-2:])))
            if still == 0 or k == self.depth:
                break
            state = self.step(k, [s[:still] for s in state])
        res = torch.cat(parts[::-1], 0) if len(parts) > 1 else parts[0]  # deepest first, as `order`
        out = torch.empty_like(res)
        out[order] = res
        return out

    def decode_fixed(self, state: Sequence[torch.Tensor], depth: int) -> torch.Tensor:
        """Residual tiles (T, C, k1, k2) with every tile at ``depth`` (0: zeros)."""
        if depth == 0:
            e0 = state[4]
            return e0.new_zeros((e0.shape[0], self.config.img_channel, *e0.shape[-2:]))
        state = list(state)
        for k in range(depth):
            state = self.step(k, state)
        return self.head_output(depth - 1, state[4])

    def decode_all(self, state: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The residual tiles of every depth 1..K (a list of K (T, C, k1, k2)); reversible backward when
        :attr:`reversible` is set and gradients are on."""
        if self.reversible and torch.is_grad_enabled():
            if self.config.drop_out_rate > 0:
                raise ValueError("reversible backward needs drop_out_rate 0 (the recomputed forward must equal "
                                 "the first)")
            return list(_ReversibleChain.apply(self, len(state), *state))
        outs = []
        state = list(state)
        for k in range(self.depth):
            state = self.step(k, state)
            outs.append(self.head_output(k, state[4]))
        return outs

    # -- forward -----------------------------------------------------------------------------------------

    def classify(self, inp: torch.Tensor) -> torch.Tensor:
        """The exit classifier's logits (T * N, classes) of every tile of ``inp`` (training stage 2)."""
        tiles, _, _ = self.tiles(self.encode(self.pad_input(inp)))
        return self.exit_logits(tiles[3])

    def forward(self, inp: torch.Tensor, depth: int | None = None, all_depths: bool = False,
                return_depths: bool = False, all_heads: bool = False, classify: bool = False):
        """The restored image (N, C, H, W): adaptive, or at ``depth`` on every tile; every depth with
        ``all_depths`` (N, K, C, H, W). ``return_depths``: also each tile's depth (T * N,), tile-major.
        ``all_heads`` is ``all_depths`` (the name the training loop and evaluation use for every output);
        ``classify``: the classifier's logits of every tile instead (:meth:`classify`; through DDP's forward)."""
        if classify:
            return self.classify(inp)
        all_depths = all_depths or all_heads
        n, _, h, w = inp.shape
        x = self.pad_input(inp)
        if self.training:
            for sub in self.subdenets:
                sub.clamp_alphas()
        features = self.encode(x)
        tiles, rows, cols = self.tiles(features)
        state = tiles[::-1]  # (e4, e3, e2, e1, e0): the sub-decoders' state
        size = tuple(x.shape[-2:])
        if all_depths:
            outs = [blend(r, n, size, self.config) for r in self.decode_all(state)]
            return (torch.stack(outs, 1).to(inp.dtype) + x.unsqueeze(1))[..., :h, :w]
        if depth is None and self.ape is None:
            depth = self.depth
        if depth is None:
            depths = self.exit_depths(self.exit_logits(tiles[3]))
            res = self.decode(state, depths)
        else:
            if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= self.depth:
                raise ValueError(f"depth must be in 0..{self.depth}, got {depth!r}")
            depths = torch.full((tiles[0].shape[0],), depth, dtype=torch.int64, device=inp.device)
            res = self.decode_fixed(state, depth)
        out = (blend(res, n, size, self.config).to(inp.dtype) + x)[:, :, :h, :w]
        return (out, depths) if return_depths else out


def set_training_stage(model: AdaRevD, stage: int) -> None:
    """Freezes what the official training stage does not train (``requires_grad``): stage 1 trains the
    sub-decoders, their heads and the feature scales with the encoder (and the classifier) frozen; stage 2
    trains only the classifier. Stage 1 backpropagates reversibly (:attr:`AdaRevD.reversible`)."""
    if stage not in (1, 2):
        raise ValueError(f"AdaRevD training stage must be 1 (sub-decoders) or 2 (classifier), got {stage!r}")
    model.requires_grad_(stage == 1)
    model.encoder.requires_grad_(False)
    if model.ape is not None:
        model.ape.requires_grad_(stage == 2)
    model.reversible = stage == 1


#: The blurry-vs-sharp PSNR thresholds (dB) of the classifier's training labels (official stage 2).
LABEL_THRESHOLDS = (20.0, 25.0, 30.0, 35.0, 40.0)


def exit_labels(blur: torch.Tensor, sharp: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The classifier's training label of each crop (N,) int64: how many of the first ``n_classes - 1``
    :data:`LABEL_THRESHOLDS` the PSNR of ``blur`` against ``sharp`` (N, C, H, W in [0, 1]) exceeds (official:
    [20, 25, 30, 35, 40] dB with 6 classes; a lightly blurred crop gets a high class, a shallow exit)."""
    mse = (blur.float() - sharp.float()).pow(2).flatten(1).mean(1)
    value = -10 * torch.log10(mse.clamp_min(1e-10))
    thresholds = torch.tensor(LABEL_THRESHOLDS[:n_classes - 1], device=value.device)
    return (value[:, None] > thresholds[None, :]).sum(1)


def refuse_adarevd(config: ModelConfig, what: str) -> None:
    """Raises a :class:`~nafnet_core.errors.UserError` when ``config`` is an AdaRevD model, which ``what`` (a
    command) does not take yet."""
    if config.decoder == "adarevd":
        from .errors import UserError

        raise UserError(f"{what} does not take AdaRevD models (decoder 'adarevd'): `python cli.py export "
                        "CHECKPOINT --tile HxW` writes their per-sub-decoder graphs, and `infer` runs that export")


def split_parameters(model: AdaRevD) -> dict[str, int]:
    """Parameters of each part: encoder (with the feature scales), each sub-decoder with its head, classifier."""
    def count(m):
        return sum(p.numel() for p in m.parameters())

    parts = {"encoder": count(model.encoder) + sum(p.numel() for p in model.conv_features)}
    for k, (sub, head) in enumerate(zip(model.subdenets, model.outputs)):
        parts[f"sub-decoder {k + 1}"] = count(sub) + count(head)
    if model.ape is not None:
        parts["classifier"] = count(model.ape)
    return parts


__all__ = ["AdaRevD", "set_training_stage", "exit_labels", "AdaRevDEncoder", "FCNAFBlock", "FFTConvBranch",
           "SubDecoder",
           "ExitClassifier", "blend", "blend_weights", "tile_starts", "official_axis_weights",
           "normalized_axis_weights", "split_parameters"]
