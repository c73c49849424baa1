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
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

import nafnet_core as nc
from nafnet_core.cli_common import fmt, text_table
from nafnet_core.process import peak_rss_mb


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
    psnr: float | None = None  # of the output vs the sharp photo (uint8-rounded)
    delta_psnr: float | None = None  # psnr - torch fp32's psnr on the same photo
    status: str = "ok"


@dataclass
class BenchSpec:
    """One measurement, run in a fresh subprocess (so its peak RSS is its own)."""

    kind: str  # torch | onnxrt | openvino | trt
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
    reuse_memory: bool = False  # torch on CPU: keep freed memory in the process (TorchRunner)


def measure(spec: BenchSpec) -> dict:
    """Runs one BenchSpec in this process: times (s) of each repeat, this process's peak RSS (MB) and the PSNR of
    the output against the sharp photo."""
    from export.samples import sample_photo

    from .backends import BACKENDS, Artifact, OpenOptions
    from .restore import choose_tiling, restore

    if spec.threads:
        torch.set_num_threads(spec.threads)
    options = OpenOptions(device="cpu" if spec.kind != "trt" else "auto", threads=spec.threads,
                          reuse_memory=spec.reuse_memory, preset=spec.preset, tlc=spec.tlc, train_size=spec.train_size,
                          opt_level=spec.opt_level)
    backend = BACKENDS[spec.kind]
    runner = backend.open(Artifact(spec.kind, spec.precision, Path(spec.path)), spec.precision, options)
    tile = spec.tile if spec.tile in ("none", "auto") else tuple(int(v) for v in spec.tile.split("x"))
    target = sample_photo(spec.height, spec.width)  # a photo, box-blurred: the PSNR of the output means something
    x = blurred(target)
    outs = []
    with runner:
        tiling = choose_tiling(runner, spec.height, spec.width, tile)
        times = time_call(lambda: outs.append(restore(runner, x, tile)), spec.warmup, spec.repeats)
    from .tiling import count_tiles

    psnr = nc.psnr(nc.quantize(outs[-1].clamp(0, 1)), nc.quantize(target)).item()
    return {"times": times, "peak_rss_mb": peak_rss_mb(), "psnr": psnr,
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
               progress: bool = True, rounds: int = 1) -> list[BenchRow]:
    """Measures every (row, spec) in its own subprocess and fills the row.

    ``rounds`` > 1 interleaves: every spec runs once per round (A, B, C, A, B, C, ...), each time in a fresh
    process, and the row's times are those of all rounds, so load that comes and goes hits every backend alike.
    """
    from tqdm import tqdm

    results: dict[int, list[dict]] = {i: [] for i in range(len(specs))}
    failed: dict[int, str] = {}
    with tqdm(total=len(specs) * rounds, desc="bench", unit="run", disable=not progress) as bar:
        for _ in range(rounds):
            for i, (_row, spec) in enumerate(specs):
                if i not in failed:
                    try:
                        results[i].append(measure_in_subprocess(spec))
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        failed[i] = f"failed: {e}"
                bar.update()
    rows = []
    for i, (row, _spec) in enumerate(specs):
        if i in failed:
            row.status = failed[i]
            rows.append(row)
            continue
        r = {"times": [t for res in results[i] for t in res["times"]],
             "peak_rss_mb": max(res["peak_rss_mb"] for res in results[i]), "psnr": results[i][-1]["psnr"],
             "tiles": results[i][-1]["tiles"], "tile": results[i][-1]["tile"]}
        row.psnr = round(r["psnr"], 4)
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
                 big: tuple[int, int] | None = None, progress: bool = True, rounds: int = 1,
                 include_openvino: bool = True, include_bf16: bool = True, reuse_memory: bool = False) -> dict:
    """Every backend of an export at ``size``: latency, images/s, peak RSS, GFLOP/s vs this machine's GEMM roof.

    Args:
        export_dir: an export directory (manifest.json).
        size: (H, W) of the benchmark image (random content; timing does not depend on it).
        repeats / warmup: timed and untimed runs per backend (the median is reported).
        include_torch: also PyTorch eager fp32 from the source checkpoint (the baseline).
        include_fp16: also the FP16 ONNX graphs (on CPU onnxruntime computes them in FP32).
        big: also run one (H, W) image (e.g. 2160x3840) tiled, for its time and peak memory, on the fastest
            fp32 onnxruntime/OpenVINO row of the run (its graph; a dynamic graph takes 512x512 tiles).
        rounds: interleaved rounds (each backend once per round, fresh process; medians over all rounds).
        include_openvino: OpenVINO fp32 and bf16 on the export's IR or fp32 ONNX (rows say why when they
            cannot run: no openvino package, no BF16 in this CPU).
        include_bf16: also PyTorch bf16 (FP32 islands as the FP16 graph; on a CPU without BF16 it is emulated).
        reuse_memory: the PyTorch rows keep freed memory in their process (see ``TorchRunner``).
    """
    from .backends import BACKENDS
    from .models import read_export

    info = read_export(export_dir)
    h, w = size
    config = nc.ModelConfig.from_dict(info.config)
    gflop = nc.model_gflops(config, h, w)
    roof = matmul_gflops(threads=threads)
    common = dict(height=h, width=w, repeats=repeats, warmup=warmup, threads=threads)
    specs: list[tuple[BenchRow, BenchSpec]] = []
    size_s = f"{h}x{w}"
    if include_torch and info.checkpoint is not None:
        for p in ("fp32", "bf16") if include_bf16 else ("fp32",):
            row = BenchRow("torch", p, "whole", size_s)
            if p == "bf16" and not torch.backends.mkldnn.is_available():
                row.status = "oneDNN missing in this torch build"
            elif p == "bf16" and not _cpu_has_bf16():
                row.status = "ok (no BF16 instructions in this CPU: emulated, not a speed figure)"
            specs.append((row, BenchSpec("torch", str(info.checkpoint), p, "none", preset=info.preset, tlc=info.tlc,
                                         train_size=info.train_size, reuse_memory=reuse_memory, **common)))
    for rec in BACKENDS.values():  # every other backend's rows, as parity checks them
        if rec.name == "torch" or (rec.name == "openvino" and not include_openvino):
            continue
        for precision, art in rec.rows(info.artifacts):
            if precision == "fp16" and rec.name != "trt" and not include_fp16:  # FP16 graphs compute in FP32 on CPU
                continue
            mode = "whole" if art.fixed_shape is None else art.mode
            ok, why = rec.probe(precision)
            if not ok:
                specs.append((BenchRow(rec.name, precision, mode, size_s, status=f"skipped: {why}"), None))
                continue
            specs.append((BenchRow(rec.name, precision, mode, size_s),
                          BenchSpec(rec.name, str(art.path), precision, "none" if art.fixed_shape is None else "auto",
                                    **common)))
    runnable = [(r, s) for r, s in specs if s is not None]
    rows = bench_rows(runnable, gflop, roof, progress, rounds)
    if big is not None:  # one large image, tiled, on the fastest fp32 export backend of the rows above
        measured = [(r, s) for r, s in runnable if r.median_ms and s.kind in ("onnxrt", "openvino")
                    and s.precision == "fp32"]
        if measured:
            _, fastest = min(measured, key=lambda rs: rs[0].median_ms)
            big_spec = replace(fastest, tile="auto", height=big[0], width=big[1], repeats=1, warmup=0)
            big_row = BenchRow(fastest.kind, "fp32", "whole", f"{big[0]}x{big[1]}")  # "tiled HxW" once tiled
            rows += bench_rows([(big_row, big_spec)], gflop, roof, progress, 1)
            runnable.append((big_row, big_spec))
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
    ref_psnr = next((r.psnr for r in rows if (r.backend, r.precision) == ("torch", "fp32") and r.psnr is not None
                     and r.size == size_s), None)
    for r in rows:
        if ref_psnr is not None and r.psnr is not None and r.size == size_s:
            r.delta_psnr = round(r.psnr - ref_psnr, 4)
    from .models import machine_id

    return {"export": str(export_dir), "machine": machine_id(), "size": size_s, "repeats": repeats, "warmup": warmup,
            "rounds": rounds,
            "threads": threads or torch.get_num_threads(), "matmul_gflops": round(roof, 1),
            "model_gflop": round(gflop, 4),
            "rows": [{**asdict(r), "vs_torch": round(r.median_ms / torch_ms, 3) if torch_ms and r.median_ms else None}
                     for r in rows]}


