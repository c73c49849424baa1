"""Training throughput: images/s of one optimizer step (forward, loss, backward, clip, step), per speed option.

    python cli.py train --preset gopro --set batch=4 --bench          # the config and every option
    python -m train.bench --preset tiny --crop 64 --batch 4 --json

Measures the model's compute only (random inputs already in memory; data loading excluded). Every side
(the config as resolved for the device, and each option of :data:`OPTIONS` on fp32 eager) is built in one
process and timed interleaved (A, B, C, A, B, C, ...) after warm-up steps, so a load change on a shared
machine hits all sides alike; the figures are medians. The compile time is the first step's time minus a
steady step's, reported apart and excluded from the throughput. Peak memory: ``max_memory_allocated`` on
CUDA; on CPU the peak RSS of a separate process per side running the same steps (RSS is process-wide).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import TrainConfig, build_config
from .objectives import LOSS_FUNCTIONS, best_output

#: The rows of ``train --bench`` besides the config itself: each option alone on fp32 eager, and both
#: layout/compile options together.
OPTIONS: dict[str, dict[str, str]] = {
    "fp32 eager": {"amp": "off", "channels_last": "off", "compile": "off"},
    "channels_last": {"amp": "off", "channels_last": "on", "compile": "off"},
    "amp=bf16": {"amp": "bf16", "channels_last": "off", "compile": "off"},
    "compile": {"amp": "off", "channels_last": "off", "compile": "on"},
    "compile+channels_last": {"amp": "off", "channels_last": "on", "compile": "on"},
}


def bench_inputs(batch: int, crop: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed (blur, sharp) batch every side trains on."""
    g = torch.Generator().manual_seed(seed)
    sharp = torch.rand(batch, 3, crop, crop, generator=g)
    blur = (sharp + 0.05 * torch.randn(sharp.shape, generator=g)).clamp(0, 1)
    return blur.to(device), sharp.to(device)


def project_step(cfg: TrainConfig, device: str) -> Callable[[], None]:
    """One training step of this project as the loop runs it (options of ``cfg`` resolved for ``device``)."""
    from .loop import build_model
    from .speed import autocast, clip_gradients, compile_model, make_optimizer, prepare_model, resolve, to_input

    dev = torch.device(device)
    plan = resolve(cfg, dev)
    torch.manual_seed(cfg.seed)
    model = prepare_model(build_model(cfg).to(dev).train(), plan)
    net = compile_model(model, plan)
    opt = make_optimizer(cfg, model)
    loss_fn = LOSS_FUNCTIONS[cfg.loss]
    blur, sharp = bench_inputs(cfg.batch, cfg.crop, device)
    blur = to_input(blur, plan)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(plan, dev):
            out = net(blur, all_heads=True)  # as the loop: every output, the loss on the best one
        loss_fn(best_output(out, sharp).float(), sharp).backward()
        clip_gradients(model, cfg.grad_clip)
        opt.step()

    return step


@dataclass
class Side:
    """One thing to time: a name, a zero-argument builder of its step, and the figures measured."""

    name: str
    build: Callable[[], Callable[[], None]]
    worker_args: list[str] = field(default_factory=list)  # ``python -m ...`` arguments of its memory process
    compiles: bool = False  # the first step includes torch.compile (reported as compile time)
    times: list[float] = field(default_factory=list)
    first: float = 0.0
    peak_mb: float | None = None
    error: str | None = None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(sides: list[Side], *, steps: int, warmup: int, device: str, progress: bool = True) -> None:
    """Builds every side, runs ``warmup`` steps each, then ``steps`` rounds of one step per side."""
    runs = {}
    for side in sides:
        try:
            runs[side.name] = side.build()
            for i in range(warmup):
                _sync(device)
                t0 = time.perf_counter()
                runs[side.name]()
                _sync(device)
                if i == 0:
                    side.first = time.perf_counter() - t0
        except Exception as e:  # a side that cannot run here (e.g. no C++ compiler for torch.compile) is a row
            side.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            runs.pop(side.name, None)
        if progress:
            print(f"[bench] built {side.name}: first step {side.first:.1f} s", file=sys.stderr, flush=True)
    for r in range(steps):
        for side in sides:
            if side.name not in runs:
                continue
            _sync(device)
            t0 = time.perf_counter()
            runs[side.name]()
            _sync(device)
            side.times.append(time.perf_counter() - t0)
        if progress:
            print(f"[bench] round {r + 1}/{steps}: " + ", ".join(f"{s.name} {s.times[-1]:.2f} s" for s in sides
                                                                if s.times), file=sys.stderr, flush=True)
    runs.clear()


def measure_cuda_peak(side: Side, warmup: int) -> None:
    torch.cuda.reset_peak_memory_stats()
    step = side.build()
    for _ in range(warmup + 1):
        step()
    torch.cuda.synchronize()
    side.peak_mb = torch.cuda.max_memory_allocated() / 2**20


def measure_rss_in_subprocess(side: Side) -> None:
    """Peak RSS of a fresh process that builds ``side`` and runs its steps (``side.worker_args``)."""
    if not side.worker_args:
        return
    proc = subprocess.run([sys.executable, "-m", *side.worker_args], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        side.error = side.error or f"memory process failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}"
        return
    side.peak_mb = json.loads(lines[-1])["peak_rss_mb"]


def peak_rss_mb() -> float:
    """This process's peak resident set size: VmHWM of /proc/self/status.

    Not ``ru_maxrss``: Linux carries the parent's peak over fork + exec into it, so every memory process
    started by a benchmark holding several models reported the parent's 7.5 GB.
    """
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # other systems (KiB on Linux, bytes on macOS)


def run_worker(step: Callable[[], None], steps: int) -> None:
    """Body of a memory process: run the steps, print the peak RSS as JSON."""
    for _ in range(steps):
        step()
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1)}), flush=True)


