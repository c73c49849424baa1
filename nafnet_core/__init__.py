"""nafnet_core: NAFNet, TLC, presets, checkpoints and metrics.

    import nafnet_core as nc
    model = nc.create_model("nafnet-gopro-width32")
    ckpt = nc.load_checkpoint("NAFNet-GoPro-width32.pth", preset="nafnet-gopro-width32")
    tlc_model = nc.convert_to_tlc(ckpt.model, train_size=256)
"""

from __future__ import annotations

from typing import Any

from .checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    save_official,
)
from .config import DEFAULT_BASE_RATIO, DEFAULT_TRAIN_SIZE, GATES, PRESET_PARAMS, PRESETS, ModelConfig, get_config
from .errors import UserError
from .family import build_model
from .flops import model_gflops
from .metrics import psnr, psnr_loss, quantize, ssim, ssim3d
from .model import NAFBlock, NAFNet, count_parameters
from .tlc import LocalAvgPool2d, convert_to_tlc, is_tlc, local_mean, tlc_kernels

__version__ = "0.1.0"


def create_model(preset: str = "nafnet-gopro-width32", **overrides: Any) -> NAFNet:
    """A freshly initialised model of ``preset`` with ``overrides`` (e.g. ``width=16``) merged on top (a NAFNet, or
    an :class:`~nafnet_core.adarevd.AdaRevD` for the ``adarevd`` presets)."""
    return build_model(get_config(preset, **overrides))


__all__ = [
    "__version__",
    "create_model", "load_checkpoint", "save_checkpoint", "read_checkpoint", "save_official",
    "convert_to_tlc", "tlc_kernels", "local_mean", "is_tlc", "LocalAvgPool2d",
    "psnr", "ssim", "ssim3d", "psnr_loss", "quantize",
    "ModelConfig", "PRESETS", "PRESET_PARAMS", "GATES", "DEFAULT_TRAIN_SIZE", "DEFAULT_BASE_RATIO", "get_config",
    "NAFNet", "NAFBlock", "build_model", "count_parameters", "model_gflops",
    "CheckpointError", "LoadedCheckpoint", "UserError",
]
