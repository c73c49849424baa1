"""What a run writes besides checkpoints: ``metrics.csv``, ``curves.png`` and ``samples.png``."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from nafnet_core.fileio import atomic_path, atomic_write_text
from nafnet_core.images import resize_bicubic, write_rgb8

METRIC_COLUMNS = ("step", "epoch", "kind", "lr", "loss", "train_psnr", "val_psnr", "val_ssim", "val_input_psnr",
                  "val_input_ssim", "images_per_s", "elapsed_s")


def csv_text(columns, rows: list[dict], float_format: str) -> str:
    """CSV with a header of ``columns``; float cells formatted with ``float_format`` (e.g. ``.6f``)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (format(v, float_format) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


class MetricsLog:
    """Rows of ``metrics.csv`` (``kind`` = train | val), rewritten atomically on every :meth:`flush`.

    On resume, :meth:`load` keeps only the rows up to the resumed step, so the file never holds the
    steps an interrupted run took after its last checkpoint twice.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[dict] = []

    def load(self, up_to_step: int) -> None:
        if self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f)
                             if r.get("step", "").isdigit() and int(r["step"]) <= up_to_step]

    def add(self, **row) -> dict:
        """Appends a row (missing columns empty) and returns it as stored."""
        self.rows.append({k: row.get(k, "") for k in METRIC_COLUMNS})
        return self.rows[-1]

    def flush(self) -> None:
        atomic_write_text(self.path, csv_text(METRIC_COLUMNS, self.rows, ".6g"))

    def series(self, kind: str, key: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for r in self.rows:
            if r["kind"] == kind and r[key] not in ("", None):
                value = float(r[key])
                if math.isfinite(value):
                    xs.append(int(r["step"]))
                    ys.append(value)
        return xs, ys


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display here), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int) -> None:
    """Lay out ``fig``, write it to ``path`` as PNG atomically, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def plot_curves(log: MetricsLog, path: str | Path, title: str = "") -> None:
    """Loss, PSNR (train and validation, with the blurry input's as a reference) and SSIM vs step."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(*log.series("train", "loss"), lw=1)
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot(*log.series("train", "train_psnr"), lw=1, alpha=0.6, label="train (crops)")
    axes[1].plot(*log.series("val", "val_psnr"), "o-", label="validation")
    axes[1].plot(*log.series("val", "val_input_psnr"), "--", color="gray", label="blurry input")
    axes[1].set(title="PSNR (dB)", xlabel="step")
    axes[1].legend()
    axes[2].plot(*log.series("val", "val_ssim"), "o-", label="validation")
    axes[2].plot(*log.series("val", "val_input_ssim"), "--", color="gray", label="blurry input")
    axes[2].set(title="SSIM", xlabel="step")
    axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    save_figure(fig, path, dpi=80)


def sample_grid(samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], max_width: int = 1536) -> np.ndarray:
    """One row per image: blur | output | sharp (each row scaled so it fits ``max_width``)."""
    rows = []
    for triple in samples:
        row = np.concatenate(triple, axis=1)
        if row.shape[1] > max_width:
            h = round(row.shape[0] * max_width / row.shape[1])
            row = resize_bicubic(row, h, max_width)
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(rows, axis=0)


def write_sample_grid(samples, path: str | Path) -> None:
    if samples:
        write_rgb8(path, sample_grid(samples))


def labelled_row(panels: list[tuple[str, np.ndarray]], scale: int = 2, gap: int = 8) -> np.ndarray:
    """Images side by side, each enlarged ``scale`` times (nearest neighbour) under a caption.

    Args:
        panels: (caption, uint8 HWC RGB image) pairs, all of the same size.
        scale: integer enlargement, so that the blur (or its absence) is visible pixel by pixel.
        gap: white pixels between panels and around the captions.
    """
    from PIL import Image, ImageDraw, ImageFont

    h, w = panels[0][1].shape[:2]
    if any(img.shape[:2] != (h, w) for _, img in panels):
        raise ValueError(f"panels differ in size: {[img.shape[:2] for _, img in panels]}")
    font = ImageFont.load_default(size=max(12, 9 * scale))
    band = font.getbbox("Ag")[3] + 2 * gap
    pw, ph = w * scale, h * scale
    canvas = Image.new("RGB", (len(panels) * pw + (len(panels) - 1) * gap, band + ph), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (caption, img) in enumerate(panels):
        x = i * (pw + gap)
        canvas.paste(Image.fromarray(img).resize((pw, ph), Image.NEAREST), (x, band))
        draw.text((x + gap, gap), caption, fill="black", font=font)
    return np.asarray(canvas)
