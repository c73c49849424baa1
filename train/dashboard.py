"""TensorBoard event files in the run directory: the scalars of ``metrics.csv`` and the validation samples.

    tensorboard --logdir runs        # every run directory is one run, side by side

Rank 0 writes them, next to ``metrics.csv`` and ``samples.png``: every row of ``metrics.csv`` becomes one
point per :data:`SCALAR_TAGS` column it fills, at the same step; every validation adds the sample grid
(blur | output | sharp, one row per image) as the image ``val/samples``. A resumed run opens a new event
file whose first record purges the points after the resumed step (TensorBoard's ``purge_step``: the
points that ``metrics.csv`` also drops), so the curves continue without duplicated steps.

The ``tensorboard`` package is optional: config key ``tensorboard`` is ``auto`` (log when it imports),
``on`` (required: a missing package stops the run before any work) or ``off``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nafnet_core.errors import UserError

from .report import sample_grid

MODES = ("auto", "on", "off")

#: ``metrics.csv`` column -> TensorBoard tag.
SCALAR_TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "train_psnr": "train/psnr",
    "images_per_s": "train/images_per_s",
    "val_psnr": "val/psnr",
    "val_ssim": "val/ssim",
    "val_input_psnr": "val/input_psnr",
    "val_input_ssim": "val/input_ssim",
}
SAMPLES_TAG = "val/samples"

INSTALL_HINT = "pip install tensorboard (or pip install -e '.[tensorboard]')"


def summary_writer_class(mode: str) -> type | None:
    """``torch.utils.tensorboard.SummaryWriter`` if ``mode`` asks for it and it imports, else None.

    Args:
        mode: ``auto`` (None when the package is missing), ``on`` (a missing package raises a
            :class:`~nafnet_core.errors.UserError` saying how to install it) or ``off``.
    """
    if mode == "off":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if mode == "on":
            raise UserError(f"tensorboard=on needs the tensorboard package: {INSTALL_HINT}; or --set "
                            "tensorboard=off") from None
        return None
    return SummaryWriter


class Dashboard:
    """The run's TensorBoard writer; every method is a no-op when logging is off (or on ranks other than 0).

    Args:
        run_dir: where the event files go (the run directory).
        writer_class: :func:`summary_writer_class`'s result; None = off.
        resumed_step: the step a resumed run continues from (points after it are purged); None for a new run.
    """

    def __init__(self, run_dir: Path, writer_class: type | None, resumed_step: int | None = None):
        self.writer = None
        if writer_class is not None:
            # A new run purges from step 0: points of an earlier attempt that never saved a checkpoint.
            purge = 0 if resumed_step is None else resumed_step + 1
            self.writer = writer_class(log_dir=str(run_dir), purge_step=purge, flush_secs=30)

    @property
    def on(self) -> bool:
        return self.writer is not None

    def add_row(self, row: dict[str, Any]) -> None:
        """One point per filled :data:`SCALAR_TAGS` column of a ``metrics.csv`` row, at ``row["step"]``.

        Args:
            row: the row as :meth:`train.report.MetricsLog.add` stored it.
        """
        if self.writer is None:
            return
        for column, tag in SCALAR_TAGS.items():
            value = row.get(column, "")
            if value not in ("", None):
                self.writer.add_scalar(tag, float(value), global_step=int(row["step"]))

    def add_samples(self, samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], step: int) -> None:
        """The validation samples as one image (blur | output | sharp per row).

        Args:
            samples: uint8 HWC triples.
            step: the global step.
        """
        if self.writer is not None and samples:
            self.writer.add_image(SAMPLES_TAG, sample_grid(samples), global_step=step, dataformats="HWC")

    def flush(self) -> None:
        """Writes what is queued (called with every ``metrics.csv`` flush, so both hold the same steps)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
