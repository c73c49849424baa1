"""Deployed latency of an architecture, for the tuner's budgets and its latency objective.

Latency depends on the architecture, not on the weights: the untrained model of a config is exported to its
deploy graph (``python cli.py export --tile HxW``, folded, TLC) and timed with ``python cli.py bench`` on
every deploy backend of this machine (PyTorch eager excluded); the fastest row's median is the figure. Both run
as subprocesses (the command line is the one way to export and bench). Each result is cached in
``$NAFNET_CACHE_DIR/latency.json`` (default ``~/.cache/nafnet-deblurring``; ``$NAFNET_LATENCY_CACHE`` names
another file) under the architecture's hash and
this machine's, so every architecture is measured once per machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from nafnet_core.errors import UserError
from nafnet_core.fileio import atomic_write_text

from .config import TrainConfig

CACHE_NAME = "latency.json"


def cache_path() -> Path:
    """``$NAFNET_LATENCY_CACHE``, else ``latency.json`` in the project's cache folder."""
    from nafnet_core.synth import cache_dir

    env = os.environ.get("NAFNET_LATENCY_CACHE")
    return Path(env) if env else cache_dir() / CACHE_NAME


def machine_key() -> str:
    """This machine as a latency cache key: host, CPU model, cores, thread setting, CUDA device."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = ""
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    parts = [platform.node(), cpu, str(os.cpu_count()), os.environ.get("OMP_NUM_THREADS", ""), gpu]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def architecture_key(cfg: TrainConfig, size: tuple[int, int]) -> str:
    """The deploy graph's identity: every architecture field, the TLC train size (= crop) and the bench size."""
    from nafnet_core.config import get_config

    overrides = dict(cfg.model_args)
    arch = get_config(cfg.model, **overrides).to_dict()
    arch.pop("drop_out_rate", None)  # dropout is not in the deploy graph
    data = {"arch": arch, "train_size": cfg.crop, "size": list(size)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def deploy_latency(cfg: TrainConfig, size: tuple[int, int], cli: list[str], *,
                   echo: Callable[[str], None] = print, cache: Path | None = None) -> dict:
    """``{"ms", "backend", "cached"}``: the fastest deploy backend's median latency of ``cfg``'s architecture at
    ``size`` on this machine (measured once, then read from the cache).

    Args:
        cfg: the training config (model preset + ``model_args``; ``crop`` is the TLC train size).
        size: (H, W) of the benchmark image, multiples of 16.
        cli: how to run the command line (:func:`train.tune.cli_command`).
        echo: where the progress line of a measurement goes.
        cache: the cache file (default :func:`cache_path`).
    """
    import fcntl

    cache = cache or cache_path()
    key = f"{architecture_key(cfg, size)}@{machine_key()}"
    hit = _read_cache(cache).get(key)
    if hit:
        return {**hit, "cached": True}
    cache.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(cache.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # one measurement at a time on this machine (and no duplicate)
        hit = _read_cache(cache).get(key)
        if hit:
            return {**hit, "cached": True}
        h, w = size
        args = " " + json.dumps(cfg.model_args, separators=(",", ":")) if cfg.model_args else ""
        echo(f"latency: exporting and benchmarking the deploy graph of {cfg.model}{args} at {h}x{w}")
        result = _measure(cfg, size, cli)
        data = _read_cache(cache)
        data[key] = result
        atomic_write_text(cache, json.dumps(data, indent=1, sort_keys=True) + "\n")
        return {**result, "cached": False}
    finally:
        os.close(lock_fd)


def _measure(cfg: TrainConfig, size: tuple[int, int], cli: list[str]) -> dict:
    from nafnet_core import save_checkpoint

    from .loop import build_model

    h, w = size
    with tempfile.TemporaryDirectory(prefix="nafnet-latency-") as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "untrained.pt"
        model = build_model(TrainConfig.from_dict({**cfg.to_dict(), "dropout": 0.0}))
        save_checkpoint(ckpt, model, train_size=cfg.crop)
        steps = [[*cli, "export", str(ckpt), "--out", str(tmp / "export"), "--tile", f"{h}x{w}", "--no-check"],
                 [*cli, "bench", str(tmp / "export"), "--size", f"{h}x{w}", "--no-torch", "--no-bf16", "--repeats",
                  "5", "--quiet", "--json", str(tmp / "bench.json")]]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
                raise UserError(f"latency of {cfg.model} {cfg.model_args}: `{' '.join(cmd[1:4])}` failed: "
                                f"{lines[-1] if lines else proc.returncode}")
        rows = json.loads((tmp / "bench.json").read_text())["rows"]
    timed = [r for r in rows if r.get("median_ms")]
    if not timed:
        raise UserError(f"latency of {cfg.model} {cfg.model_args}: no backend could be timed on this machine")
    best = min(timed, key=lambda r: r["median_ms"])
    return {"ms": round(float(best["median_ms"]), 3), "backend": f"{best['backend']} {best['precision']}",
            "size": f"{h}x{w}"}
