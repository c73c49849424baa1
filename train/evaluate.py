"""Evaluation on whole images: PSNR/SSIM of the output and of the blurry input, per image and mean.

Used by validation during training and by ``python cli.py eval``. Outputs are rounded to uint8 before
scoring (docs/DESIGN.md §6 (Metrics)), so the figures are those of the PNG files the model would write.

A multi-head model is scored on every output (``head_psnr`` / ``head_ssim`` per image); the ``psnr`` and
``ssim`` columns are those of one head, the model's deployment head unless :meth:`EvalResult.with_head`
picks another (validation picks :meth:`EvalResult.best_head`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nafnet_core.adarevd import AdaRevD
from nafnet_core.data import Pair
from nafnet_core.errors import UserError
from nafnet_core.fileio import atomic_write_text
from nafnet_core.images import read_rgb8
from nafnet_core.metrics import SSIM_WINDOW, psnr, quantize, ssim
from nafnet_core.model import NAFNet
from nafnet_core.tlc import convert_to_tlc, is_tlc

from .data import to_chw
from .report import csv_text

COLUMNS = ("name", "height", "width", "psnr", "ssim", "input_psnr", "input_ssim", "seconds")


@dataclass
class EvalResult:
    """Per-image rows (dicts with :data:`COLUMNS`) and their means; ``samples`` holds (blur, out, sharp) uint8.

    Multi-head models (``n_outputs > 1``): each row also holds ``head_psnr`` and ``head_ssim`` (one value per
    output); ``psnr``/``ssim`` (and the samples) are those of output ``head``. AdaRevD models: the outputs are
    the exit depths 1..K and then the adaptive result (``head`` K, the default), and each row holds ``exits``,
    how many tiles left at each depth 0..K.

    ``failed`` maps each pair that could not be scored (unreadable file, size mismatch, smaller than the
    SSIM window) to a one-line reason naming the file; the means are over the scored pairs only.
    """

    rows: list[dict]
    tlc: bool
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    head: int = 0
    n_outputs: int = 1
    outputs: list[np.ndarray] = field(default_factory=list, repr=False)  # every output of the sample images

    def mean(self, key: str) -> float:
        values = [r[key] for r in self.rows]
        return float(np.mean(values)) if values else math.nan

    def head_means(self, key: str = "psnr") -> list[float]:
        """Mean ``key`` (``psnr`` or ``ssim``) of every output over the images."""
        if self.n_outputs == 1:
            return [self.mean(key)]
        return [float(v) for v in np.mean([r[f"head_{key}"] for r in self.rows], axis=0)] if self.rows \
            else [math.nan] * self.n_outputs

    def best_head(self) -> int:
        """The output with the best mean PSNR (the first of equals); 0 for a single-head model."""
        means = self.head_means("psnr")
        return int(np.argmax(means)) if self.rows else self.head

    def with_head(self, k: int) -> EvalResult:
        """The same scores with output ``k`` in the ``psnr``/``ssim`` columns and the samples."""
        if k == self.head:
            return self
        if not 0 <= k < self.n_outputs:
            raise ValueError(f"head must be in 0..{self.n_outputs - 1}, got {k}")
        rows = [{**r, "psnr": r["head_psnr"][k], "ssim": r["head_ssim"][k]} for r in self.rows]
        samples = [(b, outs[k], s) for (b, _, s), outs in zip(self.samples, self.outputs)]
        return EvalResult(rows=rows, tlc=self.tlc, samples=samples, failed=self.failed, head=k,
                          n_outputs=self.n_outputs, outputs=self.outputs)

    def summary(self) -> dict:
        out = {"psnr": self.mean("psnr"), "ssim": self.mean("ssim"), "input_psnr": self.mean("input_psnr"),
               "input_ssim": self.mean("input_ssim"), "images": len(self.rows), "tlc": self.tlc,
               "seconds_per_image": self.mean("seconds"), "failed": len(self.failed)}
        if self.n_outputs > 1:
            out |= {"head": self.head, "best_head": self.best_head(),
                    "heads": [{"psnr": p, "ssim": s} for p, s in zip(self.head_means("psnr"), self.head_means("ssim"))]}
        if self.rows and "exits" in self.rows[0]:
            out["exit_histogram"] = self.exit_histogram()
        return out

    def exit_histogram(self) -> list[int]:
        """AdaRevD: tiles of all images that left at each depth 0..K (the adaptive result)."""
        return [int(v) for v in np.sum([r["exits"] for r in self.rows], axis=0)] if self.rows else []

    def columns(self) -> tuple[str, ...]:
        """:data:`COLUMNS`, then ``psnr_h<k>`` / ``ssim_h<k>`` of every output of a multi-head model."""
        if self.n_outputs == 1:
            return COLUMNS
        return COLUMNS + tuple(f"{m}_h{k}" for m in ("psnr", "ssim") for k in range(self.n_outputs))

    def csv_text(self) -> str:
        rows = [{**{c: r[c] for c in COLUMNS},
                 **{f"{m}_h{k}": v for m in ("psnr", "ssim") for k, v in enumerate(r.get(f"head_{m}", []))}}
                for r in self.rows]
        return csv_text(self.columns(), rows, ".6f")

    def write_csv(self, path: str | Path) -> None:
        atomic_write_text(path, self.csv_text())

    def write_json(self, path: str | Path, **extra) -> None:
        atomic_write_text(path, json.dumps({**self.summary(), **extra, "per_image": self.rows,
                                            "failures": self.failed}, indent=1) + "\n")


def _check_pair(pair: Pair, blur8: np.ndarray, sharp8: np.ndarray) -> None:
    """Raises a UserError naming the file if the pair cannot be scored."""
    if blur8.shape != sharp8.shape:
        raise UserError(f"{pair.blur}: size {blur8.shape[1]}x{blur8.shape[0]} differs from its partner "
                        f"{pair.sharp} ({sharp8.shape[1]}x{sharp8.shape[0]})")
    if min(blur8.shape[:2]) < SSIM_WINDOW:
        raise UserError(f"{pair.blur}: {blur8.shape[1]}x{blur8.shape[0]} is too small to score (SSIM needs at "
                        f"least {SSIM_WINDOW}x{SSIM_WINDOW} pixels)")


def prepare_model(model: NAFNet, tlc: bool, train_size: int) -> NAFNet:
    """The model as evaluated: TLC-converted copy (train size = crop) or the model itself."""
    if tlc and not is_tlc(model):
        return convert_to_tlc(model, train_size=train_size)
    return model


@torch.no_grad()
def evaluate(model: NAFNet, pairs: Sequence[Pair], *, tlc: bool = True, train_size: int = 256,
             device: torch.device | str = "cpu", max_images: int = 0, keep_samples: int = 0,
             images: Sequence[tuple[np.ndarray, np.ndarray]] | None = None, progress: bool = False) -> EvalResult:
    """Restores every pair at full resolution and scores it.

    A pair that cannot be scored (unreadable, sizes differ, too small) is recorded in ``failed`` and the
    others are still scored.

    Args:
        model: the network (global pooling; converted to TLC here when ``tlc``).
        pairs: the pairs to score.
        tlc: evaluate with TLC at ``train_size``.
        train_size: the crop size the model was trained on.
        device: where to run.
        max_images: evaluate only the first N pairs (0 = all).
        keep_samples: keep (blur, output, sharp) of the first N images for a sample grid.
        images: already decoded (blur, sharp) uint8 arrays for ``pairs`` (skips decoding).
        progress: show a progress bar on stderr.
    """
    pairs = list(pairs)[:max_images] if max_images else list(pairs)
    was_training = model.training
    net = prepare_model(model, tlc, train_size).to(device).eval()
    adarevd = isinstance(model, AdaRevD)
    # AdaRevD: every exit depth 1..K, then the adaptive result (reported; each tile at its classifier's depth)
    n_outputs = model.depth + 1 if adarevd else model.config.n_outputs
    result = EvalResult(rows=[], tlc=tlc, head=model.depth if adarevd else model.head, n_outputs=n_outputs)
    it = range(len(pairs))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="evaluating", unit="img", leave=False)
    try:
        for i in it:
            pair = pairs[i]
            try:
                blur8, sharp8 = images[i] if images is not None else (read_rgb8(pair.blur), read_rgb8(pair.sharp))
                _check_pair(pair, blur8, sharp8)
            except UserError as e:
                result.failed[pair.name] = str(e)
                continue
            blur, sharp = to_chw(blur8)[None].to(device), to_chw(sharp8)[None].to(device)
            if device != "cpu" and torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if adarevd:
                adaptive, depths = net(blur, return_depths=True)
                outs_q = quantize(torch.cat([net(blur, all_heads=True)[0], adaptive], 0))  # (K + 1, 3, H, W)
            else:
                outs_q = quantize(net(blur, all_heads=True)[0])  # (n_outputs, 3, H, W)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            sharp_q, blur_q = quantize(sharp), quantize(blur)
            head_psnr = [float(v) for v in psnr(outs_q, sharp_q.expand_as(outs_q))]
            head_ssim = [float(v) for v in ssim(outs_q, sharp_q.expand_as(outs_q))]
            row = {
                "name": pair.name, "height": int(blur8.shape[0]), "width": int(blur8.shape[1]),
                "psnr": head_psnr[result.head], "ssim": head_ssim[result.head],
                "input_psnr": float(psnr(blur_q, sharp_q)[0]), "input_ssim": float(ssim(blur_q, sharp_q)[0]),
                "seconds": seconds,
            }
            if n_outputs > 1:
                row |= {"head_psnr": head_psnr, "head_ssim": head_ssim}
            if adarevd:  # tiles leaving at each depth 0..K
                row["exits"] = torch.bincount(depths.cpu(), minlength=model.depth + 1).tolist()
            result.rows.append(row)
            if i < keep_samples:
                outs8 = [o.permute(1, 2, 0).cpu().numpy() for o in outs_q]
                result.samples.append((blur8, outs8[result.head], sharp8))
                if n_outputs > 1:
                    result.outputs.append(outs8)
    finally:
        model.train(was_training)
    return result


def evaluate_checkpoint(path: str | Path, *, preset: str | None = None, train_size: int | None = None,
                        data: str | Path | None = None, split: str = "test", tlc: bool = True, max_images: int = 0,
                        device: str | None = None, progress: bool = True) -> tuple[EvalResult, dict]:
    """Loads a checkpoint (project file, or official .pth with ``preset``) and scores it on ``split``.

    The data set defaults to the one the run trained on (stored in the checkpoint), else the embedded
    synthetic set. Returns the result and a dict describing what was evaluated (for the JSON file).
    """
    from nafnet_core.checkpoint import load_checkpoint
    from nafnet_core.data import load_pairs
    from nafnet_core.synth import ensure_synthetic

    ckpt = load_checkpoint(path, preset=preset)
    tcfg = ckpt.extra.get("train_config") or {}
    if data is None:
        data = tcfg.get("data") or ensure_synthetic(tcfg.get("synth_seed", 0), tcfg.get("synth_count", 24),
                                                     progress=progress, shake=tcfg.get("synth_shake", 1.0))
    pairs = load_pairs(data, blur_dir=tcfg.get("blur_dir", "blur"))[split]
    size = train_size or ckpt.train_size
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = evaluate(ckpt.model, pairs, tlc=tlc, train_size=size, device=dev, max_images=max_images,
                      progress=progress)
    meta = {"checkpoint": str(path), "data": str(data), "split": split, "train_size": size,
            "preset": ckpt.preset, "step": ckpt.extra.get("step")}
    if ckpt.config.n_outputs > 1:
        meta |= {"model_heads": ckpt.config.heads, "recorded_head": ckpt.model.head}
    return result, meta
