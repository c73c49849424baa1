"""The training loop: one readable function, labelled stages, no callback framework.

    python cli.py train --preset tiny                    # one process
    torchrun --nproc_per_node=2 cli.py train --preset tiny  # DDP, same result as one process

A run directory holds ``config.json``, ``splits/{train,val,test}.txt``, ``last.pt`` (everything needed
to resume exactly), ``best.pt`` (best validation PSNR), ``metrics.csv``, ``curves.png`` and
``samples.png`` (blur | output | sharp). Every file is written atomically.

Exact resume: the data order and augmentation are pure functions of ``(seed, step)``
(:class:`train.data.SampleStream`), dropout is reseeded from ``(seed, step, rank)`` at every step, and
``last.pt`` stores weights, optimizer (and grad-scaler / EMA) state, the step, the best score so far and
the RNG states. A resumed run therefore ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from nafnet_core import create_model, read_checkpoint, save_checkpoint
from nafnet_core.errors import UserError
from nafnet_core.fileio import atomic_write_text
from nafnet_core.model import NAFNet

from . import distributed as ddp
from .config import TrainConfig
from .data import PairDataset, PairTransform, SampleStream, check_dataset, train_loader, write_split_lists
from .evaluate import evaluate
from .objectives import LOSS_FUNCTIONS, lr_at
from .report import MetricsLog, plot_curves, write_sample_grid
from .synth import ensure_synthetic

CACHE_LIMIT_BYTES = 2 << 30


class TrainingError(UserError):
    """Training cannot go on (non-finite loss, nothing to resume...); the message says what to do."""


@dataclass
class RunResult:
    """What :func:`train` returns."""

    run_dir: Path
    status: str  # done | interrupted | early_stop | stopped_at
    step: int
    total_steps: int
    best_psnr: float
    best_step: int
    last_val: dict = field(default_factory=dict)
    model: NAFNet | None = None  # this rank's trained model (unwrapped)


class _StopSignal:
    """SIGINT/SIGTERM set a flag; the loop saves ``last.pt`` and exits cleanly. A second Ctrl-C aborts."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _rng_state() -> dict:
    # Plain containers and tensors only, so the checkpoint loads with weights_only=True.
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                        *np_state[2:]],
             "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.amp == "off":
        return None  # mixed precision is CUDA-only here; CPU trains in fp32
    if cfg.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cfg.amp == "bf16" else torch.float16


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def build_model(cfg: TrainConfig) -> NAFNet:
    overrides = dict(cfg.model_args)
    if cfg.dropout:
        overrides["drop_out_rate"] = cfg.dropout
    return create_model(cfg.model, **overrides)


def resolve_data(cfg: TrainConfig, info: ddp.DistInfo, progress: bool) -> Path:
    """The data set root: ``cfg.data``, or the synthetic set (rank 0 generates it, the others wait)."""
    if cfg.data:
        return Path(cfg.data)
    if info.is_main:
        root = ensure_synthetic(cfg.synth_seed, cfg.synth_count, progress=progress)
    ddp.barrier(info)
    return ensure_synthetic(cfg.synth_seed, cfg.synth_count, progress=False)


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          stop_at: int | None = None, device: str | None = None) -> RunResult:
    """Trains ``cfg`` into ``run_dir`` (or continues ``run_dir/last.pt`` with ``resume``).

    Args:
        cfg: the configuration.
        run_dir: where everything is written (rank 0 only).
        resume: continue from ``run_dir/last.pt``.
        progress: tqdm progress bar on stderr (rank 0).
        stop_at: save ``last.pt`` and return after this global step, as if interrupted (tests).
        device: ``cpu``, ``cuda``, ``cuda:1`` or None (CUDA when available).
    """
    info = ddp.setup(device)
    try:
        return _train(cfg, Path(run_dir), info, resume=resume, progress=progress and info.is_main, stop_at=stop_at)
    finally:
        ddp.cleanup(info)


