"""Process-wide memory facts and settings: peak RSS, and glibc's treatment of freed memory.

glibc maps every block above its dynamic threshold (at most 32 MB) afresh from the kernel and unmaps it on
free, so a program that allocates and frees the same large tensors over and over (a training step's
full-resolution activations) page-faults in zeroed pages in every op. :func:`keep_freed_memory` serves such
blocks from the heap instead and keeps freed heap memory for the next ones; :func:`release_free_memory`
hands the free part back to the kernel (between benchmark steps, so that idle processes stay small).
Both do nothing on other C libraries.
"""

from __future__ import annotations

import ctypes
import platform
import resource
from pathlib import Path

#: glibc's ``mallopt`` parameters (malloc.h) and the size up to which freed memory stays in the heap.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_BYTES = 1 << 30


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None)


def keep_freed_memory() -> bool:
    """Serves allocations up to :data:`KEEP_BYTES` from the heap and never trims it (glibc ``mallopt``).

    Returns:
        True when applied; False on a C library other than glibc, where nothing changes.
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))


def release_free_memory() -> None:
    """Returns the heap's free pages to the kernel (glibc ``malloc_trim``); the peak RSS is unchanged."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): VmHWM from /proc.

    Not ``ru_maxrss`` where /proc exists: Linux carries the parent's peak over fork + exec into it, so every
    process started by a benchmark holding several models reported the parent's 7.5 GB.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # other systems (KiB on Linux, bytes on macOS)