def summarise(sides: list[Side], batch: int, baseline: str) -> list[dict]:
    """Rows: median s/step, images/s, compile time, peak memory, and ratios to the ``baseline`` side.

    Ratios are medians of per-round ratios (each round times every side once), so slow stretches of a
    shared machine cancel out.
    """
    base = next((s for s in sides if s.name == baseline and s.times), None)
    rows = []
    for s in sides:
        row = {"side": s.name, "error": s.error}
        if s.times:
            med = statistics.median(s.times)
            row |= {"seconds_per_step": round(med, 3), "images_per_s": round(batch / med, 3),
                    "steps_timed": len(s.times),
                    "compile_s": round(max(0.0, s.first - med), 1) if s.compiles else None}
            if base is not None:
                row["speed_vs_" + baseline] = round(statistics.median(b / t for b, t in zip(base.times, s.times)), 3)
        row["peak_mb"] = None if s.peak_mb is None else round(s.peak_mb, 1)
        if base is not None and base.peak_mb and s.peak_mb:
            row["memory_vs_" + baseline] = round(s.peak_mb / base.peak_mb, 3)
        rows.append(row)
    return rows


def rows_table(rows: list[dict], baseline: str) -> str:
    from nafnet_core.cli_common import fmt, text_table

    head = ["side", "images/s", "s/step", f"x {baseline}", "peak MB", f"mem x {baseline}", "compile s", "note"]
    lines = [[r["side"], fmt(r.get("images_per_s"), ".3f"), fmt(r.get("seconds_per_step"), ".3f"),
              fmt(r.get("speed_vs_" + baseline), ".2f"), fmt(r.get("peak_mb"), ".0f"),
              fmt(r.get("memory_vs_" + baseline), ".2f"), fmt(r.get("compile_s") or None, ".1f"), r.get("error") or ""]
             for r in rows]
    return text_table(head, lines)


def option_configs(cfg: TrainConfig) -> dict[str, TrainConfig]:
    """``config`` (as given) and every option of :data:`OPTIONS` applied to ``cfg``."""
    out = {"config": cfg}
    for name, keys in OPTIONS.items():
        out[name] = TrainConfig.from_dict(cfg.to_dict() | keys)
    return out


def bench_options(cfg: TrainConfig, *, steps: int = 3, warmup: int = 2, device: str = "cpu", memory: bool = True,
                  options: list[str] | None = None, progress: bool = True) -> dict:
    """Times ``cfg`` and each option (interleaved, medians) and measures their peak memory.

    Args:
        cfg: the training config (model, batch, crop, loss, optimizer, clipping, speed keys).
        steps: timed rounds. warmup: untimed steps per side first (the first includes compilation).
        device: cpu or cuda[:i].
        memory: also measure peak memory (on CPU: one extra process per side).
        options: names of :data:`OPTIONS` to include (default: all).
        progress: per-round lines on stderr.
    """
    from .speed import resolve

    configs = option_configs(cfg)
    names = ["config"] + (options if options is not None else list(OPTIONS))
    sides = []
    for name in names:
        c = configs[name]
        worker = ["train.bench", "--worker", json.dumps(c.to_dict()), "--device", device, "--steps", str(warmup + 1)]
        sides.append(Side(name, (lambda c=c: project_step(c, device)), worker_args=worker,
                          compiles=resolve(c, torch.device(device)).compile))
    time_interleaved(sides, steps=steps, warmup=warmup, device=device, progress=progress)
    if memory:
        for side in sides:
            if device.startswith("cuda"):
                measure_cuda_peak(side, warmup)
            else:
                measure_rss_in_subprocess(side)
    rows = summarise(sides, cfg.batch, "fp32 eager" if "fp32 eager" in names else "config")
    return {"model": cfg.model, "crop": cfg.crop, "batch": cfg.batch, "device": device,
            "threads": torch.get_num_threads(), "warmup_steps": warmup, "timed_steps": steps,
            "config_resolves_to": resolve(cfg, torch.device(device)).describe(),
            "memory": "max_memory_allocated" if device.startswith("cuda") else "peak RSS of a process per side",
            "rows": rows}


def train_throughput(cfg: TrainConfig, steps: int = 5, warmup: int = 2, device: str = "cpu") -> dict:
    """Median seconds per step and images/s for ``cfg`` alone (no option rows, no memory process)."""
    side = Side("config", lambda: project_step(cfg, device))
    time_interleaved([side], steps=steps, warmup=warmup, device=device, progress=False)
    if side.error:
        raise RuntimeError(side.error)
    sec = statistics.median(side.times)
    return {"model": cfg.model, "crop": cfg.crop, "batch": cfg.batch, "device": device,
            "threads": torch.get_num_threads(), "warmup_steps": warmup, "timed_steps": steps,
            "seconds_per_step_median": round(sec, 4), "seconds_per_step_min": round(min(side.times), 4),
            "images_per_s": round(cfg.batch / sec, 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="training preset (model, loss, optimizer)")
    ap.add_argument("--model", default=None, help="model preset, overriding the training preset's")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # memory process: a TrainConfig as JSON
    a = ap.parse_args(argv)
    if a.worker:
        run_worker(project_step(TrainConfig.from_dict(json.loads(a.worker)), a.device), a.steps)
        return
    sets = {"crop": a.crop, "batch": a.batch, **({"model": a.model} if a.model else {})}
    result = bench_options(build_config(a.preset, sets=sets), steps=a.steps, warmup=a.warmup, device=a.device)
    print(json.dumps(result) if a.json else rows_table(result["rows"], "fp32 eager"))


if __name__ == "__main__":
    main()
