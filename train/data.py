"""Feeding GoPro pairs to training: paired transforms, the dataset and the deterministic sample stream.

Augmentation is deterministic per sample: the crop position and flips of sample ``i`` in epoch ``e`` come
from ``numpy.random.default_rng([seed, e, i])``, and the order of samples is a pure function of
``(seed, step)`` (:class:`SampleStream`). That is what makes resume exact, and what makes one process and
several DDP processes with the same global batch see the same images. The pairs themselves and the splits
come from :mod:`nafnet_core.data`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nafnet_core.data import DataError, Pair
from nafnet_core.images import read_rgb8, resize_bicubic

CROP_MODES = ("random", "center", "resize", "none")


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
