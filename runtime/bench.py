"""Benchmarks that return rows (after ultralytics' ``benchmark()``): latency, throughput, memory, GFLOP/s.

Every figure is measured in the same process run as the machine's own fp32 matrix-multiply roof, so
results read as ratios ("onnxruntime reaches 35 % of this machine's GEMM rate") rather than absolutes
from a shared 2-core box. Peak resident memory is measured in a fresh subprocess per backend
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), so one backend's arena never counts against another.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import nafnet_core as nc

from .tiling import TileSpec, restore_tensor


def matmul_gflops(n: int = 2048, repeats: int = 5, threads: int | None = None) -> float:
    """This machine's fp32 matrix-multiply rate (GFLOP/s): best of ``repeats`` n x n x n products."""
    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def time_call(fn: Callable[[], object], warmup: int = 1, repeats: int = 3) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def blurred(x: torch.Tensor, length: int = 9) -> torch.Tensor:
    """A horizontal box motion blur of ``length`` px (replicate edges): a stand-in blurry input."""
    k = torch.full((3, 1, 1, length), 1.0 / length)
    return F.conv2d(F.pad(x, (length // 2, length // 2, 0, 0), mode="replicate"), k, groups=3)


# --------------------------------------------------------------------------------------------- tiling sweep

@dataclass
class TilingRow:
    tile: int
    overlap: int
    tiles: int
    psnr_vs_whole: float
    max_abs_diff: float
    delta_psnr: float
    seconds: float


def tiling_sweep(model: torch.nn.Module, images: list[torch.Tensor], targets: list[torch.Tensor],
                 configs: list[tuple[int, int]], progress: bool = True) -> tuple[list[TilingRow], float]:
    """Tiled vs whole-image output of ``model`` for each (tile, overlap); returns (rows, whole-image seconds).

    ``psnr_vs_whole``: PSNR of the tiled output against the whole-image output (uint8-rounded), min over
    images; ``delta_psnr``: mean over images of PSNR(tiled, target) - PSNR(whole, target), the parity figure.
    """
    from .tiling import count_tiles

    q = nc.quantize
    with torch.inference_mode():
        t = time.perf_counter()
        wholes = [restore_tensor(model, x, None) for x in images]
        whole_s = (time.perf_counter() - t) / len(images)
        base = [nc.psnr(q(w), q(g)).item() for w, g in zip(wholes, targets)]
        rows = []
        for tile, overlap in configs:
            spec = TileSpec((tile, tile), overlap)
            t = time.perf_counter()
            outs = [restore_tensor(model, x, spec) for x in images]
            secs = (time.perf_counter() - t) / len(images)
            vs_whole = min(nc.psnr(q(o), q(w)).item() for o, w in zip(outs, wholes))
            diff = max((o.clamp(0, 1) - w.clamp(0, 1)).abs().max().item() for o, w in zip(outs, wholes))
            delta = statistics.fmean(nc.psnr(q(o), q(g)).item() - b for o, g, b in zip(outs, targets, base))
            rows.append(TilingRow(tile, overlap, count_tiles(*images[0].shape[-2:], spec), round(vs_whole, 2),
                                  round(diff, 5), round(delta, 4), round(secs, 2)))
            if progress:
                print(rows[-1], file=sys.stderr, flush=True)
    return rows, whole_s


def run_tiling_sweep(preset: str = "nafnet-gopro-width32", size: tuple[int, int] = (720, 1280), n_images: int = 2,
                     configs: list[tuple[int, int]] | None = None, seed: int = 0) -> dict:
    """The measurement behind DEFAULT_TILE / DEFAULT_OVERLAP: ``preset`` with random non-trivial weights
    (beta/gamma randomised, SCA amplified, as in the tests) and TLC, on blurred natural photos at ``size``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import make_nontrivial, photo

    torch.manual_seed(seed)
    model = nc.convert_to_tlc(make_nontrivial(nc.create_model(preset), seed=seed), 256)
    targets = [photo(*size, index=i) for i in range(n_images)]
    images = [blurred(t) for t in targets]
    configs = configs or [(512, 0), (512, 32), (512, 64), (512, 128), (512, 192), (384, 128), (768, 128)]
    rows, whole_s = tiling_sweep(model, images, targets, configs)
    return {"preset": preset, "size": list(size), "images": n_images, "whole_seconds": round(whole_s, 2),
            "rows": [asdict(r) for r in rows]}


if __name__ == "__main__":  # python -m runtime.bench tiling OUT.json
    if sys.argv[1:2] == ["tiling"]:
        result = run_tiling_sweep()
        text = json.dumps(result, indent=2)
        print(text)
        if len(sys.argv) > 2:
            Path(sys.argv[2]).write_text(text + "\n")
