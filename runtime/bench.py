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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import nafnet_core as nc
from nafnet_core.cli_common import fmt, text_table

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


# --------------------------------------------------------------------------------------------- backend bench

@dataclass
class BenchRow:
    backend: str
    precision: str
    mode: str
    size: str
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    images_per_s: float | None = None
    peak_rss_mb: float | None = None
    gflop: float | None = None
    gflops_per_s: float | None = None
    fraction_of_matmul_roof: float | None = None
    tiles: int | None = None
    status: str = "ok"


@dataclass
class BenchSpec:
    """One measurement, run in a fresh subprocess (so its peak RSS is its own)."""

    kind: str  # torch | onnxrt | trt
    path: str
    precision: str
    tile: str  # "none" (whole image) | "auto" (the graph's own tile) | "HxW"
    height: int
    width: int
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None
    preset: str | None = None
    tlc: bool = True
    train_size: int = 256
    opt_level: str = "all"


def measure(spec: BenchSpec) -> dict:
    """Runs one BenchSpec in this process: times (s) of each repeat and this process's peak RSS (MB)."""
    import resource

    from .infer import choose_tiling, restore
    from .models import torch_runner
    from .runners import OnnxRuntimeRunner, TensorRTRunner

    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.kind == "torch":
        runner = torch_runner(spec.path, spec.precision, preset=spec.preset, tlc=spec.tlc, train_size=spec.train_size,
                              device="cpu")
    elif spec.kind == "onnxrt":
        runner = OnnxRuntimeRunner(spec.path, spec.precision, device="cpu", threads=spec.threads,
                                   opt_level=spec.opt_level)
    else:
        runner = TensorRTRunner(spec.path, spec.precision)
    tile = spec.tile if spec.tile in ("none", "auto") else tuple(int(v) for v in spec.tile.split("x"))
    x = torch.rand(1, 3, spec.height, spec.width)
    with runner:
        tiling = choose_tiling(runner, spec.height, spec.width, tile)
        times = time_call(lambda: restore(runner, x, tile), spec.warmup, spec.repeats)
    from .tiling import count_tiles

    return {"times": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tiles": None if tiling is None else count_tiles(spec.height, spec.width, tiling),
            "tile": None if tiling is None else list(tiling.tile)}


def measure_in_subprocess(spec: BenchSpec, timeout: float = 3600) -> dict:
    """``measure`` in a fresh Python process; raises RuntimeError with its last stderr line on failure."""
    cmd = [sys.executable, "-m", "runtime.bench", "_measure", json.dumps(asdict(spec))]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(last[:300])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_rows(specs: list[tuple[BenchRow, BenchSpec]], gflop: float, roof: float,
               progress: bool = True) -> list[BenchRow]:
    """Measures every (row, spec) in its own subprocess and fills the row."""
    from tqdm import tqdm

    rows = []
    for row, spec in tqdm(specs, desc="bench", unit="run", disable=not progress):
        try:
            r = measure_in_subprocess(spec)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            row.status = f"failed: {e}"
            rows.append(row)
            continue
        ms = sorted(t * 1e3 for t in r["times"])
        row.median_ms = round(statistics.median(ms), 1)
        row.min_ms, row.max_ms = round(ms[0], 1), round(ms[-1], 1)
        row.images_per_s = round(1e3 / row.median_ms, 3)
        row.peak_rss_mb = round(r["peak_rss_mb"], 0)
        row.gflop = round(gflop, 4)
        row.gflops_per_s = round(gflop / (row.median_ms / 1e3), 1)
        row.fraction_of_matmul_roof = round(row.gflops_per_s / roof, 3)
        row.tiles = r["tiles"]
        if r["tile"]:
            row.mode = f"tiled {r['tile'][0]}x{r['tile'][1]}"
        rows.append(row)
    return rows


