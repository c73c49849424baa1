"""Deblur files and folders with any Runner: the one inference path, docs/DESIGN.md §2 (Data flow).

    file -> read_image -> to_tensor -> pad to 16 -> (tiles) -> Runner.infer -> (blend) -> crop
         -> from_tensor (clamp, round, alpha/gray back) -> write_image (atomic)

Video files take the same path frame by frame (runtime/video.py). ``infer_path`` mirrors an input tree
into an output tree, skips outputs that exist (a re-run resumes), keeps going past unreadable files and
reports them at the end.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from nafnet_core.errors import UserError
from nafnet_core.fileio import output_folder, remove_temporaries
from nafnet_core.images import Decoded, ImageError, from_tensor, is_image_file, is_video_file, max_pixels_limit, \
    read_image, to_8bit, to_tensor, write_image

from .runners import Runner
from .tiling import DEFAULT_TILE, TileSpec, default_overlap, padded_size, restore_tensor

#: With ``tile="auto"``, dynamic-shape models run whole images up to this many (padded) pixels and tile
#: larger ones, so memory stays bounded (a 1280x720 frame runs whole: see BENCHMARKS.md).
AUTO_WHOLE_MAX_PIXELS = 1280 * 736


class TilingWarning(UserWarning):
    """Tiled inference of a model whose output depends on the whole input (``input_fft='fs'``)."""


#: What tiling costs an ``input_fft='fs'`` model (BENCHMARKS.md, "Input FFT (input_fft=fs)").
FS_TILING_NOTE = "see BENCHMARKS.md, Input FFT"


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
    if runner.fixed_shape is not None:
        tile_hw = runner.fixed_shape
    elif tile in ("none", None):
        return None
    elif tile == "auto":
        # a model with an input FFT runs whole at any size: tiles would change its output
        if whole_input or padded_size(height) * padded_size(width) <= AUTO_WHOLE_MAX_PIXELS:
            return None
        tile_hw = (DEFAULT_TILE, DEFAULT_TILE)
    else:
        tile_hw = _as_hw(tile)
    try:
        spec = TileSpec(tile_hw, default_overlap(tile_hw) if overlap is None else overlap)
    except ValueError as e:
        raise UserError(f"--tile/--overlap: {e}") from None
    if whole_input and (padded_size(height) > tile_hw[0] or padded_size(width) > tile_hw[1]):
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
    return restore_tensor(runner.infer, x, spec, progress)


def restore_image(runner: Runner, image: Decoded, tile: str | int | tuple[int, int] = "auto",
                  overlap: int | None = None) -> Decoded:
    """A decoded image restored, with its depth, alpha and grayness."""
    return from_tensor(restore(runner, to_tensor(image), tile, overlap), image)


# --------------------------------------------------------------------------------------------- folders

@dataclass
class InferReport:
    """What ``infer_path`` did. ``failed`` maps each input that could not be processed to the reason."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    seconds: float = 0.0
    #: temporary files an interrupted earlier run left in the output tree, removed before this one.
    removed_parts: list[Path] = field(default_factory=list)
    #: frames of the videos written.
    video_frames: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


def default_output(input_path: Path) -> Path:
    """``photos/`` -> ``photos_deblurred/``; ``a.png`` -> ``a_deblurred/`` beside it (holding ``a.png``)."""
    input_path = Path(input_path)
    stem = input_path.name if input_path.is_dir() else input_path.stem
    return input_path.parent / f"{stem}_deblurred"


def collect_inputs(input_path: Path, exclude: list[Path] = ()) -> list[tuple[Path, Path]]:
    """(file, path relative to the input root) for every image and video under ``input_path``, sorted.

    A file given directly is taken whatever its suffix (it will fail clearly if it is not an image);
    in folders only image and video suffixes are taken, hidden files and ``exclude`` trees are skipped.
    """
    input_path = Path(input_path)
    if not input_path.exists():
        raise UserError(f"{input_path}: no such file or folder")
    if input_path.is_file():
        return [(input_path, Path(input_path.name))]
    excluded = [e.resolve() for e in exclude]
    found = []
    for p in sorted(input_path.rglob("*")):
        rel = p.relative_to(input_path)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file() or not (is_image_file(p) or is_video_file(p)):
            continue
        if any(p.resolve().is_relative_to(e) for e in excluded):
            continue
        found.append((p, rel))
    return found


def side_by_side(before: Decoded, after: Decoded, gap: int = 8) -> Decoded:
    """8-bit RGB image: input | output, separated by a white gap (alpha dropped)."""
    a, b = to_8bit(before).rgb, to_8bit(after).rgb
    spacer = np.full((a.shape[0], gap, 3), 255, np.uint8)
    return Decoded(np.concatenate([a, spacer, b], axis=1))


