"""Everything about a TensorRT build that needs no GPU: options, profiles, cache location, records.

The thin part that imports TensorRT is :mod:`export.tensorrt_build`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from nafnet_core.errors import UserError

from .shapes import DEFAULT_PROFILE

INSTALL_HINT = ('install it on a machine with an NVIDIA GPU: pip install -e ".[trt]" (tensorrt>=10.12), '
                "or use NVIDIA's TensorRT container")


class TensorRTUnavailable(UserError, RuntimeError):
    """TensorRT or a CUDA GPU is missing; the ONNX artifacts were still written."""


def missing_message(what: str, out_dir: str | Path | None = None) -> str:
    """One sentence: what is missing, how to install it, and that the ONNX files are there."""
    where = f"; the ONNX artifacts and manifest in {out_dir} were written" if out_dir is not None else ""
    return f"--trt needs {what}: {INSTALL_HINT}{where}."


@dataclass(frozen=True)
class TrtOptions:
    """TensorRT builder settings.

    Args:
        workspace_gib: builder workspace memory pool limit (GiB).
        opt_level: builder optimisation level 0-5 (TensorRT default 3; higher builds slower, may run faster).
        timing_cache: timing cache file, read if present and rewritten after the build
            (None: :func:`default_timing_cache`).
        profile_hw: (min, opt, max) (height, width) of the dynamic graph's optimisation profile.
        max_batch: largest batch of the dynamic profile.
    """

    workspace_gib: float = 4.0
    opt_level: int = 3
    timing_cache: Path | None = None
    profile_hw: tuple = field(default=DEFAULT_PROFILE)
    max_batch: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.opt_level <= 5:
            raise ValueError(f"builder optimisation level must be 0..5, got {self.opt_level}")
        if self.workspace_gib <= 0:
            raise ValueError(f"workspace must be positive, got {self.workspace_gib} GiB")

    @property
    def workspace_bytes(self) -> int:
        return int(self.workspace_gib * 2**30)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nafnet-deblurring" / "tensorrt"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


def default_timing_cache(trt_version: str, gpu_name: str, compute_capability: str) -> Path:
    """Per TensorRT version and GPU (a cache is only valid for both): ``~/.cache/.../trt-10.13.0-nvidia-l4-sm89.cache``."""
    sm = compute_capability.replace(".", "")
    return cache_dir() / f"trt-{_slug(trt_version)}-{_slug(gpu_name)}-sm{sm}.cache"
