"""Deblur files and folders with any Runner: the one inference path, docs/DESIGN.md §2 (Data flow).

    file -> read_image -> to_tensor -> pad to 16 -> (tiles) -> Runner.infer -> (blend) -> crop
         -> from_tensor (clamp, round, alpha/gray back) -> write_image (atomic)

Restoring one array (tiling choice, tiles, blend) is ``runtime.restore``; video files take the same path
frame by frame (``runtime.video``). ``infer_path`` mirrors an input tree
into an output tree, skips outputs that exist (a re-run resumes), keeps going past unreadable files and
reports them at the end.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from nafnet_core.errors import UserError
from nafnet_core.fileio import output_folder, remove_temporaries
from nafnet_core.images import ImageError, is_image_file, is_video_file, max_pixels_limit, read_image, write_image

from .restore import check_tile, restore_image, side_by_side
from .runners import Runner


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
        if (any(part.startswith(".") for part in rel.parts) or not p.is_file()
                or not (is_image_file(p) or is_video_file(p))):
            continue
        if any(p.resolve().is_relative_to(e) for e in excluded):
            continue
        found.append((p, rel))
    return found


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
        tile / overlap: see :func:`runtime.restore.choose_tiling`.
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
