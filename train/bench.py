"""Training throughput: images per second of one optimizer step (forward, loss, backward, clip, step).

    python -m train.bench --preset tiny --crop 256 --batch 4

Measures the model's compute only (random inputs already in memory; data loading excluded), after
warm-up steps, as the median over timed steps. Also reachable as ``python cli.py train --bench``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn

from .config import TrainConfig, build_config
from .loop import build_model, make_optimizer
from .objectives import LOSS_FUNCTIONS


def train_throughput(cfg: TrainConfig, steps: int = 5, warmup: int = 2, device: str = "cpu") -> dict:
    """Median seconds per step and images/s for ``cfg.model`` at ``cfg.crop``² crops, batch ``cfg.batch``."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device).train()
    opt = make_optimizer(cfg, model)
    loss_fn = LOSS_FUNCTIONS[cfg.loss]
    g = torch.Generator().manual_seed(0)
    sharp = torch.rand(cfg.batch, 3, cfg.crop, cfg.crop, generator=g).to(device)
    blur = (sharp + 0.05 * torch.randn(sharp.shape, generator=g).to(device)).clamp(0, 1)
    times = []
    for i in range(warmup + steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(blur), sharp)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"model": cfg.model, "crop": cfg.crop, "batch": cfg.batch, "device": device,
            "threads": torch.get_num_threads(), "warmup_steps": warmup, "timed_steps": steps,
            "seconds_per_step_median": round(sec, 4), "seconds_per_step_min": round(min(times), 4),
            "images_per_s": round(cfg.batch / sec, 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="training preset (model, loss, optimizer)")
    ap.add_argument("--model", default=None, help="model preset, overriding the training preset's")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    sets = {"crop": a.crop, "batch": a.batch, **({"model": a.model} if a.model else {})}
    print(json.dumps(train_throughput(build_config(a.preset, sets=sets), a.steps, a.warmup, a.device)))


if __name__ == "__main__":
    main()
