"""Tiling shared by every backend: pad to a multiple of 16, a tile grid with overlap, smooth blending.

    x (1, C, H, W) -> pad right/bottom with zeros to a multiple of 16 (what NAFNet does itself, so a
    whole-image pass equals the model's own output) -> either one whole-image call (dynamic graphs) or
    tiles of a fixed size on an even grid, each blended in with a raised-cosine ramp over the overlap
    -> crop to H x W.

The grid is a product of two 1-D grids, so the sum of blending weights at a pixel is the product
of two 1-D sums: the output is accumulated in one image-sized buffer and divided by an outer product,
with no image-sized weight map. The model only ever sees one tile, so its activation memory is
bounded by the tile, not the image.

TLC and tiles: a fixed-tile graph carries the TLC kernels of the training size as constants, so
inside a tile the SCA statistics are local means over the same windows as on the whole image; only
windows that would cross the tile border differ, and the overlap + blending hides them. Defaults
were measured on 1280x720 photos (BENCHMARKS.md, "Tiling vs whole-image TLC").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nafnet_core.config import DEFAULT_PAD_MULTIPLE, padded_size

#: Default tile edge and overlap (pixels), measured: see BENCHMARKS.md "Tiling vs whole-image TLC".
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 128


@dataclass(frozen=True)
class TileSpec:
    """How to cut an image.

    Args:
        tile: (height, width) of every tile (multiples of ``multiple``).
        overlap: minimum overlap between neighbouring tiles, pixels (blend ramp length).
        multiple: the model's padding multiple (``Runner.pad_multiple``): images are padded to it first.
    """

    tile: tuple[int, int] = (DEFAULT_TILE, DEFAULT_TILE)
    overlap: int = DEFAULT_OVERLAP
    multiple: int = DEFAULT_PAD_MULTIPLE

    def __post_init__(self):
        th, tw = self.tile
        m = self.multiple
        if th <= 0 or tw <= 0 or th % m or tw % m:
            raise ValueError(f"tile must be positive multiples of {m} (the model's padding multiple), got {th}x{tw}")
        if not 0 <= self.overlap < min(th, tw):
            raise ValueError(f"overlap must be in [0, {min(th, tw)}) for tile {th}x{tw}, got {self.overlap}")


def default_overlap(tile: tuple[int, int]) -> int:
    """DEFAULT_OVERLAP, or a quarter of the tile's shorter side for tiles smaller than 4x that."""
    return min(DEFAULT_OVERLAP, min(tile) // 4)


def pad_to_multiple(x: torch.Tensor, multiple: int = DEFAULT_PAD_MULTIPLE) -> torch.Tensor:
    """Zero-pads (N, C, H, W) right and bottom to multiples of ``multiple`` (NAFNet's own padding)."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, padded_size(w, multiple) - w, 0, padded_size(h, multiple) - h))


def tile_starts(length: int, tile: int, overlap: int, multiple: int = DEFAULT_PAD_MULTIPLE) -> list[int]:
    """Start offsets of tiles of ``tile`` px covering [0, length) with at least ``overlap`` px overlap.

    The fewest tiles that satisfy the overlap, spread evenly from 0 to ``length - tile`` and rounded
    down to multiples of ``multiple`` where possible (so tile-local pixel grids align with the image's
    stride structure: the model's padding multiple). ``length <= tile`` gives one tile at 0 (the caller
    pads the image to the tile).
    """
    if length <= tile:
        return [0]
    n = 1 + math.ceil((length - tile) / (tile - overlap))
    last = length - tile
    starts = [round(i * last / (n - 1)) for i in range(n)]
    aligned = [s - s % multiple for s in starts[:-1]] + [last]
    if all(b - a <= tile - overlap for a, b in zip(aligned, aligned[1:])):
        starts = aligned
    return starts


def blend_ramp(n: int) -> torch.Tensor:
    """n weights rising smoothly (raised cosine) from near 0 to near 1, never exactly 0."""
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (0.5 - 0.5 * torch.cos(math.pi * t)).float()


def tile_weights(starts: list[int], tile: int, overlap: int) -> list[torch.Tensor]:
    """1-D blending weights of each tile: 1 in the middle, a ramp over the overlap on inner edges only.

    Edges on the image border keep weight 1, so every pixel's weights sum to at least 1 there and
    to a positive value everywhere.
    """
    weights = []
    ramp = blend_ramp(overlap) if overlap > 0 else None
    for i, _ in enumerate(starts):
        w = torch.ones(tile)
        if ramp is not None and i > 0:
            w[:overlap] = ramp
        if ramp is not None and i < len(starts) - 1:
            w[tile - overlap:] = torch.minimum(w[tile - overlap:], ramp.flip(0))
        weights.append(w)
    return weights


def weight_sum(length: int, starts: list[int], weights: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the 1-D weights of all tiles at each position of [0, length) (in the weights' dtype)."""
    total = torch.zeros(length, dtype=weights[0].dtype if weights else torch.float32)
    for s, w in zip(starts, weights):
        n = min(len(w), length - s)
        total[s:s + n] += w[:n]
    return total


def run_tiled(infer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, spec: TileSpec,
              progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Runs ``infer`` on tiles of ``x`` (N, C, H, W; H, W multiples of ``spec.multiple``) and blends them;
    same shape out.

    A batch of N same-sized images (video frames) is cut on one grid: each call gets one tile position of
    all N images. An image smaller than the tile along an axis is replicate-padded to the tile there and
    cropped after.
    """
    h, w = x.shape[-2:]
    th, tw = spec.tile
    fill_h, fill_w = max(th - h, 0), max(tw - w, 0)
    if fill_h or fill_w:
        x = F.pad(x, (0, fill_w, 0, fill_h), mode="replicate")
    ph, pw = x.shape[-2:]
    ys, xs = tile_starts(ph, th, spec.overlap, spec.multiple), tile_starts(pw, tw, spec.overlap, spec.multiple)
    wy, wx = tile_weights(ys, th, spec.overlap), tile_weights(xs, tw, spec.overlap)
    # float64 accumulation: products of float32 values and weights are exact in it, so where tiles agree
    # (an identity runner, overlaps of a pointwise model) the blend gives back their float32 value exactly.
    out = torch.zeros(x.shape[0], x.shape[1], ph, pw, dtype=torch.float64)
    for y0, wy_t in zip(ys, wy):
        for x0, wx_t in zip(xs, wx):
            y = infer(x[:, :, y0:y0 + th, x0:x0 + tw].contiguous())
            out[:, :, y0:y0 + th, x0:x0 + tw] += y.double() * (wy_t.double()[:, None] * wx_t.double()[None, :])
            if progress is not None:
                progress(1)
    sum_y = weight_sum(ph, ys, [w.double() for w in wy])
    sum_x = weight_sum(pw, xs, [w.double() for w in wx])
    out /= sum_y[:, None] * sum_x[None, :]
    return out[:, :, :h, :w].float()


def count_tiles(height: int, width: int, spec: TileSpec) -> int:
    """Number of tiles ``run_tiled`` uses for an image of ``height`` x ``width`` (before padding)."""
    ph, pw = max(padded_size(height, spec.multiple), spec.tile[0]), max(padded_size(width, spec.multiple), spec.tile[1])
    return (len(tile_starts(ph, spec.tile[0], spec.overlap, spec.multiple))
            * len(tile_starts(pw, spec.tile[1], spec.overlap, spec.multiple)))


def restore_tensor(infer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, spec: TileSpec | None = None,
                   progress: Callable[[int], None] | None = None, multiple: int = DEFAULT_PAD_MULTIPLE) -> torch.Tensor:
    """The shared inference path: pad to the model's multiple -> whole image (``spec`` None) or tiles -> crop.
    No clamping.

    Args:
        infer: a runner's ``infer`` (NCHW float32 in and out).
        x: (N, C, H, W) float32 in [0, 1] (N > 1: same-sized frames of a video, in one call or tile grid).
        spec: tiling, or None for one whole-image call (dynamic-shape backends only).
        multiple: the padding multiple of a whole-image call (a tiling's own ``spec.multiple`` wins).
    """
    h, w = x.shape[-2:]
    xp = pad_to_multiple(x, multiple if spec is None else spec.multiple)
    y = infer(xp) if spec is None else run_tiled(infer, xp, spec, progress)
    if spec is None and progress is not None:
        progress(1)
    return y[:, :, :h, :w]
