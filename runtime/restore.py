"""Restoring one array with any Runner: the tiling choice, whole image or TLC-exact tiles, and the
input | output image. The file/folder driver (``runtime.infer``) and the video driver (``runtime.video``)
both stand on this.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from nafnet_core.config import DEFAULT_PAD_MULTIPLE, padded_size
from nafnet_core.errors import UserError
from nafnet_core.images import Decoded, from_tensor, to_8bit, to_tensor

from .runners import Runner
from .tiling import DEFAULT_TILE, TileSpec, default_overlap, restore_tensor

#: With ``tile="auto"``, dynamic-shape models run whole images up to this many (padded) pixels and tile
#: larger ones, so memory stays bounded (a 1280x720 frame runs whole: see BENCHMARKS.md).
AUTO_WHOLE_MAX_PIXELS = 1280 * 736


class TilingWarning(UserWarning):
    """Tiled inference of a model whose output depends on the whole input (``input_fft='fs'``)."""


#: What tiling costs an ``input_fft='fs'`` model (BENCHMARKS.md, "Input FFT (input_fft=fs)").
FS_TILING_NOTE = ("measured at 720p: 49-52 dB agreement with the whole image, against 64-84 dB for the same "
                  "model without it; BENCHMARKS.md, Input FFT")


def pad_multiple(runner: Runner) -> int:
    """The runner's padding multiple (anything with an ``infer`` may serve as a runner: the default there)."""
    return getattr(runner, "pad_multiple", DEFAULT_PAD_MULTIPLE)


def choose_tiling(runner: Runner, height: int, width: int, tile: str | int | tuple[int, int] = "auto",
                  overlap: int | None = None) -> TileSpec | None:
    """The TileSpec for one image (None = whole image).

    Args:
        tile: ``auto`` (static graphs: their tile; dynamic: whole image up to AUTO_WHOLE_MAX_PIXELS, else
            DEFAULT_TILE tiles), ``none`` (whole image; dynamic graphs only), an int or (h, w).
        overlap: pixels; None = ``default_overlap(tile)`` (128, or a quarter of smaller tiles).
    """
    check_tile(runner, tile)
    whole_input = getattr(runner, "whole_image_input", False)
    m = pad_multiple(runner)
    if runner.fixed_shape is not None:
        tile_hw = runner.fixed_shape
    elif tile in ("none", None):
        return None
    elif tile == "auto":
        # a model with an input FFT runs whole at any size: tiles would change its output
        if whole_input or padded_size(height, m) * padded_size(width, m) <= AUTO_WHOLE_MAX_PIXELS:
            return None
        tile_hw = (DEFAULT_TILE, DEFAULT_TILE)
    else:
        tile_hw = _as_hw(tile)
    try:
        spec = TileSpec(tile_hw, default_overlap(tile_hw) if overlap is None else overlap, m)
    except ValueError as e:
        raise UserError(f"--tile/--overlap: {e}") from None
    if whole_input and (padded_size(height, m) > tile_hw[0] or padded_size(width, m) > tile_hw[1]):
        warnings.warn(f"{runner.name}: this model's input FFT (input_fft=fs) spans the whole input, so "
                      f"{tile_hw[0]}x{tile_hw[1]} tiles give another output than the whole image ({FS_TILING_NOTE}); "
                      "run a dynamic graph with --tile none", TilingWarning, stacklevel=2)
    return spec


def check_tile(runner: Runner, tile: str | int | tuple[int, int]) -> None:
    """Refuses a ``tile`` that a fixed-shape runner cannot take (before any image is processed)."""
    fixed = runner.fixed_shape
    if fixed is not None and tile not in ("auto", None) and (tile == "none" or _as_hw(tile) != fixed):
        raise UserError(f"{runner.name} takes {fixed[0]}x{fixed[1]} tiles only; "
                        f"drop --tile or pass --tile {fixed[0]}x{fixed[1]}")


def _as_hw(tile: str | int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(tile, tuple):
        return tile
    if isinstance(tile, int):
        return (tile, tile)
    h, _, w = str(tile).lower().partition("x")
    return (int(h), int(w or h))


def restore(runner: Runner, x: torch.Tensor, tile: str | int | tuple[int, int] = "auto", overlap: int | None = None,
            progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(N, 3, H, W) float32 in [0, 1] -> restored (N, 3, H, W) float32 (not clamped) through ``runner``.

    N > 1 only for same-sized video frames (one tiling for all of them)."""
    spec = choose_tiling(runner, x.shape[-2], x.shape[-1], tile, overlap)
    return restore_tensor(runner.infer, x, spec, progress, pad_multiple(runner))


def restore_image(runner: Runner, image: Decoded, tile: str | int | tuple[int, int] = "auto",
                  overlap: int | None = None) -> Decoded:
    """A decoded image restored, with its depth, alpha and grayness."""
    return from_tensor(restore(runner, to_tensor(image), tile, overlap), image)


# --------------------------------------------------------------------------------------------- folders


def side_by_side(before: Decoded, after: Decoded, gap: int = 8) -> Decoded:
    """8-bit RGB image: input | output, separated by a white gap (alpha dropped)."""
    a, b = to_8bit(before).rgb, to_8bit(after).rgb
    spacer = np.full((a.shape[0], gap, 3), 255, np.uint8)
    return Decoded(np.concatenate([a, spacer, b], axis=1))
