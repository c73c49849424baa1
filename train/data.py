"""GoPro data: find the pairs, check them, split them, and feed them to training.

Two layouts are read (``ROOT`` is the folder you pass):

- the seed's ``DBlur`` layout: ``ROOT/{train,test}/{blur,sharp}/NAME`` (same NAME in both folders);
- the original ``GOPRO_Large`` layout: ``ROOT/{train,test}/SEQUENCE/{blur,blur_gamma,sharp}/NAME``
  (``blur`` by default, ``blur_gamma`` with ``blur_dir="blur_gamma"``).

The ``test`` folder is split into **validation** and **test** halves by one fixed rule
(:func:`split_val_test`): pairs in natural-sorted order of their name (``SEQUENCE/NAME``), the first
``ceil(n / 2)`` are ``val``, the rest ``test``. Contiguous halves keep whole sequences together (only the
one sequence at the boundary is shared), so selecting a checkpoint on ``val`` does not peek at near-identical
frames of ``test``. Training writes the lists it used into the run directory.

Augmentation is deterministic per sample: the crop position and flips of sample ``i`` in epoch ``e`` come
from ``numpy.random.default_rng([seed, e, i])``, and the order of samples is a pure function of
``(seed, step)`` (:class:`SampleStream`). That is what makes resume exact, and what makes one process and
several DDP processes with the same global batch see the same images.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from nafnet_core.errors import UserError
from nafnet_core.images import ImageError, image_size, is_image_file, max_pixels_limit, read_rgb8

RAW_SPLITS = ("train", "test")
SPLITS = ("train", "val", "test")
LAYOUTS = ("dblur", "gopro_large")
CROP_MODES = ("random", "center", "resize", "none")


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
    from nafnet_core.fileio import atomic_write_text

    root = Path(root)
    for split, items in pairs.items():
        lines = [f"{_rel(p.blur, root)}\t{_rel(p.sharp, root)}" for p in items]
        atomic_write_text(out_dir / f"{split}.txt", f"# dataset root: {root.resolve()}\n" + "\n".join(lines) + "\n")


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------------
# Paired transforms: numpy uint8 HWC in, same out; every random choice comes from the caller's rng.


@dataclass(frozen=True)
class PairTransform:
    """Applies the same crop/resize and flips to blur and sharp.

    Args:
        crop_mode: ``random`` (random crop at native resolution), ``center``, ``resize`` (bicubic resize of
            the whole image to ``size`` x ``size``, the seed's mode) or ``none``.
        size: crop / resize side in pixels.
        hflip: probability of a horizontal flip.
        vflip: probability of a vertical flip.
        transpose: probability of swapping H and W.
    """

    crop_mode: str = "random"
    size: int = 256
    hflip: float = 0.5
    vflip: float = 0.5
    transpose: float = 0.5

    def __post_init__(self) -> None:
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {', '.join(CROP_MODES)}, got {self.crop_mode!r}")

    def __call__(self, blur: np.ndarray, sharp: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = blur.shape[:2]
        s = self.size
        if self.crop_mode in ("random", "center") and (h < s or w < s):
            raise DataError(f"image of {w}x{h} is smaller than the crop {s}; lower the crop size")
        if self.crop_mode == "random":
            top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            blur, sharp = blur[top:top + s, left:left + s], sharp[top:top + s, left:left + s]
        elif self.crop_mode == "center":
            top, left = (h - s) // 2, (w - s) // 2
            blur, sharp = blur[top:top + s, left:left + s], sharp[top:top + s, left:left + s]
        elif self.crop_mode == "resize":
            blur, sharp = resize_bicubic(blur, s, s), resize_bicubic(sharp, s, s)
        # One draw per flip whatever the probabilities, so changing one leaves the others' draws alone.
        u = rng.random(3)
        if u[0] < self.hflip:
            blur, sharp = blur[:, ::-1], sharp[:, ::-1]
        if u[1] < self.vflip:
            blur, sharp = blur[::-1], sharp[::-1]
        if u[2] < self.transpose:
            blur, sharp = blur.transpose(1, 0, 2), sharp.transpose(1, 0, 2)
        return np.ascontiguousarray(blur), np.ascontiguousarray(sharp)


def resize_bicubic(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of uint8 HWC (Pillow's, antialiased when shrinking, as torchvision's Resize on images)."""
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BICUBIC))


