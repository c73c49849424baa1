"""The training loop: one :class:`Trainer` whose methods are the named steps, no callback framework.

    python cli.py train --preset tiny                    # one process
    torchrun --nproc_per_node=2 cli.py train --preset tiny  # DDP, same result as one process

A run directory holds ``config.json``, ``splits/{train,val,test}.txt``, ``last.pt`` (everything needed
to resume exactly), ``best.pt`` (best validation PSNR), ``best_val.json`` (that validation, per image and
per output, as ``eval --json`` writes it), ``metrics.csv``, ``curves.png`` and
``samples.png`` (blur | output | sharp), and TensorBoard event files (:mod:`train.dashboard`). Every file
is written atomically, except the event files, which are append-only logs. While a run goes on, rank 0
holds the directory (:func:`hold_run_dir`): a second trainer on it stops before any work.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nafnet_core import create_model, read_checkpoint, save_checkpoint
from nafnet_core.adarevd import AdaRevD, exit_labels, set_training_stage
from nafnet_core.checkpoint import load_checkpoint, load_encoder
from nafnet_core.data import check_dataset, write_split_lists
from nafnet_core.errors import UserError
from nafnet_core.fileio import FolderBusyError, atomic_write_text, exclusive_folder
from nafnet_core.model import NAFNet
from nafnet_core.synth import ensure_synthetic

from . import distributed as ddp
from . import speed
from .config import TrainConfig
from .dashboard import Dashboard, summary_writer_class
from .data import PairDataset, PairTransform, SampleStream, train_loader
from .evaluate import evaluate
from .objectives import LOSS_FUNCTIONS, best_output, depth_mean_loss, lr_at
from .report import MetricsLog, plot_curves, write_sample_grid

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


def build_model(cfg: TrainConfig) -> NAFNet:
    overrides = dict(cfg.model_args)
    if cfg.dropout:
        overrides["drop_out_rate"] = cfg.dropout
    model = create_model(cfg.model, **overrides)
    if cfg.init:
        init_weights(model, cfg.init)
    if isinstance(model, AdaRevD):
        set_training_stage(model, cfg.stage)
    return model


def init_weights(model: nn.Module, path: str) -> None:
    """``cfg.init``: the weights of ``path`` (the same architecture), or for an AdaRevD model the encoder of a
    NAFNet checkpoint; a file that fits neither is a one-line error naming it."""
    state = read_checkpoint(path)
    if isinstance(model, AdaRevD) and not str(state.get("config", {}).get("decoder", "")) == "adarevd":
        load_encoder(model, path)
        return
    loaded = load_checkpoint(path)
    if loaded.config != model.config:
        raise TrainingError(f"{path}: init weights of another architecture than model {model.config}; use a "
                            "checkpoint of the same model")
    model.load_state_dict(loaded.model.state_dict())


def resolve_data(cfg: TrainConfig, info: ddp.DistInfo, progress: bool) -> Path:
    """The data set root: ``cfg.data``, or the synthetic set (rank 0 generates it, the others wait)."""
    if cfg.data:
        return Path(cfg.data)
    if info.is_main:
        ensure_synthetic(cfg.synth_seed, cfg.synth_count, progress=progress, shake=cfg.synth_shake)
    ddp.barrier(info)
    return ensure_synthetic(cfg.synth_seed, cfg.synth_count, progress=False, shake=cfg.synth_shake)


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
        with hold_run_dir(Path(run_dir), info) as dead_holder:
            trainer = Trainer(cfg, Path(run_dir), info, resume=resume, progress=progress and info.is_main,
                              stop_at=stop_at)
            if dead_holder is not None:
                trainer.say(f"{run_dir}: took over the run directory from PID {dead_holder}, which is no longer "
                            "running")
            return trainer.run()
    finally:
        ddp.cleanup(info)


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, info: ddp.DistInfo) -> Iterator[int | None]:
    """Rank 0 holds ``run_dir`` exclusively for the whole run (:func:`nafnet_core.fileio.exclusive_folder`,
    the folder lock ``infer`` takes shared); a second trainer on it stops here, before any work, on every
    rank. Yields the PID of a dead process whose stale lock was taken over, else None.

    Args:
        run_dir: the run directory.
        info: this process's place in the process group.
    """
    with contextlib.ExitStack() as stack:
        busy, dead_holder = None, None
        if info.is_main:
            try:
                dead_holder = stack.enter_context(exclusive_folder(
                    run_dir, advice="two trainers on one run directory overwrite each other's checkpoints: wait "
                    "for it to end or stop it, or choose another --name / --runs"))
            except FolderBusyError as e:
                busy = e
        if ddp.from_main(info, busy is not None):
            raise busy or TrainingError(f"{run_dir}: held by another process (rank 0's message names it)")
        yield dead_holder


class Trainer:
    """One training run, as named steps: :meth:`setup` (data, model, optimizer), :meth:`resume`,
    :meth:`train_step`, :meth:`log`, :meth:`validate`, :meth:`save_last`; :meth:`run` is the loop.

    A model variant changes a hook, not the loop: :meth:`loss` (what is minimised, given the model's raw
    output and the sharp target) and :meth:`prediction` (the restored image inside that output, on which
    the training PSNR is measured). Validation scores the model's forward through :func:`train.evaluate.evaluate`.
    The raw output holds every output of the model (``all_heads=True``: (N, n_outputs, 3, H, W)); a
    multi-head model trains its best output per image and validation chooses its deployment head (the
    output with the best validation PSNR), which ``best.pt`` / ``last.pt`` record.

    Args:
        cfg: the configuration.
        run_dir: the run directory (rank 0 writes it).
        info: this process's place in the process group (:func:`train.distributed.setup`).
        resume: continue from ``run_dir/last.pt``.
        progress: tqdm progress bar on stderr (pass False on ranks other than 0).
        stop_at: save ``last.pt`` and stop after this global step, as if interrupted (tests).
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path, info: ddp.DistInfo, *, resume: bool = False,
                 progress: bool = True, stop_at: int | None = None):
        self.cfg, self.run_dir, self.info = cfg, Path(run_dir), info
        self.main, self.dev = info.is_main, info.device
        self.resuming, self.progress, self.stop_at = resume, progress, stop_at
        self.last_path, self.best_path = self.run_dir / "last.pt", self.run_dir / "best.pt"
        self.best_val_path = self.run_dir / "best_val.json"  # the validation best.pt was saved at
        # What last.pt stores besides the weights and optimizer state.
        self.step, self.best_psnr, self.best_step, self.bad_vals = 0, -math.inf, -1, 0
        self.lr = cfg.lr
        self.t_start = time.perf_counter()
        self.writer_class: type | None = None  # TensorBoard (rank 0, when on)
        self.dashboard = Dashboard(self.run_dir, None)

    def say(self, msg: str) -> None:
        """One line on stderr, from rank 0 only.

        Args:
            msg: the line.
        """
        if self.main:
            print(msg, file=sys.stderr, flush=True)

    # ---- variant hooks --------------------------------------------------------------------------

    def outputs(self, blur: torch.Tensor):
        """What the model's forward returns for the loss: every output (``all_heads=True``, (N, n_outputs, 3, H,
        W)); for AdaRevD's stage 2 the classifier's logits of each crop with the blurry batch (its labels)."""
        if isinstance(self.model, AdaRevD) and self.cfg.stage == 2:
            return self.net(blur, all_heads=True, classify=True), blur
        return self.net(blur, all_heads=True)

    def prediction(self, out: torch.Tensor, sharp: torch.Tensor | None = None) -> torch.Tensor:
        """The restored image ``(N, 3, H, W)`` in the model's raw output: the only output of a single-head
        model; of a multi-head one, per image the output closest to ``sharp`` (what the best-of-outputs loss
        trains, :func:`train.objectives.best_output`), or the deployment head without ``sharp``.

        Args:
            out: what the model's forward returned, (N, n_outputs, 3, H, W).
            sharp: the target batch, or None.
        """
        if isinstance(self.model, AdaRevD):  # every exit depth: the deepest; stage 2 restores nothing: the input
            return out[1] if self.cfg.stage == 2 else out[:, -1]
        return best_output(out, sharp, self.model.head)

    def loss(self, out: torch.Tensor, sharp: torch.Tensor) -> torch.Tensor:
        """The scalar to minimise (``cfg.loss``, computed in fp32).

        Args:
            out: what the model's forward returned (under autocast when mixed precision is on).
            sharp: the target batch.
        """
        if isinstance(self.model, AdaRevD) and self.cfg.stage == 2:  # official ClassifyLoss: cross-entropy
            logits, blur = out
            return F.cross_entropy(logits, exit_labels(blur, sharp, len(self.model.config.exits)))
        if isinstance(self.model, AdaRevD):  # the mean over the exit depths (official AdaRevD stage 1)
            return depth_mean_loss(self.loss_fn, out, sharp)
        return self.loss_fn(self.prediction(out, sharp).float(), sharp)

    # ---- set-up ---------------------------------------------------------------------------------

    def read_state(self) -> dict | None:
        """The stored state to resume, read before anything else so that a bad ``last.pt`` fails fast."""
        if not self.resuming:
            if self.main and self.last_path.exists():
                raise TrainingError(f"{self.run_dir}: already holds a run (last.pt); pass --resume to continue it or "
                                    "choose another --name / --run-dir")
            return None
        if not self.last_path.exists():
            raise TrainingError(f"{self.last_path}: nothing to resume (no last.pt in the run directory); "
                                "drop --resume to start a new run")
        state = read_checkpoint(self.last_path)
        if "train_config" not in state.get("extra", {}):
            raise TrainingError(f"{self.last_path}: not a training checkpoint (no training state); cannot resume")
        return state

    def setup_data(self) -> None:
        """Checks every pair before the first step, writes the splits and config.json, builds the data sets."""
        cfg, info = self.cfg, self.info
        root = self.data_root = resolve_data(cfg, info, self.progress)
        min_size = cfg.crop if cfg.crop_mode in ("random", "center") else 0
        report = check_dataset(root, min_size=min_size, blur_dir=cfg.blur_dir, progress=self.progress)
        report.raise_if_bad()
        pairs = report.pairs
        self.say(f"data: {root} ({report.layout}) train {len(pairs['train'])} / val {len(pairs['val'])} / "
                 f"test {len(pairs['test'])} pairs")
        if not pairs["val"]:
            raise TrainingError(f"{root}: the validation split is empty (the test folder needs at least 1 pair)")
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_split_lists(pairs, root, self.run_dir / "splits")
            atomic_write_text(self.run_dir / "config.json",
                              json.dumps({**cfg.to_dict(), "data_root": str(root.resolve()), "world_size": info.world},
                                         indent=1) + "\n")
        n_train = len(pairs["train"])
        pixels = sum(int(np.prod(_size(p))) for p in pairs["train"][:1]) * 6 * (n_train + len(pairs["val"]))
        cache = cfg.cache == "on" or (cfg.cache == "auto" and pixels < CACHE_LIMIT_BYTES)
        transform = PairTransform(cfg.crop_mode, cfg.crop, cfg.hflip, cfg.vflip, cfg.transpose)
        self.train_set = PairDataset(pairs["train"], transform, seed=cfg.seed, cache=cache)
        self.val_pairs = pairs["val"][: cfg.val_max] if cfg.val_max else pairs["val"]
        self.val_set = PairDataset(self.val_pairs, None, cache=cache)
        self.stream = SampleStream(n_train, cfg.batch, seed=cfg.seed, world=info.world, rank=info.rank,
                                   accum=cfg.accum)
        self.steps_per_epoch = n_train / cfg.batch
        self.total_steps = math.ceil(cfg.epochs * self.steps_per_epoch) if cfg.epochs else cfg.steps
        self.total_epochs = math.ceil(cfg.epochs) if cfg.epochs else \
            max(1, math.ceil(self.total_steps / self.steps_per_epoch))

    def setup_model(self) -> None:
        """Model (seeded), optimizer, mixed precision, EMA copy, loss and the metrics log."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.plan = speed.resolve(cfg, self.dev)  # channels_last / compile / amp / reuse_memory for this device
        speed.apply_process_settings(self.plan)
        self.model = speed.prepare_model(build_model(cfg).to(self.dev), self.plan)
        self.opt = speed.make_optimizer(cfg, self.model)
        self.amp_dtype = self.plan.amp_dtype
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if cfg.ema else None
        self.loss_fn = LOSS_FUNCTIONS[cfg.loss]
        self.metrics = MetricsLog(self.run_dir / "metrics.csv")

    def setup_parallel(self) -> None:
        """The module the steps run: DDP around the model when several processes train."""
        dev = self.dev
        self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=[dev.index] if dev.type == "cuda"
                                                       else None) if self.info.enabled else self.model
        self.net = speed.compile_model(self.net, self.plan)  # DDP first, then compile (torch's advice)

    def setup_dashboard(self) -> None:
        """Checks that TensorBoard logging can run (``cfg.tensorboard``; rank 0), before any work."""
        if not self.main:
            return
        self.writer_class = summary_writer_class(self.cfg.tensorboard)
        if self.writer_class is None and self.cfg.tensorboard == "auto":
            self.say("TensorBoard logging off: the tensorboard package is not installed (pip install tensorboard)")

    def setup(self) -> dict | None:
        """Everything before the first step; returns the state to resume (None for a new run)."""
        state = self.read_state()
        self.setup_dashboard()
        self.setup_data()
        self.setup_model()
        return state

    def resume(self, state: dict) -> None:
        """Restores weights, optimizer / grad-scaler / EMA state, counters and RNG states from ``last.pt``.

        Args:
            state: :func:`nafnet_core.read_checkpoint` of ``last.pt``.
        """
        extra = state["extra"]
        self.model.load_state_dict(state["state_dict"])
        if self.ema is not None:
            self.ema.head = state.get("head", 0)
        self.model.head = state.get("head", 0)  # the deployment head the last validation chose
        self.opt.load_state_dict(extra["optimizer"])
        if extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        if self.ema is not None and extra.get("ema") is not None:
            self.ema.load_state_dict(extra["ema"])
        self.step, self.best_psnr, self.best_step, self.bad_vals = (extra["step"], extra["best_psnr"],
                                                                    extra["best_step"], extra["bad_vals"])
        _set_rng_state(extra["rng"])
        if self.main:
            self.metrics.load(up_to_step=self.step)
            for stale in self.run_dir.glob(".*.part"):  # temp files of a process killed mid-write
                stale.unlink(missing_ok=True)
        self.say(f"resumed {self.last_path} at step {self.step}/{self.total_steps} (best val PSNR "
                 f"{self.best_psnr:.2f} dB at step {self.best_step})")

    # ---- one optimizer step ---------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (a pure function of the step).

        Args:
            step: 0-based step about to be taken.
        """
        cfg = self.cfg
        return lr_at(step, lr=cfg.lr, lr_min=cfg.lr_min, total_steps=self.total_steps, schedule=cfg.schedule,
                     warmup=cfg.warmup, steps_per_epoch=self.steps_per_epoch, total_epochs=self.total_epochs)

    def next_batch(self, batches: Iterator) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(blur, sharp)`` micro-batch on the device; a file unreadable past its header (the
        pre-check reads headers only) saves ``last.pt`` and stops with one line naming it.

        Args:
            batches: the iterator of the training DataLoader.
        """
        try:
            blur, sharp = next(batches)
        except UserError as e:
            self.save_last()
            raise TrainingError(f"{e}; saved {self.last_path} at step {self.step}. Fix or remove the file "
                                f"(python cli.py data check {self.data_root} --full lists them all), then --resume"
                                ) from None
        return blur.to(self.dev, non_blocking=True), sharp.to(self.dev, non_blocking=True)

    def train_step(self, batches: Iterator) -> tuple[float, float]:
        """One optimizer step: lr, forward + backward over the micro-batches, clip, check, step, EMA.

        Returns the step's mean loss and mean training PSNR (of this rank's crops).

        Args:
            batches: the iterator of the training DataLoader.
        """
        cfg, info = self.cfg, self.info
        self.lr = self.lr_at(self.step)
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        torch.manual_seed(cfg.seed * 1_000_003 + self.step * 997 + info.rank)  # dropout: f(seed, step, rank)

        # forward + backward over the micro-batches of this step
        self.opt.zero_grad(set_to_none=True)
        loss_sum, psnr_sum = 0.0, 0.0
        for micro in range(cfg.accum):
            blur, sharp = self.next_batch(batches)
            blur = speed.to_input(blur, self.plan)
            sync = self.net.no_sync() if info.enabled and micro < cfg.accum - 1 else contextlib.nullcontext()
            with sync:
                with speed.autocast(self.plan, self.dev):
                    out = self.outputs(blur)  # (N, n_outputs, 3, H, W)
                loss = self.loss(out, sharp)
                self.scaler.scale(loss / cfg.accum).backward()
            with torch.no_grad():
                mse = (self.prediction(out, sharp).detach().float().clamp(0, 1) - sharp).pow(2).flatten(1).mean(1)
                psnr_sum += float((-10 * torch.log10(mse + 1e-10)).mean())
            loss_sum += float(loss.detach())

        # clip, check, step (the gradient norm is the same on every rank after DDP's all-reduce)
        self.scaler.unscale_(self.opt)
        grad_norm = speed.clip_gradients(self.model, cfg.grad_clip)
        # Without a grad scaler a NaN anywhere makes the all-reduced norm NaN on every rank; with fp16
        # scaling, inf gradients are expected now and then (the scaler skips the step), a NaN loss is not.
        broken = ddp.any_rank(info, not math.isfinite(loss_sum)) if self.scaler.is_enabled() \
            else not bool(torch.isfinite(grad_norm))
        if broken:
            kept = f"{self.last_path} (step {_stored_step(self.last_path)})" if self.last_path.exists() \
                else "none written yet"
            raise TrainingError(f"loss became non-finite at step {self.step + 1} (loss {loss_sum}, gradient norm "
                                f"{float(grad_norm)}); training stopped without saving the broken weights. "
                                f"Last good checkpoint: {kept}. Lower the learning rate (--set lr=...) "
                                "or check the data, then --resume.")
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.model.parameters()):
                    e.lerp_(p, 1.0 - cfg.ema)
        self.step += 1
        return loss_sum / cfg.accum, psnr_sum / cfg.accum

    # ---- log, validate, save --------------------------------------------------------------------

    def log(self, loss: float, psnr: float, pbar=None) -> None:
        """Adds the step to the logging window; every ``log_every`` steps (and at the end) writes a train row
        of ``metrics.csv`` with the window's means over all ranks.

        Args:
            loss / psnr: the step's mean loss and training PSNR.
            pbar: the progress bar (rank 0) or None.
        """
        w = self.window
        w["images"] += self.cfg.batch
        w["loss"] += loss
        w["psnr"] += psnr
        w["n"] += 1
        if pbar:
            pbar.update(1)
        if self.step % self.cfg.log_every and self.step != self.total_steps:
            return
        loss_avg = ddp.mean_over_ranks(self.info, w["loss"] / w["n"])
        psnr_avg = ddp.mean_over_ranks(self.info, w["psnr"] / w["n"])
        ips = w["images"] / max(1e-9, time.perf_counter() - w["t"])
        if self.main:
            row = self.metrics.add(step=self.step, epoch=round(self.stream.epoch_at(self.step), 3), kind="train",
                                   lr=self.lr, loss=loss_avg, train_psnr=psnr_avg, images_per_s=round(ips, 2),
                                   elapsed_s=round(time.perf_counter() - self.t_start, 1))
            self.dashboard.add_row(row)
            self.metrics.flush()
            self.dashboard.flush()
            if pbar:
                pbar.set_postfix(loss=f"{loss_avg:.4f}", psnr=f"{psnr_avg:.2f}", lr=f"{self.lr:.2e}",
                                 img_s=f"{ips:.1f}")
        self._new_window()

    def _new_window(self) -> None:
        self.window = {"t": time.perf_counter(), "images": 0, "loss": 0.0, "psnr": 0.0, "n": 0}

    def validate(self) -> dict:
        """Rank 0 scores the val split (whole images, TLC), logs it, keeps ``best.pt``; the others wait.

        Returns the means, and ``early_stop`` (the same on every rank).
        """
        cfg, step = self.cfg, self.step
        scored = self.ema if self.ema is not None else self.model
        row: dict = {}
        if self.main:
            t0 = time.perf_counter()
            images = [self.val_set.load(i) for i in range(len(self.val_set))]
            res = evaluate(scored, self.val_pairs, tlc=cfg.val_tlc, train_size=cfg.crop, device=self.dev,
                           keep_samples=3, images=images)
            if isinstance(self.model, AdaRevD):  # stage 1: the deepest exit; stage 2: the adaptive result
                res = res.with_head(self.model.depth if cfg.stage == 2 else self.model.depth - 1)
            else:
                res = res.with_head(res.best_head())  # the deployment head: the output with the best val PSNR
                self.model.head = scored.head = res.head
            if res.failed:
                self.save_last()
                raise TrainingError("validation pairs that cannot be scored: " + "; ".join(res.failed.values())
                                    + f". Saved {self.last_path} at step {step}; fix or remove them, then --resume")
            row = res.summary()
            self.dashboard.add_row(self.metrics.add(
                step=step, epoch=round(self.stream.epoch_at(step), 3), kind="val", val_psnr=row["psnr"],
                val_ssim=row["ssim"], val_input_psnr=row["input_psnr"], val_input_ssim=row["input_ssim"],
                elapsed_s=round(time.perf_counter() - self.t_start, 1)))
            improved = row["psnr"] > self.best_psnr
            if improved:
                self.best_psnr, self.best_step, self.bad_vals = row["psnr"], step, 0
                save_checkpoint(self.best_path, scored, train_size=cfg.crop, train_config=cfg.to_dict(), step=step,
                                val=row)
                # the same validation as `eval --json` writes it (AdaRevD: every exit depth, the exit histogram)
                res.write_json(self.best_val_path, split="val", step=step, checkpoint=str(self.best_path),
                               train_size=cfg.crop)
            else:
                self.bad_vals += 1
            write_sample_grid(res.samples, self.run_dir / "samples.png")
            self.dashboard.add_samples(res.samples, step)
            self.metrics.flush()
            self.dashboard.flush()
            plot_curves(self.metrics, self.run_dir / "curves.png", title=self.run_dir.name)
            head = f" (head {res.head} of {res.n_outputs})" if res.n_outputs > 1 else ""
            self.say(f"step {step}: val PSNR {row['psnr']:.2f} dB SSIM {row['ssim']:.4f}{head} (blurry input "
                     f"{row['input_psnr']:.2f} dB / {row['input_ssim']:.4f}){' *best*' if improved else ''} "
                     f"[{time.perf_counter() - t0:.1f} s]")
        # Every rank deploys the head rank 0 chose; the early-stopping counter is equal on every rank (it is
        # saved in last.pt by rank 0 only).
        self.model.head = scored.head = ddp.int_from_main(self.info, self.model.head)
        early_stop = ddp.from_main(self.info, cfg.early_stop > 0 and self.bad_vals >= cfg.early_stop)
        return {**row, "early_stop": early_stop}

    def save_last(self) -> None:
        """Rank 0 writes ``last.pt`` (everything an exact resume needs); every rank waits for it."""
        if self.main:
            save_checkpoint(self.last_path, self.model, train_size=self.cfg.crop, train_config=self.cfg.to_dict(),
                            step=self.step, total_steps=self.total_steps, optimizer=self.opt.state_dict(),
                            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                            ema=self.ema.state_dict() if self.ema is not None else None, best_psnr=self.best_psnr,
                            best_step=self.best_step, bad_vals=self.bad_vals, rng=_rng_state(),
                            world_size=self.info.world)
        ddp.barrier(self.info)

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Set-up, resume, then steps until the end, an early stop, a stop signal or ``stop_at``."""
        cfg = self.cfg
        state = self.setup()
        if state is not None:
            self.resume(state)
        self.setup_parallel()
        batches = iter(train_loader(self.train_set, self.stream, self.step, workers=cfg.workers,
                                    pin_memory=self.dev.type == "cuda"))
        self.net.train()
        self.dashboard = Dashboard(self.run_dir, self.writer_class, resumed_step=None if state is None else self.step)
        status, last_val = "done", {}
        self.t_start = time.perf_counter()
        self._new_window()
        with _StopSignal() as stop, self._progress_bar() as pbar, contextlib.closing(self.dashboard):
            while self.step < self.total_steps:
                loss, psnr = self.train_step(batches)
                self.log(loss, psnr, pbar)

                # validate / checkpoint / stop
                if self.step % cfg.val_every == 0 or self.step == self.total_steps:
                    last_val = self.validate()
                    self.save_last()
                    if last_val.pop("early_stop", False):
                        self.say(f"early stop: no better validation PSNR in {cfg.early_stop} validations")
                        status = "early_stop"
                        break
                elif self.step % cfg.save_every == 0:
                    self.save_last()
                if ddp.any_rank(self.info, stop.received is not None):
                    self.save_last()
                    self.say(f"\n{stop.received or 'stop signal'} received: saved {self.last_path} at step "
                             f"{self.step}; continue with --resume")
                    status = "interrupted"
                    break
                if self.stop_at is not None and self.step >= self.stop_at:
                    self.save_last()
                    status = "stopped_at"
                    break
        if self.main:
            self.metrics.flush()
            plot_curves(self.metrics, self.run_dir / "curves.png", title=self.run_dir.name)
        return RunResult(run_dir=self.run_dir, status=status, step=self.step, total_steps=self.total_steps,
                         best_psnr=self.best_psnr, best_step=self.best_step, last_val=last_val, model=self.model)

    def _progress_bar(self):
        if not self.progress:
            return contextlib.nullcontext(None)
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc=self.run_dir.name, unit="step",
                    dynamic_ncols=True)


def _size(pair) -> tuple[int, int]:
    from nafnet_core.images import image_size

    return image_size(pair.blur)


def _stored_step(path: Path) -> int | str:
    try:
        return read_checkpoint(path)["extra"]["step"]
    except (UserError, KeyError, TypeError):
        return "?"