def _cpu_has_bf16() -> bool:
    """The CPU has native BF16 arithmetic (AVX512_BF16 or AMX), from /proc/cpuinfo (False where unknown)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bench_table(result: dict) -> str:
    head = ["backend", "precision", "mode", "size", "median ms", "min", "max", "img/s", "peak RSS MB", "GFLOP/s",
            "% roof", "vs torch", "ΔPSNR", "status"]
    lines = []
    for r in result["rows"]:
        lines.append([r["backend"], r["precision"], r["mode"], r["size"], fmt(r["median_ms"], ".0f"),
                      fmt(r["min_ms"], ".0f"), fmt(r["max_ms"], ".0f"), fmt(r["images_per_s"], ".3f"),
                      fmt(r["peak_rss_mb"], ".0f"),
                      fmt(r["gflops_per_s"], ".1f"),
                      "-" if r["fraction_of_matmul_roof"] is None else f"{100 * r['fraction_of_matmul_roof']:.1f}",
                      fmt(r["vs_torch"], ".2f"), fmt(r.get("delta_psnr"), "+.4f"), r["status"]])
    out = [text_table(head, lines)]
    rounds = result.get("rounds", 1)
    out.append(f"model {result['model_gflop']} GFLOP at {result['size']}; this machine's fp32 matmul roof "
               f"{result['matmul_gflops']} GFLOP/s ({result['threads']} threads); median of {result['repeats']} "
               f"after {result['warmup']} warm-up" + (f" x {rounds} interleaved rounds" if rounds > 1 else "")
               + "; each backend in its own process; ΔPSNR: output vs the sharp photo, minus torch fp32's")
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_measure"]:  # internal: one BenchSpec, JSON out (used by measure_in_subprocess)
        print(json.dumps(measure(BenchSpec(**json.loads(sys.argv[2])))))
