"""Training configuration: one dataclass, a table of named presets, overrides checked against field types.

Precedence: preset -> config file (YAML or JSON mapping) -> ``--set key=value`` (values parsed as YAML,
so ``--set lr=2e-4``, ``--set betas=[0.9,0.99]``, ``--set resize=null`` work).

Defaults are the official NAFNet GoPro recipe (docs/DESIGN.md §5 (Training)): AdamW lr 1e-3, weight decay 1e-3,
betas (0.9, 0.9), cosine to 1e-7 per iteration over 200k iterations, global batch 32, random 256 crops,
h/v-flip and transpose p=0.5, gradient-norm clipping at 0.01, PSNR loss.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nafnet_core.config import PRESETS as MODEL_PRESETS
from nafnet_core.config import get_config as get_model_config
from nafnet_core.errors import UserError

from .dashboard import MODES as TENSORBOARD_MODES
from .data import CROP_MODES

LOSSES = ("psnr", "l1", "charbonnier", "charfreq", "l1freq")
OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("cosine", "cosine_epoch", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")


class ConfigError(UserError):
    """A configuration value or file that is wrong; the message names it."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint).

    Args:
        model: model preset (``nafnet_core`` presets: nafnet-gopro-width32, tiny, ...).
        model_args: model option overrides, e.g. ``{"width": 16}``.
        dropout: dropout rate inside the NAFBlocks (the seed's runs used 0.5).
        data: dataset folder; None = the embedded synthetic set (generated on first use).
        blur_dir: ``blur`` or ``blur_gamma`` (GOPRO_Large layout).
        synth_seed / synth_count / synth_shake: which synthetic set when ``data`` is None (``synth_shake`` scales the
            camera shake: 1 = the default set's 4-12 px paths).
        crop_mode: random | center | resize | none.
        crop: crop (or resize) side in pixels; also the TLC training size stored in checkpoints.
        hflip / vflip / transpose: probability of each augmentation.
        batch: global batch per optimizer step (all processes and micro-batches together).
        accum: gradient-accumulation micro-batches per step.
        steps: optimizer steps; ignored when ``epochs`` is set.
        epochs: train for this many passes over the training split instead (steps = ceil(epochs * n / batch)).
        optimizer: adamw | adam.
        lr / lr_min: peak and final learning rate.
        weight_decay / betas: optimizer settings.
        schedule: cosine (per step, official) | cosine_epoch (CosineAnnealingLR stepped per epoch, the seed's) |
            constant.
        warmup: linear warm-up steps.
        loss: psnr (official) | l1 | charbonnier | charfreq (FNAFNet's official Charbonnier + 0.01 * L1 of the
            spectra difference) | l1freq (AdaRevD's official L1 + 0.01 * L1 of the spectra difference, averaged
            over the exit depths).
        init: weights to start from: a checkpoint of the same architecture, or for an AdaRevD model a NAFNet
            checkpoint of its width (its encoder: official ``.pth`` or ``best.pt``) or an AdaRevD one.
        stage: AdaRevD models only: 1 trains the sub-decoders with the encoder frozen (reversible backward,
            ``l1freq``), 2 trains the exit classifier with everything else frozen (cross-entropy on the
            blurry-vs-sharp PSNR class of each crop; ``crop`` at most the tile; ``init`` a stage-1 checkpoint).
        grad_clip: max gradient norm (0 disables).
        amp: auto | bf16 | fp16 | off: autocast of the forward (fp16 CUDA-only); auto = the device's
            measured default (``train.speed.AUTO``: bf16 on CUDA when supported, else fp16; off on CPU).
        channels_last: auto | on | off: NHWC weights and inputs (auto = the device's measured default).
        compile: auto | on | off: ``torch.compile`` the model (auto = the device's measured default).
        reuse_memory: auto | on | off: keep freed CPU memory in the process instead of fresh zeroed pages for
            every large tensor (``nafnet_core.process.keep_freed_memory``; auto: on on CPU, off on CUDA).
        ema: decay of an exponential moving average of the weights (0 = off); validation and best.pt use it.
        val_every: validate every N steps (and at the end).
        val_tlc: validate whole images with TLC (train size = crop).
        val_max: validate at most this many images (0 = all of the val split).
        early_stop: stop after this many validations without a better PSNR (0 = never).
        save_every: write last.pt every N steps (also at every validation and at the end).
        log_every: metrics.csv / progress bar update interval in steps.
        seed: model init, data order and augmentation.
        workers: DataLoader worker processes per rank.
        cache: keep decoded images in memory (auto: on for data sets under 2 GB of pixels).
        tensorboard: TensorBoard event files in the run directory: auto (when the package is installed) | on |
            off.
    """

    model: str = "nafnet-gopro-width32"
    model_args: dict = field(default_factory=dict)
    dropout: float = 0.0
    data: str | None = None
    blur_dir: str = "blur"
    synth_seed: int = 0
    synth_count: int = 24
    synth_shake: float = 1.0
    crop_mode: str = "random"
    crop: int = 256
    hflip: float = 0.5
    vflip: float = 0.5
    transpose: float = 0.5
    batch: int = 32
    accum: int = 1
    steps: int = 200_000
    epochs: float | None = None
    optimizer: str = "adamw"
    lr: float = 1e-3
    lr_min: float = 1e-7
    weight_decay: float = 1e-3
    betas: list = field(default_factory=lambda: [0.9, 0.9])
    schedule: str = "cosine"
    warmup: int = 0
    loss: str = "psnr"
    init: str | None = None
    stage: int = 1
    grad_clip: float = 0.01
    amp: str = "auto"
    channels_last: str = "auto"
    compile: str = "auto"
    reuse_memory: str = "auto"
    ema: float = 0.0
    val_every: int = 20_000
    val_tlc: bool = True
    val_max: int = 0
    early_stop: int = 0
    save_every: int = 5_000
    log_every: int = 200
    seed: int = 0
    workers: int = 4
    cache: str = "auto"
    tensorboard: str = "auto"

    def __post_init__(self) -> None:
        for key in ("channels_last", "compile", "reuse_memory"):  # --set compile=true means "on"
            if isinstance(getattr(self, key), bool):
                setattr(self, key, "on" if getattr(self, key) else "off")
        self.validate()

    def validate(self) -> None:
        _check_types(self)
        choices = {"crop_mode": CROP_MODES, "loss": LOSSES, "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
                   "amp": AMP_MODES, "model": tuple(MODEL_PRESETS), "blur_dir": ("blur", "blur_gamma"),
                   "cache": ("auto", "on", "off"), "tensorboard": TENSORBOARD_MODES,
                   "channels_last": ("auto", "on", "off"), "compile": ("auto", "on", "off"),
                   "reuse_memory": ("auto", "on", "off")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        positive = ("crop", "batch", "accum", "steps", "val_every", "save_every", "log_every", "synth_count")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("hflip", "vflip", "transpose"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key} is a probability in [0, 1], got {getattr(self, key)}")
        if not 0.0 < self.synth_shake <= 4.0:
            raise ConfigError(f"synth_shake must be in (0, 4] (1 = the default camera shake), got {self.synth_shake}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema is a decay in [0, 1) (0 = off), got {self.ema}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        if len(self.betas) != 2:
            raise ConfigError(f"betas must be two numbers, got {self.betas}")
        if self.batch % self.accum:
            raise ConfigError(f"batch {self.batch} must be divisible by accum {self.accum}")
        if self.lr <= 0 or self.lr_min < 0 or self.lr_min > self.lr:
            raise ConfigError(f"need 0 <= lr_min <= lr and lr > 0, got lr={self.lr} lr_min={self.lr_min}")
        if any(v < 0 for v in (self.warmup, self.grad_clip, self.weight_decay, self.early_stop, self.val_max,
                               self.workers)):
            raise ConfigError("warmup, grad_clip, weight_decay, early_stop, val_max and workers must be >= 0")
        try:  # the model options: a bad key or value stops here, before any work, in one line
            get_model_config(self.model, **self.model_args)
        except (KeyError, TypeError, ValueError) as e:
            hint = " (YAML needs a space after each colon: --set 'model_args={width: 16}')" \
                if any(":" in str(k) for k in self.model_args) else ""
            raise ConfigError(f"model_args {self.model_args}: {e.args[0] if e.args else e}{hint}") from None
        self._check_stage()

    def _check_stage(self) -> None:
        model = get_model_config(self.model, **self.model_args)
        if self.stage not in (1, 2):
            raise ConfigError(f"stage must be 1 (AdaRevD sub-decoders) or 2 (AdaRevD classifier), got {self.stage}")
        if self.stage == 2 and (model.decoder != "adarevd" or not model.exits):
            raise ConfigError(f"stage 2 trains an AdaRevD exit classifier; model {self.model!r} has none")
        if self.stage == 2 and self.crop > model.tile:
            raise ConfigError(f"stage 2 labels each crop as one tile: crop {self.crop} must be at most the tile "
                              f"({model.tile})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {', '.join(sorted(known))}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def _check_types(cfg: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        hint = hints[f.name]
        is_union = typing.get_origin(hint) in (typing.Union, __import__("types").UnionType)
        allowed = typing.get_args(hint) if is_union else (hint,)
        ok = False
        for t in allowed:
            if t is type(None):
                ok |= value is None
            elif t is float:
                ok |= isinstance(value, (int, float)) and not isinstance(value, bool)
            elif t is int:
                ok |= isinstance(value, int) and not isinstance(value, bool)
            else:
                ok |= isinstance(value, t)
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ConfigError(f"{f.name} must be {names}, got {value!r}")
        if isinstance(value, int) and not isinstance(value, bool) and float in allowed and int not in allowed:
            setattr(cfg, f.name, float(value))


# Named presets: overrides on top of the defaults (= the official GoPro recipe).
PRESETS: dict[str, dict[str, Any]] = {
    # Official NAFNet-GoPro-width32 / width64 recipe (docs/DESIGN.md §5 (Training)).
    "gopro": {},
    "gopro-width64": {"model": "nafnet-gopro-width64"},
    # The original experiments (seed): resize to 256, Adam, dropout 0.5, flips 0.5, batch 8,
    # CosineAnnealingLR per epoch, early stopping.
    "seed": {"model": "seed-v1", "crop_mode": "resize", "crop": 256, "dropout": 0.5, "optimizer": "adam",
             "weight_decay": 0.0, "betas": [0.9, 0.999], "lr": 1e-3, "lr_min": 1e-7, "batch": 8, "epochs": 50,
             "schedule": "cosine_epoch", "grad_clip": 0.0, "early_stop": 5, "val_every": 263},
    # FNAFNet's official GoPro recipe (INVOKERer/DeepRFT AAAI2023, FNAFNet-width32-freqloss-4gpu.yml): the
    # NAFNet recipe (AdamW 1e-3, wd 1e-3, betas 0.9/0.9, cosine to 1e-7 over 200k, batch 32, 256 crops) with
    # the Charbonnier + frequency loss.
    "fnafnet-gopro": {"model": "fnafnet-gopro-width32", "loss": "charfreq"},
    "fnafnet-gopro-width64": {"model": "fnafnet-gopro-width64", "loss": "charfreq"},
    # CascadedGaze GoPro (Ascend-Research/CascadedGaze options/train/GoPro/CascadedGazeMH-GoPro.yml): the NAFNet
    # recipe with batch 64 (8 GPUs x 8) over 400k iterations, validation every 10k; the PSNR loss on the best
    # of the 10 outputs (MultiHeadPSNRLoss), the deployment head chosen at every validation.
    "cgnet-gopro": {"model": "cgnet-gopro", "batch": 64, "steps": 400_000, "val_every": 10_000},
    # Tests: the tiny model on the embedded synthetic set; about 90 s on 2 CPU cores.
    "tiny": {"model": "tiny", "crop": 64, "batch": 8, "steps": 1000, "lr": 4e-3, "val_every": 250,
             "save_every": 250, "log_every": 10, "workers": 0},
    # AdaRevD-B on the NAFNet-width64 encoder, stage 1 (INVOKERer/AdaRevD GoPro-AdaRevIDB-pretrain-4gpu.yml):
    # the sub-decoders train with the encoder frozen (init: NAFNet-GoPro-width64.pth), batch 16 of 256 crops,
    # AdamW 1e-3, wd 1e-3, betas 0.9/0.9, cosine to 1e-7 over 200k, EMA 0.999, L1 + frequency loss.
    "adarevd-b-naf": {"model": "adarevd-b-naf", "loss": "l1freq", "batch": 16, "ema": 0.999},
    # AdaRevD-B stage 2 (GoPro-AdaRevIDB-classify-4gpu.yml): the classifier on 384 crops, batch 16, AdamW 3e-4,
    # wd 3e-4, 10k iterations, EMA 0.999; init: the stage-1 best.pt.
    "adarevd-b-naf-classifier": {"model": "adarevd-b-naf", "stage": 2, "crop": 384, "batch": 16, "steps": 10_000,
                                 "lr": 3e-4, "weight_decay": 3e-4, "ema": 0.999, "val_every": 2_000},
    # Tests and demos of AdaRevD: tiny-adarevd with the tiny recipe and the AdaRevD loss; then its classifier.
    "tiny-adarevd-classifier": {"model": "tiny-adarevd", "stage": 2, "crop": 64, "batch": 8, "steps": 200,
                                "lr": 1e-3, "val_every": 100, "save_every": 100, "log_every": 10, "workers": 0},
    "tiny-adarevd": {"model": "tiny-adarevd", "loss": "l1freq", "crop": 64, "batch": 8, "steps": 1000, "lr": 4e-3,
                     "val_every": 250, "save_every": 250, "log_every": 10, "workers": 0},
    # Tests and demos of the CascadedGaze family: tiny-cg with the tiny recipe.
    "tiny-cg": {"model": "tiny-cg", "crop": 64, "batch": 8, "steps": 1000, "lr": 4e-3, "val_every": 250,
                "save_every": 250, "log_every": 10, "workers": 0},
    # `python cli.py demo`: the best recipe measured within the demo's CPU budget (BENCHMARKS.md, "Demo" and
    # "Training recipes at the demo's budget"): 1000 steps keep the whole demo under 4 minutes on 2 cores;
    # widths 12-32, batch, crop, losses, FFT blocks and training photo sets compared at equal time did not
    # beat this recipe beyond the spread of the 4 test images.
    # Kept apart from `tiny` so that tuning it leaves the tests alone.
    "demo": {"model": "tiny", "crop": 64, "batch": 8, "steps": 1000, "lr": 4e-3, "loss": "l1", "val_every": 400,
             "save_every": 400, "log_every": 10, "workers": 0},
    # Input FFT (input_fft="fs"): the tiny recipe on the tiny model with the frequency-selection input.
    "tiny-fft": {"model": "tiny-fft", "crop": 64, "batch": 8, "steps": 1000, "lr": 4e-3, "val_every": 250,
                 "save_every": 250, "log_every": 10, "workers": 0},
}


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalars/lists/mappings (``1e-3``, ``true``, ``null``, ``[0.9, 0.99]``)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text  # YAML 1.1 reads on/off/yes/no as booleans: --set cache=off means the string "off"
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string; numbers should be numbers
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def parse_sets(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def build_config(preset: str | None = "gopro", file: str | Path | None = None, sets: dict[str, Any] | None = None,
                 base: dict[str, Any] | None = None) -> TrainConfig:
    """preset (or ``base``, e.g. a resumed run's config) -> file -> sets."""
    if base is not None:
        merged = TrainConfig().to_dict() | dict(base)  # a run saved before a key existed gets its default
    else:
        if preset not in PRESETS:
            raise ConfigError(f"unknown training preset {preset!r}; choose one of {', '.join(PRESETS)}")
        merged = TrainConfig().to_dict() | PRESETS[preset]
    if file is not None:
        merged |= load_config_file(file)
    if sets:
        known = set(merged) | {f.name for f in dataclasses.fields(TrainConfig)}  # a resumed run may predate a key
        unknown = sorted(set(sets) - known)
        if unknown:
            raise ConfigError(f"--set: unknown key(s) {unknown}; known keys: {', '.join(sorted(known))}")
        merged |= sets
    return TrainConfig.from_dict(merged, where=str(file) if file and not sets else "config")
