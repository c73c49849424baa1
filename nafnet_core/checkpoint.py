"""Checkpoints: the project format, the official ``{'params': ...}`` .pth files, and safetensors.

Project format (a ``torch.save`` of plain containers and tensors, readable with
``weights_only=True``)::

    {"format": "nafnet-deblurring", "version": 1,
     "config": {...ModelConfig...}, "preset": "tiny" | None, "train_size": 256,
     "head": 0,                               # the deployment head of a multi-head model (NAFNet.head)
     "state_dict": {...}, "extra": {...}}     # extra: step, optimizer, RNG states, metrics...

Files written before ``head`` existed, and official files, load with head 0.

Every read goes through :func:`read_checkpoint`, which never unpickles arbitrary objects
and turns every failure into one :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import DEFAULT_TRAIN_SIZE, PRESETS, ModelConfig, find_preset, get_config
from .errors import UserError, first_line
from .family import build_model, model_classes
from .fileio import atomic_path
from .model import NAFNet

FORMAT = "nafnet-deblurring"
VERSION = 1
OFFICIAL_KEYS = ("params", "params_ema")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns.

    Attributes:
        model: the NAFNet in eval mode on CPU (global pooling; apply ``convert_to_tlc`` for TLC), with the
            stored deployment head (``model.head``; 0 for official files).
        config: its architecture.
        preset: the preset name when the config equals one.
        train_size: crop size it was trained on (sets the TLC kernels).
        source: ``project``, ``official`` or ``safetensors``.
        extra: everything else stored with it (training state, metrics...).
        path: the file it came from.
    """

    model: NAFNet
    config: ModelConfig
    preset: str | None
    train_size: int
    source: str
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel / torch.compile wrappers keep the real module inside.
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path: str | Path, model: nn.Module, *, preset: str | None = None,
                    train_size: int = DEFAULT_TRAIN_SIZE, **extra: Any) -> Path:
    """Atomically writes ``model`` (config + weights) and ``extra`` to ``path``.

    A ``.safetensors`` path stores the weights with the config in its metadata (``extra`` must then be
    JSON-serialisable); any other suffix uses the project's torch format.
    """
    model = _unwrap(model)
    if not isinstance(model, model_classes()):
        raise TypeError(f"save_checkpoint expects a NAFNet, got {type(model).__name__}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    preset = preset or find_preset(model.config)
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(model.config.to_dict()),
                "preset": preset or "", "train_size": str(train_size), "head": str(model.head),
                "extra": json.dumps(extra)}
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
        return path
    payload = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(), "preset": preset,
               "train_size": int(train_size), "head": model.head, "state_dict": state, "extra": extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw contents of a checkpoint file, read safely (``weights_only=True`` or safetensors)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file (.pt, .pth or .safetensors)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes); re-download or re-save the checkpoint")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = first_line(str(e), 10_000)
        # Every weights-only failure mentions `weights_only`; only a pickled global (a class or function
        # reference, what a code-running pickle needs) is a refusal; anything else is a broken file.
        if "GLOBAL" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: refused to load: it contains pickled Python objects, which could run code "
                "(only tensors and plain containers are accepted). Re-save it with save_checkpoint from a "
                "trusted environment."
            ) from None
        detail = next((line.strip() for line in str(e).splitlines() if line.strip().startswith("Unsupported")),
                      "not a pickle of tensors" if "Weights only" in first else first)
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt, truncated or another format): "
                              f"{detail[:200]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, UnicodeDecodeError, MemoryError) as e:
        first = first_line(e, 10_000)
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt, truncated or another format): "
                              f"{first[:200]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a NAFNet checkpoint (holds a {type(obj).__name__}, expected a dict)")
    return obj


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (corrupt or truncated): {e}") from None
    try:
        config = json.loads(meta["config"]) if "config" in meta else None
        extra = json.loads(meta.get("extra", "{}"))
        train_size = int(meta.get("train_size", DEFAULT_TRAIN_SIZE))
        head = int(meta.get("head", 0))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable metadata: {e}") from None
    if config is None:  # bare weights: treat like an official state dict
        return {"params": state}
    return {"format": FORMAT, "version": VERSION, "config": config, "preset": meta.get("preset") or None,
            "train_size": train_size, "head": head, "state_dict": state, "extra": extra, "_source": "safetensors"}


