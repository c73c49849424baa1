"""GoPro data: find the pairs, check them and split them (training, parity and evaluation read them here).

Two layouts are read (``ROOT`` is the folder you pass):

- the seed's ``DBlur`` layout: ``ROOT/{train,test}/{blur,sharp}/NAME`` (same NAME in both folders);
- the original ``GOPRO_Large`` layout: ``ROOT/{train,test}/SEQUENCE/{blur,blur_gamma,sharp}/NAME``
  (``blur`` by default, ``blur_gamma`` with ``blur_dir="blur_gamma"``).

The ``test`` folder is split into **validation** and **test** halves by one fixed rule
(:func:`split_val_test`): pairs in natural-sorted order of their name (``SEQUENCE/NAME``), the first
``ceil(n / 2)`` are ``val``, the rest ``test``. Contiguous halves keep whole sequences together (only the
one sequence at the boundary is shared), so selecting a checkpoint on ``val`` does not peek at near-identical
frames of ``test``. Training writes the lists it used into the run directory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .images import ImageError, image_size, is_image_file, max_pixels_limit, read_rgb8

RAW_SPLITS = ("train", "test")
SPLITS = ("train", "val", "test")
LAYOUTS = ("dblur", "gopro_large")


class DataError(UserError):
    """A dataset that cannot be used; the message lists the bad files."""


@dataclass(frozen=True)
class Pair:
    """One blurry/sharp pair. ``name`` is its id inside the split (``SEQUENCE/NAME`` or ``NAME``)."""

    blur: Path
    sharp: Path
    name: str


@dataclass
class DataReport:
    """What :func:`check_dataset` found: pairs per split and every problem, one line each."""

    root: Path
    layout: str | None
    pairs: dict[str, list[Pair]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, max_problems: int = 50) -> str:
        lines = [f"dataset {self.root} (layout: {self.layout or 'unknown'})"]
        for split in SPLITS:
            if split in self.pairs:
                lines.append(f"  {split:<5} {len(self.pairs[split]):>6} pairs")
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  {p}" for p in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                lines.append(f"  ... and {len(self.problems) - max_problems} more")
        else:
            lines.append("no problems found")
        return "\n".join(lines)

    def raise_if_bad(self) -> None:
        if self.problems:
            raise DataError(self.summary() + "\nFix or remove these files, then run `python cli.py data check "
                            f"{self.root}` again.")


def natural_key(text: str) -> list:
    """Sort key that orders ``2.png`` before ``10.png``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def detect_layout(root: str | Path) -> str:
    """``dblur`` or ``gopro_large``; raises :class:`DataError` describing both layouts otherwise."""
    root = Path(root)
    expected = (f"expected {root}/{{train,test}}/{{blur,sharp}}/ (DBlur layout) or "
                f"{root}/{{train,test}}/SEQUENCE/{{blur,sharp}}/ (GOPRO_Large layout)")
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; {expected}")
    splits = [root / s for s in RAW_SPLITS if (root / s).is_dir()]
    if not splits:
        found = sorted(p.name for p in root.iterdir())[:10]
        raise DataError(f"{root}: wrong layout, no train/ or test/ folder (found: {', '.join(found) or 'nothing'}); "
                        f"{expected}")
    for split in splits:
        if (split / "blur").is_dir() or (split / "sharp").is_dir():
            return "dblur"
        if any((seq / "sharp").is_dir() for seq in split.iterdir() if seq.is_dir()):
            return "gopro_large"
    raise DataError(f"{root}: wrong layout, no blur/ or sharp/ folders under {', '.join(s.name for s in splits)}/; "
                    f"{expected}")


def _list_images(folder: Path) -> tuple[dict[str, Path], list[Path]]:
    images, others = {}, []
    for p in sorted(folder.iterdir()):
        if p.is_file() and is_image_file(p):
            images[p.name] = p
        elif not p.name.startswith("."):
            others.append(p)
    return images, others


def _pair_folder(blur_dir: Path, sharp_dir: Path, prefix: str, problems: list[str]) -> list[Pair]:
    for d in (blur_dir, sharp_dir):
        if not d.is_dir():
            problems.append(f"{d}: missing folder")
    if not (blur_dir.is_dir() and sharp_dir.is_dir()):
        return []
    blurs, other_b = _list_images(blur_dir)
    sharps, other_s = _list_images(sharp_dir)
    for p in other_b + other_s:
        problems.append(f"{p}: not an image file (suffix {p.suffix or 'none'}); remove it")
    for name in sorted(set(blurs) - set(sharps), key=natural_key):
        problems.append(f"{blurs[name]}: missing partner {sharp_dir / name}")
    for name in sorted(set(sharps) - set(blurs), key=natural_key):
        problems.append(f"{sharps[name]}: missing partner {blur_dir / name}")
    return [Pair(blurs[n], sharps[n], prefix + n) for n in sorted(set(blurs) & set(sharps), key=natural_key)]