def _check_inside(out_root: Path, dst: Path) -> None:
    """Refuses an output whose folder resolves outside ``--out`` (a symlinked folder planted in it)."""
    parent = dst.parent
    while not parent.exists() and parent != parent.parent:  # folders still to be created are inside
        parent = parent.parent
    if not parent.resolve().is_relative_to(out_root):
        raise UserError(f"{dst}: refusing to write outside the output folder {out_root} "
                        f"({parent} resolves to {parent.resolve()}, a symlink?)")


def infer_path(runner: Runner, input_path: str | Path, out_dir: str | Path | None = None, *,
               tile: str | int | tuple[int, int] = "auto", overlap: int | None = None, overwrite: bool = False,
               compare: bool = False, max_pixels: int | None = None, progress: bool = True, codec: str = "auto",
               crf: int | None = None, batch: int | None = None, workers: int = 1) -> InferReport:
    """Deblurs a file or a folder tree (recursive) into ``out_dir``, mirroring the tree.

    Args:
        runner: an activated Runner.
        input_path: an image or video file, or a folder.
        out_dir: output root (default: ``<input>_deblurred`` beside the input).
        tile / overlap: see :func:`choose_tiling`.
        overwrite: re-process images whose output exists (default: skip them, so a re-run resumes).
        compare: also write input | output images under ``<out_dir>_compare``.
        max_pixels: decompression-bomb limit per image (default: $NAFNET_MAX_PIXELS or 200 million).
        progress: show a progress bar (stderr); videos add one in frames.
        codec / crf / batch: for videos, see :func:`runtime.video.infer_video`.
        workers: images in flight at once (threads running this same per-image path); more than one only
            pays off with a runner that waits on something else, such as a server (``--server``).
    """
    from tqdm import tqdm

    input_path = Path(input_path)
    out_dir = Path(out_dir) if out_dir is not None else default_output(input_path)
    compare_dir = out_dir.parent / f"{out_dir.name}_compare"
    check_tile(runner, tile)
    max_pixels = max_pixels_limit(max_pixels)  # a bad NAFNET_MAX_PIXELS fails once, before any image
    items = collect_inputs(input_path, exclude=[out_dir, compare_dir])
    if any(is_video_file(src) for src, _ in items):
        from .video import import_av, infer_video

        import_av()  # PyAV missing: one line before any file is processed
    report = InferReport()
    start = time.perf_counter()
    # An output folder that cannot exist fails once, before any image. Temporary files a killed run left
    # for this run's outputs go, unless another run is writing into the same folder.
    with contextlib.ExitStack() as held:
        for folder in [out_dir] + ([compare_dir] if compare else []):
            if held.enter_context(output_folder(folder)):
                report.removed_parts += remove_temporaries(folder / rel for _, rel in items)
        out_root = out_dir.resolve()
        todo = []
        for src, rel in items:
            dst = out_dir / rel
            if dst.exists() and not overwrite:
                report.skipped.append(dst)
            else:
                todo.append((src, rel, dst))

        def one(item: tuple[Path, Path, Path]) -> tuple[str | None, int]:
            """Restores one file; (the reason it failed or None, video frames written)."""
            src, rel, dst = item
            frames = 0
            try:
                _check_inside(out_root, dst)
                if is_video_file(src):
                    frames = infer_video(
                        runner, src, dst, tile=tile, overlap=overlap, codec=codec, crf=crf, batch=batch,
                        compare_dst=compare_dir / rel if compare else None, max_pixels=max_pixels,
                        progress=progress).frames
                else:
                    image = read_image(src, max_pixels=max_pixels)
                    restored = restore_image(runner, image, tile, overlap)
                    write_image(dst, restored)
                    if compare:
                        write_image(compare_dir / rel, side_by_side(image, restored))
            except (ImageError, UserError) as e:
                return str(e), frames
            return None, frames

        with contextlib.ExitStack() as pool_scope, \
                tqdm(total=len(items), initial=len(report.skipped), unit="img", disable=not progress,
                     dynamic_ncols=True, desc="infer") as bar:
            if workers > 1:
                from concurrent.futures import ThreadPoolExecutor

                pool = ThreadPoolExecutor(workers, thread_name_prefix="infer")
                # On Ctrl-C the images not started yet are dropped; those in flight finish (atomic writes).
                pool_scope.callback(pool.shutdown, wait=True, cancel_futures=True)
                results = pool.map(one, todo)
            else:
                results = map(one, todo)
            for (src, _, dst), (why, frames) in zip(todo, results):  # in input order, whatever finished first
                report.video_frames += frames
                if why is None:
                    report.written.append(dst)
                else:
                    report.failed[src] = why
                bar.update()
    report.seconds = time.perf_counter() - start
    return report