def _train(cfg: TrainConfig, run_dir: Path, info: ddp.DistInfo, *, resume: bool, progress: bool,
           stop_at: int | None) -> RunResult:
    main, dev = info.is_main, info.device
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if main else (lambda msg: None)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"

    # ---- resume: the stored state (read before anything else so a bad file fails fast) -------------
    state = None
    if resume:
        if not last_path.exists():
            raise TrainingError(f"{last_path}: nothing to resume (no last.pt in the run directory); "
                                "drop --resume to start a new run")
        state = read_checkpoint(last_path)
        if "train_config" not in state.get("extra", {}):
            raise TrainingError(f"{last_path}: not a training checkpoint (no training state); cannot resume")
    elif main and last_path.exists():
        raise TrainingError(f"{run_dir}: already holds a run (last.pt); pass --resume to continue it or choose "
                            "another --name / --run-dir")

    # ---- data: check every pair before the first step -------------------------------------------
    root = resolve_data(cfg, info, progress)
    min_size = cfg.crop if cfg.crop_mode in ("random", "center") else 0
    report = check_dataset(root, min_size=min_size, blur_dir=cfg.blur_dir, progress=progress)
    report.raise_if_bad()
    pairs = report.pairs
    say(f"data: {root} ({report.layout}) train {len(pairs['train'])} / val {len(pairs['val'])} / "
        f"test {len(pairs['test'])} pairs")
    if not pairs["val"]:
        raise TrainingError(f"{root}: the validation split is empty (the test folder needs at least 1 pair)")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_split_lists(pairs, root, run_dir / "splits")
        atomic_write_text(run_dir / "config.json", json.dumps({**cfg.to_dict(), "data_root": str(root.resolve()),
                                                               "world_size": info.world}, indent=1) + "\n")
    n_train = len(pairs["train"])
    pixels = sum(int(np.prod(_size(p))) for p in pairs["train"][:1]) * 6 * (n_train + len(pairs["val"]))
    cache = cfg.cache == "on" or (cfg.cache == "auto" and pixels < CACHE_LIMIT_BYTES)
    transform = PairTransform(cfg.crop_mode, cfg.crop, cfg.hflip, cfg.vflip, cfg.transpose)
    train_set = PairDataset(pairs["train"], transform, seed=cfg.seed, cache=cache)
    val_pairs = pairs["val"][: cfg.val_max] if cfg.val_max else pairs["val"]
    val_set = PairDataset(val_pairs, None, cache=cache)
    stream = SampleStream(n_train, cfg.batch, seed=cfg.seed, world=info.world, rank=info.rank, accum=cfg.accum)
    steps_per_epoch = n_train / cfg.batch
    total_steps = math.ceil(cfg.epochs * steps_per_epoch) if cfg.epochs else cfg.steps
    total_epochs = math.ceil(cfg.epochs) if cfg.epochs else max(1, math.ceil(total_steps / steps_per_epoch))

    # ---- model, optimizer, EMA, mixed precision --------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(dev)
    opt = make_optimizer(cfg, model)
    amp_dtype = _amp_dtype(cfg, dev)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema else None
    step, best_psnr, best_step, bad_vals = 0, -math.inf, -1, 0
    metrics = MetricsLog(run_dir / "metrics.csv")
    if state is not None:
        extra = state["extra"]
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(extra["optimizer"])
        if extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        if ema is not None and extra.get("ema") is not None:
            ema.load_state_dict(extra["ema"])
        step, best_psnr, best_step, bad_vals = extra["step"], extra["best_psnr"], extra["best_step"], extra["bad_vals"]
        _set_rng_state(extra["rng"])
        if main:
            metrics.load(up_to_step=step)
            for stale in run_dir.glob(".*.part"):  # temp files of a process killed mid-write
                stale.unlink(missing_ok=True)
        say(f"resumed {last_path} at step {step}/{total_steps} (best val PSNR {best_psnr:.2f} dB at step {best_step})")
    net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None) \
        if info.enabled else model
    loss_fn = LOSS_FUNCTIONS[cfg.loss]

    def save_last() -> None:
        if main:
            save_checkpoint(last_path, model, train_size=cfg.crop, train_config=cfg.to_dict(), step=step,
                            total_steps=total_steps, optimizer=opt.state_dict(),
                            scaler=scaler.state_dict() if scaler.is_enabled() else None,
                            ema=ema.state_dict() if ema is not None else None, best_psnr=best_psnr,
                            best_step=best_step, bad_vals=bad_vals, rng=_rng_state(), world_size=info.world)
        ddp.barrier(info)

    def validate() -> dict:
        """Rank 0 scores the val split (whole images, TLC); returns the means. The others wait."""
        nonlocal best_psnr, best_step, bad_vals
        row: dict = {}
        if main:
            t0 = time.perf_counter()
            images = [val_set.load(i) for i in range(len(val_set))]
            res = evaluate(ema if ema is not None else model, val_pairs, tlc=cfg.val_tlc, train_size=cfg.crop,
                           device=dev, keep_samples=3, images=images)
            if res.failed:
                save_last()
                raise TrainingError("validation pairs that cannot be scored: " + "; ".join(res.failed.values())
                                    + f". Saved {last_path} at step {step}; fix or remove them, then --resume")
            row = res.summary()
            metrics.add(step=step, epoch=round(stream.epoch_at(step), 3), kind="val", val_psnr=row["psnr"],
                        val_ssim=row["ssim"], val_input_psnr=row["input_psnr"], val_input_ssim=row["input_ssim"],
                        elapsed_s=round(time.perf_counter() - t_start, 1))
            improved = row["psnr"] > best_psnr
            if improved:
                best_psnr, best_step, bad_vals = row["psnr"], step, 0
                save_checkpoint(best_path, ema if ema is not None else model, train_size=cfg.crop,
                                train_config=cfg.to_dict(), step=step, val=row)
            else:
                bad_vals += 1
            write_sample_grid(res.samples, run_dir / "samples.png")
            metrics.flush()
            plot_curves(metrics, run_dir / "curves.png", title=run_dir.name)
            say(f"step {step}: val PSNR {row['psnr']:.2f} dB SSIM {row['ssim']:.4f} (blurry input "
                f"{row['input_psnr']:.2f} dB / {row['input_ssim']:.4f}){' *best*' if improved else ''} "
                f"[{time.perf_counter() - t0:.1f} s]")
        # Keep every rank's copy of the early-stopping counter equal (it is saved in last.pt by rank 0 only).
        bad_vals_shared = ddp.from_main(info, cfg.early_stop > 0 and bad_vals >= cfg.early_stop)
        return {**row, "early_stop": bad_vals_shared}

    # ---- the loop -------------------------------------------------------------------------------
    loader = iter(train_loader(train_set, stream, step, workers=cfg.workers, pin_memory=dev.type == "cuda"))
    net.train()
    status, last_val = "done", {}
    t_start = time.perf_counter()
    pbar = None
    if progress:
        from tqdm import tqdm

        pbar = tqdm(total=total_steps, initial=step, desc=run_dir.name, unit="step", dynamic_ncols=True)
    window_t, window_images, window_loss, window_psnr, window_n = time.perf_counter(), 0, 0.0, 0.0, 0
    with _StopSignal() as stop:
        while step < total_steps:
            # lr for this step (a pure function of the step)
            lr = lr_at(step, lr=cfg.lr, lr_min=cfg.lr_min, total_steps=total_steps, schedule=cfg.schedule,
                       warmup=cfg.warmup, steps_per_epoch=steps_per_epoch, total_epochs=total_epochs)
            for group in opt.param_groups:
                group["lr"] = lr
            torch.manual_seed(cfg.seed * 1_000_003 + step * 997 + info.rank)  # dropout: f(seed, step, rank)

            # forward + backward over the micro-batches of this step
            opt.zero_grad(set_to_none=True)
            loss_sum, psnr_sum = 0.0, 0.0
            for micro in range(cfg.accum):
                try:
                    blur, sharp = next(loader)
                except UserError as e:  # a file unreadable past its header (the pre-check reads headers only)
                    if pbar:
                        pbar.close()
                    save_last()
                    raise TrainingError(f"{e}; saved {last_path} at step {step}. Fix or remove the file "
                                        f"(python cli.py data check {root} --full lists them all), then --resume"
                                        ) from None
                blur, sharp = blur.to(dev, non_blocking=True), sharp.to(dev, non_blocking=True)
                sync = net.no_sync() if info.enabled and micro < cfg.accum - 1 else contextlib.nullcontext()
                autocast = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
                with sync:
                    with autocast:
                        out = net(blur)
                    loss = loss_fn(out.float(), sharp)
                    scaler.scale(loss / cfg.accum).backward()
                with torch.no_grad():
                    mse = (out.detach().float().clamp(0, 1) - sharp).pow(2).flatten(1).mean(1)
                    psnr_sum += float((-10 * torch.log10(mse + 1e-10)).mean())
                loss_sum += float(loss.detach())

            # clip, check, step (the gradient norm is the same on every rank after DDP's all-reduce)
            scaler.unscale_(opt)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            # Without a grad scaler a NaN anywhere makes the all-reduced norm NaN on every rank; with fp16
            # scaling, inf gradients are expected now and then (the scaler skips the step), a NaN loss is not.
            broken = ddp.any_rank(info, not math.isfinite(loss_sum)) if scaler.is_enabled() \
                else not bool(torch.isfinite(grad_norm))
            if broken:
                if pbar:
                    pbar.close()
                kept = f"{last_path} (step {_stored_step(last_path)})" if last_path.exists() else "none written yet"
                raise TrainingError(f"loss became non-finite at step {step + 1} (loss {loss_sum}, gradient norm "
                                    f"{float(grad_norm)}); training stopped without saving the broken weights. "
                                    f"Last good checkpoint: {kept}. Lower the learning rate (--set lr=...) "
                                    "or check the data, then --resume.")
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                with torch.no_grad():
                    for e, p in zip(ema.parameters(), model.parameters()):
                        e.lerp_(p, 1.0 - cfg.ema)
            step += 1

            # log
            window_images += cfg.batch
            window_loss += loss_sum / cfg.accum
            window_psnr += psnr_sum / cfg.accum
            window_n += 1
            if pbar:
                pbar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                loss_avg = ddp.mean_over_ranks(info, window_loss / window_n)
                psnr_avg = ddp.mean_over_ranks(info, window_psnr / window_n)
                ips = window_images / max(1e-9, time.perf_counter() - window_t)
                if main:
                    metrics.add(step=step, epoch=round(stream.epoch_at(step), 3), kind="train", lr=lr, loss=loss_avg,
                                train_psnr=psnr_avg, images_per_s=round(ips, 2),
                                elapsed_s=round(time.perf_counter() - t_start, 1))
                    metrics.flush()
                    if pbar:
                        pbar.set_postfix(loss=f"{loss_avg:.4f}", psnr=f"{psnr_avg:.2f}", lr=f"{lr:.2e}",
                                         img_s=f"{ips:.1f}")
                window_t, window_images, window_loss, window_psnr, window_n = time.perf_counter(), 0, 0.0, 0.0, 0

            # validate / checkpoint / stop
            if step % cfg.val_every == 0 or step == total_steps:
                last_val = validate()
                save_last()
                if last_val.pop("early_stop", False):
                    say(f"early stop: no better validation PSNR in {cfg.early_stop} validations")
                    status = "early_stop"
                    break
            elif step % cfg.save_every == 0:
                save_last()
            if ddp.any_rank(info, stop.received is not None):
                save_last()
                say(f"\n{stop.received or 'stop signal'} received: saved {last_path} at step {step}; "
                    "continue with --resume")
                status = "interrupted"
                break
            if stop_at is not None and step >= stop_at:
                save_last()
                status = "stopped_at"
                break
    if pbar:
        pbar.close()
    if main:
        metrics.flush()
        plot_curves(metrics, run_dir / "curves.png", title=run_dir.name)
    return RunResult(run_dir=run_dir, status=status, step=step, total_steps=total_steps, best_psnr=best_psnr,
                     best_step=best_step, last_val=last_val, model=model)


def _size(pair) -> tuple[int, int]:
    from nafnet_core.images import image_size

    return image_size(pair.blur)


def _stored_step(path: Path) -> int | str:
    try:
        return read_checkpoint(path)["extra"]["step"]
    except (UserError, KeyError, TypeError):
        return "?"
