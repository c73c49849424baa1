"""What the benchmarks share: one timing helper, one weight randomiser, the photos, the machine's description.

- :func:`interleaved` times several callables in turns (A, B, C, A, B, C, ...) after warm-up calls and
  gives medians and ratios against a reference, so that load that comes and goes on a shared machine hits
  every contender alike.
- :func:`make_nontrivial`: a freshly initialised NAFNet has beta = gamma = 0, so every block is skipped and
  most bugs are invisible (the tests use it for that reason); timings and parity figures of such a model
  would describe a model that does nothing.
- :func:`photo`: on uniform noise local and global means are nearly equal, so a broken TLC passes; the
  benchmarks and tests use scikit-image's bundled photos (the product's own, :mod:`export.samples`).
- :func:`machine`: what the figures depend on, for their headers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from export.samples import photo

__all__ = ["Timings", "interleaved", "make_nontrivial", "photo", "machine", "machine_line", "is_isa_flag"]


@dataclass
class Timings:
    """Seconds of every timed call, per name, in round order (names keep the order they were timed in), and what
    each callable returned on its last call."""

    seconds: dict[Hashable, list[float]]
    last: dict[Hashable, object] = field(default_factory=dict)

    @property
    def reference(self) -> Hashable:
        """The first name: the default reference of :meth:`ratios`."""
        return next(iter(self.seconds))

    def median(self, name: Hashable) -> float:
        return statistics.median(self.seconds[name])

    def medians(self) -> dict[Hashable, float]:
        return {name: self.median(name) for name in self.seconds}

    def ratios(self, reference: Hashable | None = None) -> dict[Hashable, float]:
        """``median(name) / median(reference)`` for every name (``reference``: the first name by default)."""
        base = self.median(self.reference if reference is None else reference)
        return {name: self.median(name) / base for name in self.seconds}


def interleaved(calls: Mapping[Hashable, Callable[[], object]], rounds: int, warmup: int = 1, *,
                self_timed: bool = False, clock: Callable[[], float] = time.perf_counter) -> Timings:
    """Times ``calls`` in turns: ``warmup`` untimed rounds, then ``rounds`` timed ones, each calling every callable
    once in the order given (A, B, C, A, B, C, ...).

    Args:
        calls: name (any hashable) -> callable taking no argument; the first is the reference of
            :meth:`Timings.ratios`.
        rounds: timed rounds (each callable's median is over its ``rounds`` calls).
        warmup: untimed rounds first (first-call costs: allocation, graph optimisation, caches).
        self_timed: each callable returns its own seconds (e.g. the figure a subprocess reports, which leaves
            out its start-up), used instead of the clock.
        clock: seconds now (a fake one in tests).
    """
    if rounds < 1:
        raise ValueError(f"rounds: {rounds}; time at least one round")
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    timings = Timings({name: [] for name in calls})
    for _ in range(rounds):
        for name, fn in calls.items():
            start = clock()
            result = fn()
            timings.seconds[name].append(float(result) if self_timed else clock() - start)
            timings.last[name] = result
    return timings


def make_nontrivial(model: torch.nn.Module, seed: int = 0, sca_gain: float = 4.0) -> torch.nn.Module:
    """Randomises beta/gamma and LayerNorm affines and amplifies the SCA convs, in place; returns the model in
    eval mode. The same ``seed`` gives the same weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif ".norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + torch.randn(p.shape, generator=g) * 0.2)
            elif ".sca.1.weight" in name:
                p.mul_(sca_gain)
    return model.eval()


def is_isa_flag(flag: str) -> bool:
    """A /proc/cpuinfo flag that names an instruction set the figures depend on: AVX2, AVX-512*, VNNI, BF16, AMX."""
    return flag == "avx2" or flag.startswith(("avx512", "amx")) or "vnni" in flag or "bf16" in flag


def machine(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """The CPU model, its cores and the CUDA GPU (:func:`runtime.models.machine_id`, what ``bench`` records), and
    ``isa``: the instruction sets of :func:`is_isa_flag` the CPU reports (sorted; empty where it reports none)."""
    from runtime.models import machine_id

    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    flags = line.partition(":")[2].split()
    return {**machine_id(), "isa": sorted({f for f in flags if is_isa_flag(f)})}


def machine_line(info: dict | None = None) -> str:
    """One line for a table's header: ``CPU ..., N cores, avx2 avx512f ...; GPU ...`` (``info``: :func:`machine`)."""
    m = info or machine()
    isa = " ".join(m["isa"]) or "no AVX2/AVX-512/VNNI/BF16/AMX flags"
    return f"CPU {m['cpu']}, {m['cores']} cores, {isa}; GPU {m['gpu'] or 'none'}"
