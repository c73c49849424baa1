"""Model configuration: one dataclass and one table of named presets.

Presets are data (like nanoGPT's ``from_pretrained`` table): a name maps to a
:class:`ModelConfig`. Overrides are merged on top and checked against the
field types, so ``create_model("tiny", width=16)`` works and
``create_model("tiny", width="16")`` fails with a clear message.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

GATES = ("simple", "reglu", "geglu", "swiglu")

#: Training crop size the official GoPro models (and TLC) assume.
DEFAULT_TRAIN_SIZE = 256
#: TLC window = feature size at training time x BASE_RATIO (official: 1.5).
DEFAULT_BASE_RATIO = 1.5


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one NAFNet.

    Args:
        width: channels after the intro conv (doubles at every encoder level).
        enc_blk_nums: NAFBlocks per encoder level; its length is the number of levels.
        middle_blk_num: NAFBlocks at the bottleneck.
        dec_blk_nums: NAFBlocks per decoder level (same length as ``enc_blk_nums``).
        img_channel: image channels in and out.
        dw_expand: channel expansion of the depthwise branch.
        ffn_expand: channel expansion of the feed-forward branch.
        drop_out_rate: dropout after conv3 and conv5 (0 disables it).
        gate: ``simple`` (a*b), ``reglu`` (relu(a)*b), ``geglu`` (gelu(a)*b), ``swiglu`` (silu(a)*b).
    """

    width: int = 32
    enc_blk_nums: tuple[int, ...] = (1, 1, 1, 28)
    middle_blk_num: int = 1
    dec_blk_nums: tuple[int, ...] = (1, 1, 1, 1)
    img_channel: int = 3
    dw_expand: int = 2
    ffn_expand: int = 2
    drop_out_rate: float = 0.0
    gate: str = "simple"

    def __post_init__(self) -> None:
        # Lists from JSON/YAML become tuples so configs hash and compare by value.
        object.__setattr__(self, "enc_blk_nums", tuple(self.enc_blk_nums))
        object.__setattr__(self, "dec_blk_nums", tuple(self.dec_blk_nums))
        _check_types(self)
        if self.width < 1 or self.img_channel < 1:
            raise ValueError(f"width and img_channel must be positive, got {self.width}, {self.img_channel}")
        if len(self.enc_blk_nums) != len(self.dec_blk_nums):
            raise ValueError(
                f"enc_blk_nums {list(self.enc_blk_nums)} and dec_blk_nums {list(self.dec_blk_nums)} "
                "must have the same length (one decoder level per encoder level)"
            )
        if any(n < 0 for n in (*self.enc_blk_nums, *self.dec_blk_nums, self.middle_blk_num)):
            raise ValueError("block counts must be >= 0")
        if self.dw_expand < 1 or self.ffn_expand < 1:
            raise ValueError("dw_expand and ffn_expand must be >= 1")
        if not 0.0 <= self.drop_out_rate < 1.0:
            raise ValueError(f"drop_out_rate must be in [0, 1), got {self.drop_out_rate}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}; got {self.gate!r}")

    @property
    def pad_multiple(self) -> int:
        """Input sides are zero-padded to a multiple of this (2 ** number of levels)."""
        return 2 ** len(self.enc_blk_nums)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["enc_blk_nums"] = list(self.enc_blk_nums)
        d["dec_blk_nums"] = list(self.dec_blk_nums)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


def _check_types(cfg: ModelConfig) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("enc_blk_nums", "dec_blk_nums"):
            ok = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            expected = "a list of integers"
        elif f.type in ("int", int):
            ok = isinstance(value, int) and not isinstance(value, bool)
            expected = "an integer"
        elif f.type in ("float", float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            expected = "a number"
        else:
            ok = isinstance(value, str)
            expected = "a string"
        if not ok:
            raise TypeError(f"model config {f.name!r} must be {expected}, got {value!r}")


# The table of presets. Parameter counts are asserted exactly in tests.
PRESETS: dict[str, ModelConfig] = {
    # Official NAFNet-GoPro models (megvii-research/NAFNet options/test/GoPro/*.yml).
    "nafnet-gopro-width32": ModelConfig(width=32, enc_blk_nums=(1, 1, 1, 28), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1)),
    "nafnet-gopro-width64": ModelConfig(width=64, enc_blk_nums=(1, 1, 1, 28), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1)),
    # The seed experiments' variants.
    "seed-v1": ModelConfig(width=32, enc_blk_nums=(1, 1, 1, 1), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1)),
    "seed-v3": ModelConfig(width=32, enc_blk_nums=(2, 2, 4, 8), middle_blk_num=12, dec_blk_nums=(2, 2, 2, 2)),
    # Small enough to train in minutes on 2 CPU cores; keeps 4 levels so padding to 16 is exercised.
    "tiny": ModelConfig(width=8, enc_blk_nums=(1, 1, 1, 1), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1)),
}

#: Parameter counts of the presets (DESIGN.md §2); the tests assert them.
PRESET_PARAMS = {
    "nafnet-gopro-width32": 17_111_907,
    "nafnet-gopro-width64": 67_888_835,
    "seed-v1": 4_497_507,
    "seed-v3": 29_159_715,
}


def get_config(preset: str = "nafnet-gopro-width32", **overrides: Any) -> ModelConfig:
    """The preset's config with ``overrides`` merged on top (types checked)."""
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    base = PRESETS[preset].to_dict()
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; known options: {sorted(base)}")
    base.update(overrides)
    return ModelConfig.from_dict(base)


def find_preset(cfg: ModelConfig) -> str | None:
    """Name of the preset equal to ``cfg``, if any."""
    for name, preset in PRESETS.items():
        if preset == cfg:
            return name
    return None


__all__ = [
    "GATES",
    "DEFAULT_TRAIN_SIZE",
    "DEFAULT_BASE_RATIO",
    "ModelConfig",
    "PRESETS",
    "PRESET_PARAMS",
    "get_config",
    "find_preset",
]