def scan(root: str | Path, blur_dir: str = "blur") -> DataReport:
    """Finds the pairs of ``train`` and ``test`` (file names only, no decoding) and the naming problems."""
    root = Path(root)
    report = DataReport(root=root, layout=detect_layout(root))
    raw: dict[str, list[Pair]] = {}
    for split in RAW_SPLITS:
        folder = root / split
        if not folder.is_dir():
            report.problems.append(f"{folder}: missing folder")
            raw[split] = []
            continue
        pairs: list[Pair] = []
        if report.layout == "dblur":
            pairs = _pair_folder(folder / blur_dir, folder / "sharp", "", report.problems)
        else:
            sequences = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name))
            for seq in sequences:
                pairs += _pair_folder(seq / blur_dir, seq / "sharp", seq.name + "/", report.problems)
        if not pairs:
            report.problems.append(f"{folder}: no image pairs found (empty folder?)")
        raw[split] = pairs
    val, test = split_val_test(raw["test"])
    report.pairs = {"train": raw["train"], "val": val, "test": test}
    return report


def split_val_test(pairs: Sequence[Pair]) -> tuple[list[Pair], list[Pair]]:
    """The fixed rule: natural-sorted by name, first ``ceil(n/2)`` -> val, the rest -> test."""
    ordered = sorted(pairs, key=lambda p: natural_key(p.name))
    half = math.ceil(len(ordered) / 2)
    return ordered[:half], ordered[half:]


def check_dataset(root: str | Path, *, full: bool = False, min_size: int = 0, blur_dir: str = "blur",
                  progress: bool = False) -> DataReport:
    """Scans ``root`` and checks every pair: readable, same size, at least ``min_size`` on each side.

    Args:
        root: dataset folder (either layout).
        full: decode every image (finds files truncated after their header; slower).
        min_size: smallest side a training image may have (the crop size); 0 disables the check.
        blur_dir: ``blur`` or ``blur_gamma`` (GOPRO_Large).
        progress: show a progress bar on stderr.
    """
    limit = max_pixels_limit()  # a bad NAFNET_MAX_PIXELS is one error before the scan, not one per file
    report = scan(root, blur_dir=blur_dir)
    todo = [(s, p) for s in SPLITS for p in report.pairs[s]]
    bad: set[Pair] = set()
    if progress:
        from tqdm import tqdm

        todo = tqdm(todo, desc="checking pairs", unit="pair", leave=False)
    for split, pair in todo:
        sizes = []
        for path in (pair.blur, pair.sharp):
            try:
                sizes.append(read_rgb8(path, limit).shape[:2] if full else image_size(path, limit))
            except ImageError as e:
                report.problems.append(str(e))
                bad.add(pair)
        if len(sizes) == 2:
            if sizes[0] != sizes[1]:
                report.problems.append(f"{pair.blur}: size {sizes[0][1]}x{sizes[0][0]} differs from its partner "
                                       f"{pair.sharp} ({sizes[1][1]}x{sizes[1][0]})")
                bad.add(pair)
            elif split == "train" and min(sizes[0]) < min_size:
                report.problems.append(f"{pair.blur}: {sizes[0][1]}x{sizes[0][0]} is smaller than the training crop "
                                       f"{min_size}; lower the crop or remove the pair")
                bad.add(pair)
    return report


def load_pairs(root: str | Path, blur_dir: str = "blur") -> dict[str, list[Pair]]:
    """Pairs of every split (``train``, ``val``, ``test``); raises :class:`DataError` on naming problems."""
    report = scan(root, blur_dir=blur_dir)
    report.raise_if_bad()
    return report.pairs


def write_split_lists(pairs: dict[str, list[Pair]], root: Path, out_dir: Path) -> None:
    """Writes ``<split>.txt`` (one ``blur<TAB>sharp`` line per pair, relative to the dataset root)."""
    from .fileio import atomic_write_text

    root = Path(root)
    for split, items in pairs.items():
        lines = [f"{_rel(p.blur, root)}\t{_rel(p.sharp, root)}" for p in items]
        atomic_write_text(out_dir / f"{split}.txt", f"# dataset root: {root.resolve()}\n" + "\n".join(lines) + "\n")


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