def infer_config(state_dict: dict[str, torch.Tensor]) -> ModelConfig | None:
    """The architecture a NAFNet state dict has, from its keys and shapes (gate and dropout excepted)."""
    try:
        width, in_channels = state_dict["intro.weight"].shape[:2]
        # intro reading twice the channels ending writes: the image and its frequency-selection image
        fs = in_channels == 2 * state_dict["ending.weight"].shape[0]
        img_channel, input_fft = (in_channels // 2, "fs") if fs else (in_channels, "none")
        n_levels = sum(1 for k in state_dict if k.startswith("downs.") and k.endswith(".weight"))
        enc, dec, middle = [0] * n_levels, [0] * n_levels, 0
        for k in state_dict:
            parts = k.split(".")
            if parts[0] in ("encoders", "decoders") and parts[1].isdigit() and parts[2].isdigit():
                counts = enc if parts[0] == "encoders" else dec
                counts[int(parts[1])] = max(counts[int(parts[1])], int(parts[2]) + 1)
            elif parts[0] == "middle_blks" and parts[1].isdigit():
                middle = max(middle, int(parts[1]) + 1)
        block = next(k for k in state_dict if k.endswith("conv1.weight"))[: -len("conv1.weight")]
        c = state_dict[block + "norm1.weight"].shape[0]
        return ModelConfig(width=int(width), img_channel=int(img_channel), input_fft=input_fft, enc_blk_nums=tuple(enc),
                           middle_blk_num=middle, dec_blk_nums=tuple(dec),
                           dw_expand=int(state_dict[block + "conv1.weight"].shape[0] // c),
                           ffn_expand=int(state_dict[block + "conv4.weight"].shape[0] // c))
    except (KeyError, StopIteration, ValueError, IndexError, AttributeError, TypeError):
        return None


def _shape_match(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> bool:
    with torch.device("meta"):
        ref = build_model(config).state_dict()
    return set(ref) == set(state_dict) and all(tuple(ref[k].shape) == tuple(state_dict[k].shape) for k in ref)


def _suggest(state_dict: dict[str, torch.Tensor]) -> str:
    inferred = infer_config(state_dict)
    matches = [name for name, cfg in PRESETS.items() if _shape_match(cfg, state_dict)]
    if matches:
        return f"its shapes match preset {' / '.join(repr(m) for m in matches)}"
    if inferred is not None and _shape_match(inferred, state_dict):
        cfg = inferred
        return (f"its shapes match no preset but fit width={cfg.width}, enc_blk_nums={list(cfg.enc_blk_nums)}, "
                f"middle_blk_num={cfg.middle_blk_num}, dec_blk_nums={list(cfg.dec_blk_nums)}"
                + (", input_fft='fs'" if cfg.input_fft == "fs" else ""))
    return "its shapes match no preset"


def _load_state(model: NAFNet, state_dict: dict[str, Any], path: Path, what: str) -> None:
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: the weights are not all tensors; not a NAFNet checkpoint")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if wrong:
            parts.append("shape mismatch: " + show([f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
                                                    for k in wrong]))
        raise CheckpointError(f"{path}: weights do not fit {what}; " + "; ".join(parts)
                              + f". Hint: {_suggest(state_dict)}.")
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint(path: str | Path, preset: str | None = None, **overrides: Any) -> LoadedCheckpoint:
    """Loads a project checkpoint, an official ``{'params': state_dict}`` .pth (needs ``preset``) or safetensors.

    Args:
        path: the file.
        preset: for official files, the preset whose architecture they hold (e.g. ``nafnet-gopro-width32``).
            For project files it must agree with the stored config if given.
        overrides: model options merged on the preset (official files only), e.g. ``gate="swiglu"``.
    """
    path = Path(path)
    obj = read_checkpoint(path)
    if obj.get("format") == FORMAT:
        try:
            config = ModelConfig.from_dict(obj["config"])
            train_size = int(obj.get("train_size", DEFAULT_TRAIN_SIZE))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: invalid model config in checkpoint: {e}") from None
        if preset is not None:
            wanted = get_config(preset, **overrides)
            if wanted != config:
                raise CheckpointError(f"{path}: stores a different architecture than preset {preset!r}; "
                                      f"drop --preset (the checkpoint carries its own config)")
        model = build_model(config)
        state = obj.get("state_dict")
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: no state_dict in checkpoint")
        _load_state(model, state, path, "its own stored config")
        try:
            model.head = obj.get("head", 0)
        except ValueError as e:
            raise CheckpointError(f"{path}: invalid deployment head: {e}") from None
        extra = obj.get("extra") or {}
        source = obj.get("_source", "project")
        name = obj.get("preset") or find_preset(config)
    else:
        key = next((k for k in OFFICIAL_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            if obj and all(isinstance(v, torch.Tensor) for v in obj.values()) and (
                    "intro.weight" in obj or "encoder.intro.weight" in obj):
                state = obj  # a bare state dict
            else:
                raise CheckpointError(
                    f"{path}: not a NAFNet checkpoint (top-level keys: {sorted(map(str, obj))[:8]}); expected a file "
                    "written by this project or an official {'params': state_dict} .pth")
        else:
            state = obj[key]
        if preset is None:
            raise CheckpointError(f"{path}: an official-format checkpoint holds no config; pass --preset "
                                  f"({_suggest(state)})")
        try:
            config = get_config(preset, **overrides)
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: {e}") from None
        model = build_model(config)
        _load_state(model, state, path, f"preset {preset!r}")
        train_size, extra, source, name = DEFAULT_TRAIN_SIZE, {}, "official", preset
    model.eval()
    return LoadedCheckpoint(model=model, config=config, preset=name, train_size=train_size, source=source,
                            extra=extra, path=path)


def save_official(path: str | Path, model: nn.Module) -> Path:
    """Writes ``{'params': state_dict}`` exactly like the official NAFNet releases (for tests and interop)."""
    model = _unwrap(model)
    with atomic_path(path) as tmp:
        torch.save({"params": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, tmp)
    return Path(path)


def load_encoder(model: nn.Module, path: str | Path) -> None:
    """Loads an AdaRevD model's encoder (intro, encoders, downs, middle) from a NAFNet checkpoint of the same
    width and encoder: an official ``{'params': ...}`` .pth or a project file (its decoders and ending are
    not used). Raises :class:`CheckpointError` naming the file when the encoder weights do not fit."""
    path = Path(path)
    obj = read_checkpoint(path)
    if obj.get("format") == FORMAT:
        state = obj.get("state_dict")
    else:
        state = next((obj[k] for k in OFFICIAL_KEYS if isinstance(obj.get(k), dict)), obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no NAFNet weights found; expected a project checkpoint or an official "
                              "{'params': state_dict} .pth")
    parts = ("intro.", "encoders.", "downs.", "middle_blks.")
    encoder_state = {k: v for k, v in state.items() if k.startswith(parts)}
    if not encoder_state and any(k.startswith("encoder.") for k in state):  # an AdaRevD checkpoint
        encoder_state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    _load_state(model.encoder, encoder_state, path, "the AdaRevD encoder (a NAFNet of the same width and "
                f"encoder: width {model.config.width}, enc_blk_nums {list(model.config.enc_blk_nums)}, "
                f"middle_blk_num {model.config.middle_blk_num})")
