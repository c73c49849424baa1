"""Plain helpers of the tests: constants, small models, weight randomising, photos (no fixtures, no hooks).

A freshly initialised NAFNet has beta = gamma = 0, so every block is skipped and most bugs are
invisible; on uniform noise local and global means are nearly equal, so a broken TLC passes.
`make_nontrivial` and `photo` make tests able to fail (docs/DESIGN.md §11 (Testing numerics)); they live in
benchmarks/common.py, which the benchmarks share. The fixtures built from these are in tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.common import make_nontrivial, photo

__all__ = ["TRAIN_SIZE", "TILE", "MINI", "make_nontrivial", "photo", "small_model", "mmapped_bytes_of_a_64mb_tensor",
           "short_cfg", "assert_resume_is_exact", "has_trt_gpu"]

ROOT = Path(__file__).resolve().parents[1]


def has_trt_gpu() -> bool:
    """TensorRT importable and a CUDA GPU present: the condition of the engine tests."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()

TRAIN_SIZE = 64  # TLC windows of 96/48/24/12/6 px: TLC matters on the small test images
TILE = 64
#: tiny with one block at level 0 (encoder and decoder) and one in the middle: TLC still acts at the
#: finest and coarsest level, and the dynamic-shape ONNX export takes ~15 s instead of ~60 s
#: (torch.export's symbolic reasoning grows with every TLC block).
MINI = dict(enc_blk_nums=(1, 0, 0, 0), middle_blk_num=1, dec_blk_nums=(0, 0, 0, 1))


def small_model(seed: int | None = None) -> torch.nn.Module:
    """The smallest useful NAFNet for fast tests: width 4, two levels, non-trivial weights."""
    from nafnet_core import create_model

    if seed is not None:
        torch.manual_seed(seed)
    return make_nontrivial(create_model("tiny", width=4, enc_blk_nums=(1, 1), dec_blk_nums=(1, 1)))


def mmapped_bytes_of_a_64mb_tensor(setup: str) -> int:
    """Bytes glibc holds in mmapped blocks (``mallinfo2().hblkhd``) after allocating a 64 MB tensor, in a fresh
    process that first runs ``setup`` (Python code). Skips where the C library is not glibc."""
    import json
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("reuse_memory acts on glibc's allocator only; this C library is not glibc")
    script = f"""
import ctypes, json, torch
{setup}
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in FIELDS]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
x = torch.empty(64 * 2**20 // 4)
print(json.dumps(libc.mallinfo2().hblkhd))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=str(ROOT))
    return json.loads(proc.stdout.splitlines()[-1])


def short_cfg(**kw):
    """A 12-step run of the tiny preset on 32-px crops (dropout, EMA, a validation and a save every few steps):
    the short training run of the resume, failure and variant tests; ``kw`` overrides any key."""
    from train.config import build_config

    sets = {"steps": 12, "crop": 32, "batch": 4, "val_every": 6, "save_every": 3, "log_every": 1, "dropout": 0.1,
            "val_max": 1, "ema": 0.9}
    return build_config("tiny", sets={**sets, **kw})


def assert_resume_is_exact(cfg, tmp_path) -> None:
    """Trains ``cfg`` uninterrupted and stopped at step 5 then resumed: identical weights, EMA, best and log."""
    from nafnet_core import read_checkpoint
    from train.loop import train

    full = train(cfg, tmp_path / "full", progress=False)
    part = train(cfg, tmp_path / "part", progress=False, stop_at=5)
    assert part.status == "stopped_at" and part.step == 5
    resumed = train(cfg, tmp_path / "part", progress=False, resume=True)
    assert resumed.step == full.step == cfg.steps
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    ea, eb = (read_checkpoint(p / "last.pt")["extra"] for p in (tmp_path / "full", tmp_path / "part"))
    assert all(torch.equal(ea["ema"][k], eb["ema"][k]) for k in ea["ema"])
    assert ea["best_psnr"] == eb["best_psnr"] and ea["best_step"] == eb["best_step"]
    # metrics.csv: identical except the timing columns (images_per_s, elapsed_s).
    rows = lambda p: [r.split(",")[:-2] for r in (p / "metrics.csv").read_text().splitlines()]  # noqa: E731
    assert rows(tmp_path / "full") == rows(tmp_path / "part")
    with pytest.raises(Exception, match="already holds a run"):
        train(cfg, tmp_path / "full", progress=False)
