"""Training throughput: images/s of one optimizer step (forward, loss, backward, clip, step), per speed option.

    python cli.py train --preset gopro --set batch=4 --bench          # the config and every option
    python -m train.bench --preset tiny --crop 64 --batch 4 --options compile --json

Measures the model's compute only (random inputs already in memory; data loading excluded). Every side
(the config as resolved for the device, and each option of :data:`OPTIONS`) runs in a worker process of
its own, so that process-wide settings (``reuse_memory``) and peak memory belong to that side alone; the
workers are built first, then asked for one step each in turns (A, B, C, A, B, C, ...) after warm-up
steps, so a load change on a shared machine hits all sides alike; the figures are medians. The compile
time is the first step's time minus a steady step's, reported apart and excluded from the throughput.
Peak memory: ``max_memory_allocated`` on CUDA; on CPU the peak RSS of the side's process (idle workers
hand their free heap back to the kernel between steps, so only the running side holds its activations).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nafnet_core.errors import UserError, first_line

from .config import TrainConfig, build_config
from .objectives import LOSS_FUNCTIONS, best_output

#: The rows of ``train --bench`` besides the config itself: each option alone on fp32 eager, both
#: layout/compile options together, and fp32 eager without ``reuse_memory`` (what the heap reuse buys).
#: Keys not named keep the config's value.
OPTIONS: dict[str, dict[str, str]] = {
    "fp32 eager": {"amp": "off", "channels_last": "off", "compile": "off"},
    "reuse_memory=off": {"amp": "off", "channels_last": "off", "compile": "off", "reuse_memory": "off"},
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
    from .speed import (
        apply_process_settings,
        autocast,
        clip_gradients,
        compile_model,
        make_optimizer,
        prepare_model,
        resolve,
        to_input,
    )

    dev = torch.device(device)
    plan = resolve(cfg, dev)
    apply_process_settings(plan)  # process-wide: each side runs in a process of its own (time_interleaved)
    torch.manual_seed(cfg.seed)
    model = prepare_model(build_model(cfg).to(dev).train(), plan)
    net = compile_model(model, plan)
    opt = make_optimizer(cfg, model)
    loss_fn = LOSS_FUNCTIONS[cfg.loss]
    blur, sharp = bench_inputs(cfg.batch, cfg.crop, device)
    blur = to_input(blur, plan)
    scaler = torch.amp.GradScaler("cuda", enabled=plan.amp_dtype == torch.float16)  # as the loop: fp16 scales

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(plan, dev):
            out = net(blur, all_heads=True)  # as the loop: every output, the loss on the best one
        scaler.scale(loss_fn(best_output(out, sharp).float(), sharp)).backward()
        scaler.unscale_(opt)
        clip_gradients(model, cfg.grad_clip)
        scaler.step(opt)
        scaler.update()

    return step


@dataclass
class Side:
    """One thing to time: a name, the ``python -m`` arguments of its worker process, and the figures measured.

    The worker (:func:`serve_worker`) builds the side's step in a process of its own, so process-wide settings
    (``reuse_memory``, the official code's defaults) apply to that side alone and its peak memory is its own.
    """

    name: str
    worker_args: list[str]
    compiles: bool = False  # the first step includes torch.compile (reported as compile time)
    times: list[float] = field(default_factory=list)
    first: float = 0.0
    peak_mb: float | None = None
    error: str | None = None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(str(e))}"


def serve_worker(build: Callable[[], Callable[[], None]], device: str) -> None:
    """The body of a side's process: builds the step, then answers each line of stdin with one JSON line.

    ``step`` -> ``{"seconds": t}`` (one timed step; afterwards, untimed, the heap's free pages go back to the
    kernel so that idle workers stay small: :func:`nafnet_core.process.release_free_memory`); ``peak`` ->
    ``{"peak_mb": m}`` (``max_memory_allocated`` on CUDA, else the process's peak RSS). The first line is
    ``{"ready": true}`` or ``{"error": ...}``; an error ends the worker.
    """
    from nafnet_core.process import peak_rss_mb, release_free_memory

    out, sys.stdout = sys.stdout, sys.stderr  # the protocol owns stdout; stray prints go to stderr

    def reply(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:
        step = build()
    except Exception as e:  # a side that cannot run here (e.g. no C++ compiler for torch.compile) is a row
        reply({"error": _first_line(e)})
        return
    reply({"ready": True})
    for line in sys.stdin:
        if line.strip() == "step":
            try:
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
            except Exception as e:
                reply({"error": _first_line(e)})
                return
            seconds = time.perf_counter() - t0
            release_free_memory()
            reply({"seconds": seconds})
        elif line.strip() == "peak":
            reply({"peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
                   else peak_rss_mb()})


class _Worker:
    """A side's running worker process (:func:`serve_worker`), asked one line at a time."""

    def __init__(self, side: Side):
        self.side = side
        self.log = tempfile.TemporaryFile("w+")  # the worker's stderr, read back when it fails
        self.proc = subprocess.Popen([sys.executable, "-m", *side.worker_args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.answer()  # {"ready": true}

    def ask(self, command: str) -> dict:
        if self.side.error:
            return {}
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # the worker is gone; answer() says why
        return self.answer()

    def answer(self) -> dict:
        line = self.proc.stdout.readline()
        while line and not line.startswith("{"):  # a library's print before the worker took over stdout
            line = self.proc.stdout.readline()
        reply = json.loads(line) if line else {"error": f"worker exited: {self._stderr_tail()}"}
        if "error" in reply:
            self.side.error = self.side.error or reply["error"]
        return reply

    def _stderr_tail(self) -> str:
        self.proc.wait()
        self.log.seek(0)
        lines = [ln for ln in self.log.read().splitlines() if ln.strip()]
        return lines[-1][:200] if lines else f"exit status {self.proc.returncode}"

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def time_interleaved(sides: list[Side], *, steps: int, warmup: int, device: str, progress: bool = True) -> None:
    """Starts a worker per side (building it and running ``warmup`` untimed steps), then times ``steps`` rounds
    of one step per side, in turns; finally reads each side's peak memory."""
    workers = []
    try:
        for side in sides:
            w = _Worker(side)
            workers.append(w)
            for i in range(warmup):
                reply = w.ask("step")
                if i == 0 and "seconds" in reply:
                    side.first = reply["seconds"]
            if progress:
                state = f"error: {side.error}" if side.error else f"first step {side.first:.1f} s"
                print(f"[bench] built {side.name}: {state}", file=sys.stderr, flush=True)
        for r in range(steps):
            for w in workers:
                reply = w.ask("step")
                if "seconds" in reply:
                    w.side.times.append(reply["seconds"])
            if progress:
                print(f"[bench] round {r + 1}/{steps}: " + ", ".join(f"{s.name} {s.times[-1]:.2f} s" for s in sides
                                                                    if s.times), file=sys.stderr, flush=True)
        for w in workers:
            w.side.peak_mb = w.ask("peak").get("peak_mb")
    finally:
        for w in workers:
            w.close()


def parse_options(text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each checked against :data:`OPTIONS`."""
    options = [o.strip() for o in text.split(",") if o.strip()]
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise UserError(f"--options: unknown {', '.join(unknown)}; choose from {', '.join(OPTIONS)}")
    return options


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


def bench_options(cfg: TrainConfig, *, steps: int = 3, warmup: int = 2, device: str = "cpu",
                  options: list[str] | None = None, threads: int | None = None, progress: bool = True) -> dict:
    """Times ``cfg`` and each option (interleaved, medians) and reads their peak memory, each in its own process.

    Args:
        cfg: the training config (model, batch, crop, loss, optimizer, clipping, speed keys).
        steps: timed rounds. warmup: untimed steps per side first (the first includes compilation).
        device: cpu or cuda[:i].
        options: names of :data:`OPTIONS` to include (default: all).
        threads: torch threads of every side (default: this process's).
        progress: per-round lines on stderr.
    """
    from .speed import resolve

    threads = threads or torch.get_num_threads()
    configs = option_configs(cfg)
    names = ["config"] + (options if options is not None else list(OPTIONS))
    sides = [Side(name, ["train.bench", "--worker", json.dumps(configs[name].to_dict()), "--device", device,
                         "--threads", str(threads)], compiles=resolve(configs[name], torch.device(device)).compile)
             for name in names]
    time_interleaved(sides, steps=steps, warmup=warmup, device=device, progress=progress)
    rows = summarise(sides, cfg.batch, "fp32 eager" if "fp32 eager" in names else "config")
    return {"model": cfg.model, "crop": cfg.crop, "batch": cfg.batch, "device": device, "threads": threads,
            "warmup_steps": warmup, "timed_steps": steps,
            "config_resolves_to": resolve(cfg, torch.device(device)).describe(),
            "memory": "max_memory_allocated" if device.startswith("cuda") else "peak RSS of each side's process",
            "rows": rows}


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
    ap.add_argument("--threads", type=int, default=None, help="torch threads of every side (default: torch's)")
    ap.add_argument("--options", default=None, help=f"comma-separated options (default: all of {', '.join(OPTIONS)})")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a side's process: a TrainConfig as JSON
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        serve_worker(lambda: project_step(TrainConfig.from_dict(json.loads(a.worker)), a.device), a.device)
        return
    options = None if a.options is None else parse_options(a.options)
    sets = {"crop": a.crop, "batch": a.batch, **({"model": a.model} if a.model else {})}
    result = bench_options(build_config(a.preset, sets=sets), steps=a.steps, warmup=a.warmup, device=a.device,
                           options=options, threads=a.threads)
    print(json.dumps(result) if a.json else rows_table(result["rows"], "fp32 eager"))


if __name__ == "__main__":
    main()
