"""This project's training step against the official NAFNet step, each side in a process of its own, interleaved.

    python -m benchmarks.official_step --official /path/to/NAFNet            # a checkout of megvii-research/NAFNet
    python -m benchmarks.official_step --official /path/to/NAFNet --json --steps 5 --options reuse_memory=off,compile

The official side is the public code's ``ImageRestorationModel.optimize_parameters`` on its own
``NAFNet`` and ``PSNRLoss`` (read from the checkout, not copied here): zero_grad, forward, the PSNR loss
plus its ``0 * sum(p.sum())`` term, backward, ``clip_grad_norm_(params, 0.01)``, ``AdamW.step`` (torch's
default kernel, as the official recipe builds it: lr 1e-3, weight decay 1e-3, betas (0.9, 0.9)). Both
sides get the same weights (the project's initialisation, loaded into the official model by name), the
same inputs and the same threads. Each side runs in a process of its own (so the official side keeps glibc's
default allocator behaviour whatever the project's ``reuse_memory`` does); they are timed in turns
(official, project, option, ...) and compared by the median of per-round ratios; peak RSS is each side's
process's.

Only ``basicsr/models/archs/{NAFNet_arch,arch_util,local_arch}.py`` and ``basicsr/models/losses`` are
imported from the checkout, without running ``basicsr/__init__.py`` (which needs cv2, lmdb, ...).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

from nafnet_core.errors import UserError
from train.bench import (
    OPTIONS,
    Side,
    bench_inputs,
    parse_options,
    project_step,
    rows_table,
    serve_worker,
    summarise,
    time_interleaved,
)
from train.config import TrainConfig, build_config
from train.speed import resolve

from .common import machine, machine_line

OFFICIAL_FILE = "basicsr/models/archs/NAFNet_arch.py"


def load_official(path: str | Path) -> tuple[type, type]:
    """The official ``NAFNet`` and ``PSNRLoss`` classes from a checkout of megvii-research/NAFNet.

    Args:
        path: the checkout's root (holding ``basicsr/``).
    """
    root = Path(path).expanduser().resolve()
    if not (root / OFFICIAL_FILE).is_file():
        raise UserError(f"{root}: no {OFFICIAL_FILE}; pass the root of a checkout of megvii-research/NAFNet "
                        "(git clone https://github.com/megvii-research/NAFNet)")
    # Empty packages in place of basicsr's heavy __init__ files; their submodules load from the checkout.
    for name in ("basicsr", "basicsr.models", "basicsr.models.archs", "basicsr.models.losses"):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(root / name.replace(".", "/"))]
            sys.modules[name] = pkg
    if "basicsr.utils" not in sys.modules:  # arch_util imports get_root_logger only
        import logging

        utils = types.ModuleType("basicsr.utils")
        utils.get_root_logger = lambda *a, **k: logging.getLogger("basicsr")
        sys.modules["basicsr.utils"] = utils
    arch = importlib.import_module("basicsr.models.archs.NAFNet_arch")
    losses = importlib.import_module("basicsr.models.losses.losses")
    return arch.NAFNet, losses.PSNRLoss


def official_step(path: str, cfg: TrainConfig, device: str) -> Callable[[], None]:
    """One step of the official training code (see the module docstring) on the project's initial weights."""
    import warnings

    from train.loop import build_model

    warnings.filterwarnings("ignore", message=".*saved_variables.*")  # the official LayerNorm's deprecated API
    official_net, psnr_loss = load_official(path)
    torch.manual_seed(cfg.seed)
    ours = build_model(cfg)
    mc = ours.config
    net = official_net(img_channel=mc.img_channel, width=mc.width, middle_blk_num=mc.middle_blk_num,
                       enc_blk_nums=list(mc.enc_blk_nums), dec_blk_nums=list(mc.dec_blk_nums))
    net.load_state_dict(ours.state_dict())
    del ours
    net = net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    criterion = psnr_loss(loss_weight=1.0, reduction="mean")
    blur, sharp = bench_inputs(cfg.batch, cfg.crop, device)

    def step() -> None:
        opt.zero_grad()
        pred = net(blur)
        loss = criterion(pred, sharp)
        loss = loss + 0.0 * sum(p.sum() for p in net.parameters())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.01)
        opt.step()

    return step


def compare(official: str, cfg: TrainConfig, *, options: list[str], steps: int, warmup: int, threads: int,
            device: str = "cpu", progress: bool = True) -> dict:
    """Times the official step, the project's ``cfg`` and each of ``options`` interleaved, each side in a process of
    its own (:func:`train.bench.time_interleaved`); peak memory per side.

    Args:
        official: root of a checkout of megvii-research/NAFNet.
        cfg: the project's training config (model, batch, crop, loss, optimizer, clipping).
        options: names from :data:`train.bench.OPTIONS` to time besides the config as given.
        steps: timed rounds. warmup: untimed steps per side (the first includes any compilation).
        threads: torch threads of every side.
        device: cpu or cuda[:i].
        progress: per-round lines on stderr.
    """
    load_official(official)  # fail fast on a bad path
    common = ["--official", official, "--threads", str(threads), "--device", device,
              "--batch", str(cfg.batch), "--crop", str(cfg.crop), "--model", cfg.model]
    sides = [Side("official", ["benchmarks.official_step", *common, "--worker", "official"])]
    for name in ["config", *options]:
        c = cfg if name == "config" else TrainConfig.from_dict(cfg.to_dict() | OPTIONS[name])
        sides.append(Side(name, ["benchmarks.official_step", *common, "--worker", json.dumps(c.to_dict())],
                          compiles=resolve(c, torch.device(device)).compile))
    time_interleaved(sides, steps=steps, warmup=warmup, device=device, progress=progress)
    return {"model": cfg.model, "crop": cfg.crop, "batch": cfg.batch, "device": device, "threads": threads,
            "warmup_steps": warmup, "timed_steps": steps, "memory": "peak RSS of each side's process",
            "rows": summarise(sides, cfg.batch, "official")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.official_step",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="root of a checkout of megvii-research/NAFNet")
    ap.add_argument("--model", default="nafnet-gopro-width32", help="model preset (both sides)")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--options", default="reuse_memory=off",
                    help=f"comma-separated options to time besides the config (from: {', '.join(OPTIONS)})")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a training config key of the project side")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a side's process: official | config JSON
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from train.config import parse_sets

    cfg = build_config("gopro", sets={"model": a.model, "batch": a.batch, "crop": a.crop, **parse_sets(a.sets)})
    if a.worker:
        serve_worker(lambda: official_step(a.official, cfg, a.device) if a.worker == "official" else
                     project_step(TrainConfig.from_dict(json.loads(a.worker)), a.device), a.device)
        return
    result = compare(a.official, cfg, options=parse_options(a.options), steps=a.steps, warmup=a.warmup,
                     threads=a.threads, device=a.device)
    result["machine"] = machine()
    if a.json:
        print(json.dumps(result))
    else:
        print(machine_line(result["machine"]))
        print(rows_table(result["rows"], "official"))


if __name__ == "__main__":
    main()