def bench_export(export_dir: str | Path, size: tuple[int, int] = (720, 1280), *, repeats: int = 3, warmup: int = 1,
                 threads: int | None = None, include_torch: bool = True, include_fp16: bool = False,
                 big: tuple[int, int] | None = None, progress: bool = True) -> dict:
    """Every backend of an export at ``size``: latency, images/s, peak RSS, GFLOP/s vs this machine's GEMM roof.

    Args:
        export_dir: an export directory (manifest.json).
        size: (H, W) of the benchmark image (random content; timing does not depend on it).
        repeats / warmup: timed and untimed runs per backend (the median is reported).
        include_torch: also PyTorch eager fp32 from the source checkpoint (the baseline).
        include_fp16: also the FP16 ONNX graphs (on CPU onnxruntime computes them in FP32).
        big: also run the tiled ONNX fp32 path on one (H, W) image (e.g. 2160x3840) for its peak memory.
    """
    from .models import read_export
    from .runners import cuda_device_count

    info = read_export(export_dir)
    h, w = size
    config = nc.ModelConfig.from_dict(info.config)
    gflop = nc.model_gflops(config, h, w)
    roof = matmul_gflops(threads=threads)
    common = dict(height=h, width=w, repeats=repeats, warmup=warmup, threads=threads)
    specs: list[tuple[BenchRow, BenchSpec]] = []
    size_s = f"{h}x{w}"
    if include_torch and info.checkpoint is not None:
        specs.append((BenchRow("torch", "fp32", "whole", size_s),
                      BenchSpec("torch", str(info.checkpoint), "fp32", "none", preset=info.preset, tlc=info.tlc,
                                train_size=info.train_size, **common)))
    for art in sorted(info.artifacts, key=lambda a: (a.backend, a.precision, a.fixed_shape is not None)):
        if art.backend == "trt" and not cuda_device_count():
            specs.append((BenchRow("trt", art.precision, art.mode, size_s, status="skipped: no CUDA GPU here"), None))
            continue
        if art.precision == "fp16" and art.backend == "onnxrt" and not include_fp16:
            continue
        specs.append((BenchRow(art.backend, art.precision, "whole" if art.fixed_shape is None else art.mode, size_s),
                      BenchSpec(art.backend, str(art.path), art.precision, "none" if art.fixed_shape is None else "auto",
                                **common)))
    if big is not None:
        tiles = [a for a in info.artifacts if a.backend == "onnxrt" and a.precision == "fp32" and a.fixed_shape]
        tile_art = min(tiles, key=lambda a: a.fixed_shape[0] * a.fixed_shape[1], default=None)  # smallest tile
        dyn_art = next((a for a in info.artifacts if a.backend == "onnxrt" and a.precision == "fp32"
                        and a.fixed_shape is None), None)
        art = tile_art or dyn_art
        if art is not None:
            big_spec = BenchSpec("onnxrt", str(art.path), "fp32", "auto", height=big[0], width=big[1], repeats=1,
                                 warmup=0, threads=threads)
            specs.append((BenchRow("onnxrt", "fp32", "tiled", f"{big[0]}x{big[1]}"), big_spec))
    runnable = [(r, s) for r, s in specs if s is not None]
    rows = bench_rows(runnable, gflop, roof, progress)
    # the big image's GFLOP differ from the benchmark size's
    for row, spec in runnable:
        if spec.height != h or spec.width != w:
            g = nc.model_gflops(config, spec.height, spec.width)
            if row.median_ms:
                row.gflop = round(g, 4)
                row.gflops_per_s = round(g / (row.median_ms / 1e3), 1)
                row.fraction_of_matmul_roof = round(row.gflops_per_s / roof, 3)
    rows += [r for r, s in specs if s is None]
    torch_ms = next((r.median_ms for r in rows if r.backend == "torch" and r.median_ms), None)
    return {"export": str(export_dir), "size": size_s, "repeats": repeats, "warmup": warmup,
            "threads": threads or torch.get_num_threads(), "matmul_gflops": round(roof, 1),
            "model_gflop": round(gflop, 4),
            "rows": [{**asdict(r), "vs_torch": round(r.median_ms / torch_ms, 3) if torch_ms and r.median_ms else None}
                     for r in rows]}


def bench_table(result: dict) -> str:
    head = ["backend", "precision", "mode", "size", "median ms", "min", "max", "img/s", "peak RSS MB", "GFLOP/s",
            "% roof", "vs torch", "status"]
    lines = []
    for r in result["rows"]:
        lines.append([r["backend"], r["precision"], r["mode"], r["size"], fmt(r["median_ms"], ".0f"), fmt(r["min_ms"], ".0f"),
                      fmt(r["max_ms"], ".0f"), fmt(r["images_per_s"], ".3f"), fmt(r["peak_rss_mb"], ".0f"),
                      fmt(r["gflops_per_s"], ".1f"),
                      "-" if r["fraction_of_matmul_roof"] is None else f"{100 * r['fraction_of_matmul_roof']:.1f}",
                      fmt(r["vs_torch"], ".2f"), r["status"]])
    out = [text_table(head, lines)]
    out.append(f"model {result['model_gflop']} GFLOP at {result['size']}; this machine's fp32 matmul roof "
               f"{result['matmul_gflops']} GFLOP/s ({result['threads']} threads); median of {result['repeats']} "
               f"after {result['warmup']} warm-up, each backend in its own process")
    return "\n".join(out)


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
    configs = configs or [(512, 0), (512, 64), (512, 128), (512, 192)]
    rows, whole_s = tiling_sweep(model, images, targets, configs)
    return {"preset": preset, "size": list(size), "images": n_images, "whole_seconds": round(whole_s, 2),
            "rows": [asdict(r) for r in rows]}


if __name__ == "__main__":
    if sys.argv[1:2] == ["_measure"]:  # internal: one BenchSpec, JSON out (used by measure_in_subprocess)
        print(json.dumps(measure(BenchSpec(**json.loads(sys.argv[2])))))
    elif sys.argv[1:2] == ["tiling"]:  # python -m runtime.bench tiling OUT.json [N_IMAGES] [TILE:OVERLAP,...]
        n = int(sys.argv[3]) if len(sys.argv) > 3 else 2
        cfg = [tuple(int(v) for v in c.split(":")) for c in sys.argv[4].split(",")] if len(sys.argv) > 4 else None
        result = run_tiling_sweep(n_images=n, configs=cfg)
        text = json.dumps(result, indent=2)
        print(text)
        if len(sys.argv) > 2:
            Path(sys.argv[2]).write_text(text + "\n")