def to_chw(rgb: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float32 CHW in [0, 1]."""
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)


class PairDataset(torch.utils.data.Dataset):
    """Pairs as ``(blur, sharp)`` float CHW tensors.

    Indexed by ``(index, epoch)`` (what :class:`SampleStream` yields) or a plain index (epoch 0); the
    transform's randomness comes from ``default_rng([seed, epoch, index])``.

    Args:
        pairs: the pairs.
        transform: paired transform, or None for whole images.
        seed: augmentation seed.
        cache: keep decoded images in memory (small data sets such as the synthetic one).
    """

    def __init__(self, pairs: Sequence[Pair], transform: PairTransform | None = None, seed: int = 0,
                 cache: bool = False):
        self.pairs = list(pairs)
        self.transform = transform
        self.seed = seed
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        pair = self.pairs[index]
        blur, sharp = read_rgb8(pair.blur), read_rgb8(pair.sharp)
        if blur.shape != sharp.shape:
            raise DataError(f"{pair.blur}: size {blur.shape[1]}x{blur.shape[0]} differs from its partner "
                            f"{pair.sharp} ({sharp.shape[1]}x{sharp.shape[0]})")
        if self.cache is not None:
            self.cache[index] = (blur, sharp)
        return blur, sharp

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        blur, sharp = self.load(index)
        if self.transform is not None:
            blur, sharp = self.transform(blur, sharp, np.random.default_rng([self.seed, epoch, index]))
        return to_chw(blur), to_chw(sharp)


class SampleStream:
    """The training order: an endless stream of samples, epoch after epoch, each epoch a seeded permutation.

    Global step ``k`` consumes stream positions ``[k*B, (k+1)*B)`` (``B`` = global batch). Within a step,
    micro-batch ``a`` (gradient accumulation) of rank ``r`` takes the chunk ``a * world + r`` of size
    ``B / (world * accum)``. So the samples of a step do not depend on how many processes share it, and
    position ``p`` is sample ``perm_e[p % n]`` of epoch ``e = p // n`` (an epoch need not end on a step).

    Args:
        n: data set size.
        batch: global batch ``B``.
        seed: permutation seed (epoch ``e`` uses ``default_rng([seed, e])``).
        world / rank: DDP processes and this one's rank.
        accum: micro-batches per step.
        shuffle: permute each epoch (False: 0..n-1 in order).
    """

    def __init__(self, n: int, batch: int, seed: int = 0, world: int = 1, rank: int = 0, accum: int = 1,
                 shuffle: bool = True):
        if n < 1:
            raise DataError("the training split is empty")
        if batch % (world * accum):
            raise ValueError(f"global batch {batch} must be divisible by processes x accumulation = {world} x {accum}")
        self.n, self.batch, self.seed, self.world, self.rank, self.accum = n, batch, seed, world, rank, accum
        self.shuffle = shuffle
        self.micro = batch // (world * accum)
        self._perms: dict[int, np.ndarray] = {}

    def perm(self, epoch: int) -> np.ndarray:
        p = self._perms.get(epoch)
        if p is None:
            p = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = p
        return p

    def sample(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.n)
        return int(self.perm(epoch)[offset]), epoch

    def micro_batch(self, step: int, micro: int) -> list[tuple[int, int]]:
        start = step * self.batch + (micro * self.world + self.rank) * self.micro
        return [self.sample(p) for p in range(start, start + self.micro)]

    def epoch_at(self, step: int) -> float:
        """Epochs completed before ``step`` (fractional)."""
        return step * self.batch / self.n

    def batches(self, start_step: int) -> Iterator[list[tuple[int, int]]]:
        """Micro-batches of this rank from ``start_step`` on, forever (use as a DataLoader batch_sampler)."""
        step = start_step
        while True:
            for a in range(self.accum):
                yield self.micro_batch(step, a)
            step += 1


class _BatchSampler(torch.utils.data.Sampler):
    def __init__(self, stream: SampleStream, start_step: int):
        self.stream, self.start_step = stream, start_step

    def __iter__(self):
        return self.stream.batches(self.start_step)


def train_loader(dataset: PairDataset, stream: SampleStream, start_step: int, workers: int = 0,
                 pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """An endless DataLoader of this rank's micro-batches starting at ``start_step``."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=_BatchSampler(stream, start_step), num_workers=workers,
                                       pin_memory=pin_memory, persistent_workers=False,
                                       prefetch_factor=2 if workers else None)
