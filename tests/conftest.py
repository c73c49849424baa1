"""Shared test helpers.

A freshly initialised NAFNet has beta = gamma = 0, so every block is skipped and most bugs are
invisible; on uniform noise local and global means are nearly equal, so a broken TLC passes.
`make_nontrivial` and `photo` make tests able to fail (docs/DESIGN.md §11 (Testing numerics)); they live in
benchmarks/common.py, which the benchmarks share.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Session fixtures of the runtime tests (an exported tiny model, the synthetic set), defined once so that
# every test module shares one export instead of building its own.
pytest_plugins = ["tests.test_runtime_fixtures"]
import torch

from benchmarks.common import make_nontrivial, photo  # noqa: F401 (the tests import them from here)


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (the README's test command runs ``-n auto``), each worker gets its share of the cores:
    torch intra-op threads and OMP/MKL threads of the subprocesses it starts (CLI, DDP ranks). Two workers of two
    OpenMP threads each on two cores wait on each other's threads (see ``one_thread``)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        share = str(max(1, (os.cpu_count() or 1) // workers))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = share
        torch.set_num_threads(int(share))


_share_the_cores_between_workers()


def small_model(seed: int | None = None) -> torch.nn.Module:
    """The smallest useful NAFNet for fast tests: width 4, two levels, non-trivial weights."""
    from nafnet_core import create_model

    if seed is not None:
        torch.manual_seed(seed)
    return make_nontrivial(create_model("tiny", width=4, enc_blk_nums=(1, 1), dec_blk_nums=(1, 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the test modules that use it (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): their tiny models gain nothing from two, and on a machine whose cores are
    busy with other work two OpenMP threads waiting on each other made a 32-px step 200x slower
    (9.2 s vs 0.044 s measured here)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def tiny_model():
    from nafnet_core import create_model

    torch.manual_seed(0)
    return make_nontrivial(create_model("tiny"))


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
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
x = torch.empty(64 * 2**20 // 4)
print(json.dumps(libc.mallinfo2().hblkhd))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          cwd=str(Path(__file__).resolve().parents[1]))
    return json.loads(proc.stdout.splitlines()[-1])
