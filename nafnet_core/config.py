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
#: Block kinds of the one model family: NAFNet's block, FNAFNet's (windowed SCA + windowed FFT branches),
#: CascadedGaze's (global-context cascade in the first block of each encoder level).
BLOCKS = ("naf", "fnaf", "cg")
#: What is concatenated to the input image before ``intro``: nothing, or the frequency-selection image.
INPUT_FFTS = ("none", "fs")
#: Decoder kinds: NAFNet's U (``unet``), or AdaRevD's reversible sub-decoders with exits chosen per tile
#: (``adarevd``, :mod:`nafnet_core.adarevd`).
DECODERS = ("unet", "adarevd")
#: How AdaRevD's tiles are blended: the official ramps, normalised by their sum (``normalized``), or exactly
#: the official weights (``official``; they attenuate the first rows of a one-tile side and overweight some
#: sizes, see :mod:`nafnet_core.adarevd`).
BLENDS = ("normalized", "official")

#: Input sides are padded to a multiple of 2 ** (encoder levels); every preset has four levels. The one
#: model's own multiple is :attr:`ModelConfig.pad_multiple` (a runner reads it from the model, the ONNX
#: metadata or the export manifest); this is only the default where no model says otherwise.
DEFAULT_PAD_MULTIPLE = 16
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
        block: block kind, one of :data:`BLOCKS` (``naf`` is NAFNet).
        input_fft: ``none``, or ``fs``: the frequency-selection image is concatenated to the input
            (``intro`` reads ``2 * img_channel`` channels; the global residual stays on the image).
        sca_windows: ``fnaf`` only: SCA pooled per window of this size, one entry per encoder level and
            one for the middle (decoders use their encoder level's); empty = global pooling.
        fft_windows: ``fnaf`` only: window of the FFT branches, same layout; -1 = no FFT branch at that
            level, 0 = the whole map.
        heads: output heads (``cg``): the ending conv gives ``heads`` images, combined pairwise into
            ``heads * (heads + 1) // 2`` outputs; 1 = a single output as in NAFNet.
        decoder: ``unet`` (NAFNet's decoders and ending) or ``adarevd`` (the NAFNet encoder, ``sub_decoders``
            reversible sub-decoders of ``dec_blk_nums`` blocks per level, one output head each, tiles).
        sub_decoders: ``adarevd`` only: number of sub-decoders K (the deepest exit).
        exits: ``adarevd`` only: the exit table, class of the exit classifier -> depth (0..K); empty = no
            classifier, every tile runs all K sub-decoders.
        tile: ``adarevd`` only: tile side at full resolution (the official 384), a multiple of the pad multiple.
        tile_overlap: ``adarevd`` only: overlap of neighbouring tiles (the official 32), same multiple.
        blend: ``adarevd`` only: one of :data:`BLENDS`.
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
    block: str = "naf"
    input_fft: str = "none"
    sca_windows: tuple[int, ...] = ()
    fft_windows: tuple[int, ...] = ()
    heads: int = 1
    decoder: str = "unet"
    sub_decoders: int = 0
    exits: tuple[int, ...] = ()
    tile: int = 0
    tile_overlap: int = 0
    blend: str = "normalized"

    def __post_init__(self) -> None:
        # Lists from JSON/YAML become tuples so configs hash and compare by value.
        object.__setattr__(self, "enc_blk_nums", tuple(self.enc_blk_nums))
        object.__setattr__(self, "dec_blk_nums", tuple(self.dec_blk_nums))
        object.__setattr__(self, "sca_windows", tuple(self.sca_windows))
        object.__setattr__(self, "fft_windows", tuple(self.fft_windows))
        object.__setattr__(self, "exits", tuple(self.exits))
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
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {', '.join(BLOCKS)}; got {self.block!r}")
        if self.input_fft not in INPUT_FFTS:
            raise ValueError(f"input_fft must be one of {', '.join(INPUT_FFTS)}; got {self.input_fft!r}")
        n_sites = len(self.enc_blk_nums) + 1
        for name in ("sca_windows", "fft_windows"):
            value = getattr(self, name)
            if value and self.block != "fnaf":
                raise ValueError(f"{name} is an option of block 'fnaf' only (block is {self.block!r})")
            if value and len(value) != n_sites:
                raise ValueError(f"{name} needs one entry per encoder level plus one for the middle "
                                 f"({n_sites}), got {list(value)}")
        if any(w < 1 for w in self.sca_windows) or any(w < -1 for w in self.fft_windows):
            raise ValueError(f"sca_windows must be >= 1 and fft_windows >= -1, got {list(self.sca_windows)}, "
                             f"{list(self.fft_windows)}")
        if self.heads < 1:
            raise ValueError(f"heads must be >= 1, got {self.heads}")
        self._check_decoder()

    def _check_decoder(self) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}; got {self.decoder!r}")
        if self.blend not in BLENDS:
            raise ValueError(f"blend must be one of {', '.join(BLENDS)}; got {self.blend!r}")
        if self.decoder == "unet":
            if self.sub_decoders or self.exits or self.tile or self.tile_overlap:
                raise ValueError("sub_decoders, exits, tile and tile_overlap are options of decoder 'adarevd' only")
            return
        m = self.pad_multiple
        if len(self.enc_blk_nums) != 4 or self.block != "naf" or self.input_fft != "none" or self.heads != 1:
            raise ValueError("decoder 'adarevd' needs a four-level NAFNet encoder (block 'naf', input_fft 'none', "
                             "heads 1)")
        if self.sub_decoders < 1:
            raise ValueError(f"decoder 'adarevd' needs sub_decoders >= 1, got {self.sub_decoders}")
        if any(not 0 <= d <= self.sub_decoders for d in self.exits):
            raise ValueError(f"exits must be depths in 0..{self.sub_decoders} (sub_decoders), got {list(self.exits)}")
        if self.tile < m or self.tile % m or self.tile_overlap < m or self.tile_overlap % m \
                or self.tile_overlap >= self.tile:
            raise ValueError(f"tile and tile_overlap must be multiples of {m} with 0 < tile_overlap < tile, got "
                             f"tile={self.tile}, tile_overlap={self.tile_overlap}")
    @property
    def pad_multiple(self) -> int:
        """Input sides are zero-padded to a multiple of this (2 ** number of levels)."""
        return 2 ** len(self.enc_blk_nums)

    @property
    def min_side(self) -> int:
        """Smallest padded input side every window fits in: the largest ``fnaf`` window (SCA or FFT) times its
        level's downscale 2 ** level (the middle: 2 ** number of levels); 1 without windows."""
        levels = len(self.enc_blk_nums)
        sides = [w << min(i, levels) for windows in (self.sca_windows, self.fft_windows)
                 for i, w in enumerate(windows) if w > 0]
        return max(sides, default=1)

    @property
    def n_outputs(self) -> int:
        """Images the model can return: the pairwise head combinations (1 for a single head)."""
        return self.heads * (self.heads + 1) // 2

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in _TUPLE_FIELDS:
            d[name] = list(getattr(self, name))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """The config from :meth:`to_dict`'s output; keys added later take their defaults (older checkpoints)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


_TUPLE_FIELDS = ("enc_blk_nums", "dec_blk_nums", "sca_windows", "fft_windows", "exits")


def _check_types(cfg: ModelConfig) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in _TUPLE_FIELDS:
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
    "nafnet-gopro-width32": ModelConfig(width=32, enc_blk_nums=(1, 1, 1, 28), middle_blk_num=1,
                                        dec_blk_nums=(1, 1, 1, 1)),
    "nafnet-gopro-width64": ModelConfig(width=64, enc_blk_nums=(1, 1, 1, 28), middle_blk_num=1,
                                        dec_blk_nums=(1, 1, 1, 1)),
    # The seed experiments' variants.
    "seed-v1": ModelConfig(width=32, enc_blk_nums=(1, 1, 1, 1), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1)),
    "seed-v3": ModelConfig(width=32, enc_blk_nums=(2, 2, 4, 8), middle_blk_num=12, dec_blk_nums=(2, 2, 2, 2)),
    # Small enough to train in minutes on 2 CPU cores; keeps 4 levels so padding to 16 is exercised.
    "tiny": ModelConfig(width=8, enc_blk_nums=(1, 1, 1, 1), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1)),
    # FNAFNet (INVOKERer/DeepRFT branch AAAI2023, FNAFNet_arch.py and its GoPro options): windowed SCA, windowed
    # FFT branches; windows per encoder level, then the middle's (-1: no FFT branch).
    "fnafnet-gopro-width32": ModelConfig(width=32, enc_blk_nums=(1, 1, 1, 28), middle_blk_num=1,
                                         dec_blk_nums=(1, 1, 1, 1), block="fnaf", sca_windows=(64, 32, 16, 8, 8),
                                         fft_windows=(64, 32, 16, -1, -1)),
    "fnafnet-gopro-width64": ModelConfig(width=64, enc_blk_nums=(1, 1, 1, 28), middle_blk_num=1,
                                         dec_blk_nums=(1, 1, 1, 1), block="fnaf", sca_windows=(64, 32, 16, 8, 8),
                                         fft_windows=(64, -1, -1, -1, -1)),
    # Tests: windows that do not divide the padded maps (edge windows at every level), odd windows, an FFT
    # over the whole map (0) and a level without FFT (-1).
    "tiny-fnaf": ModelConfig(width=8, enc_blk_nums=(1, 1, 1, 1), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1),
                             block="fnaf", sca_windows=(24, 12, 6, 3, 3), fft_windows=(24, 0, 6, -1, 3)),
    # CascadedGaze (Ascend-Research/CascadedGaze options/*/GoPro/CascadedGazeMH-GoPro.yml: GCENetMH, 4 heads
    # combined pairwise into 10 outputs); tiny-cg for tests and demos.
    "cgnet-gopro": ModelConfig(width=62, enc_blk_nums=(1, 1, 1, 27), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1),
                               block="cg", heads=4),
    "tiny-cg": ModelConfig(width=8, enc_blk_nums=(1, 1, 1, 1), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1),
                           block="cg", heads=4),
    # Input FFT (input_fft="fs"): the frequency-selection image concatenated to the input (intro 6 -> width).
    "seed-v3-fft": ModelConfig(width=32, enc_blk_nums=(2, 2, 4, 8), middle_blk_num=12, dec_blk_nums=(2, 2, 2, 2),
                               input_fft="fs"),
    "tiny-fft": ModelConfig(width=8, enc_blk_nums=(1, 1, 1, 1), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1),
                            input_fft="fs"),
    # AdaRevD with the NAFNet encoder (INVOKERer/AdaRevD Options/GoPro-AdaRevIDB-pretrain-8gpu.yml and
    # AdaRevID-B-GoPro-test.yml): the NAFNet-GoPro-width64 encoder, 4 sub-decoders, the e3 exit classifier with
    # the table [4, 4, 3, 3, 2, 1], 384-px tiles overlapping by 32. -s: 2 sub-decoders, no classifier.
    "adarevd-b-naf": ModelConfig(width=64, enc_blk_nums=(1, 1, 1, 28), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1),
                                 decoder="adarevd", sub_decoders=4, exits=(4, 4, 3, 3, 2, 1), tile=384,
                                 tile_overlap=32),
    "adarevd-s-naf": ModelConfig(width=64, enc_blk_nums=(1, 1, 1, 28), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1),
                                 decoder="adarevd", sub_decoders=2, tile=384, tile_overlap=32),
    # Tests and demos: 3 sub-decoders, an exit table with every depth (0 = the input unchanged), 64-px tiles.
    "tiny-adarevd": ModelConfig(width=8, enc_blk_nums=(1, 1, 1, 1), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1),
                                decoder="adarevd", sub_decoders=3, exits=(3, 3, 2, 1, 0), tile=64, tile_overlap=16),
}

#: Parameter counts of the presets (docs/DESIGN.md §3 (The model)); the tests assert them.
PRESET_PARAMS = {
    "nafnet-gopro-width32": 17_111_907,
    "nafnet-gopro-width64": 67_888_835,
    "seed-v1": 4_497_507,
    "seed-v3": 29_159_715,
    # FNAFNet: 16 c^2 + 12 c more per block with FFT branches.
    "fnafnet-gopro-width32": 17_805_411,
    "fnafnet-gopro-width64": 68_021_443,
    # CascadedGaze
    "cgnet-gopro": 68_766_134,
    # Input FFT: the intro conv reads 3 more channels (3 * width * 9 more weights).
    "seed-v3-fft": 29_160_579,
    "tiny-fft": 290_931,
    # AdaRevD: encoder 62,635,008 + 4 x 17,100,227 per sub-decoder with its head + classifier 10,001,932.
    "adarevd-b-naf": 141_037_848,
    "adarevd-s-naf": 96_835_462,
    "tiny-adarevd": 1_183_355,
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
    "BLOCKS",
    "INPUT_FFTS",
    "DECODERS",
    "BLENDS",
    "DEFAULT_TRAIN_SIZE",
    "DEFAULT_BASE_RATIO",
    "ModelConfig",
    "PRESETS",
    "PRESET_PARAMS",
    "get_config",
    "find_preset",
]


def padded_size(size: int, multiple: int = DEFAULT_PAD_MULTIPLE) -> int:
    """``size`` rounded up to a multiple of ``multiple`` (the model's input padding)."""
    return -(-size // multiple) * multiple


def pad_multiple_of(config: dict | None) -> int:
    """The padding multiple of a model config given as a dict (a manifest's or an ONNX graph's metadata);
    the default for ``None`` or a dict without encoder levels."""
    if not isinstance(config, dict) or not config.get("enc_blk_nums"):
        return DEFAULT_PAD_MULTIPLE
    return 2 ** len(config["enc_blk_nums"])

