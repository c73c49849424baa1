"""Input shapes of exported graphs: a fixed tile or dynamic batch/height/width. Pure functions, unit-tested.

Default tile 512x512 (measured in BENCHMARKS.md, "Export"): it is the smallest square tile that
holds the level-0 TLC window of a 256-trained model (384 px) with margin for the tile overlap, and
its onnxruntime CPU cost per pixel is within a few percent of a whole 720x1280 frame.
"""

from __future__ import annotations

from dataclasses import dataclass

from nafnet_core.cli_common import parse_size
from nafnet_core.errors import UserError

DEFAULT_TILE = (512, 512)
#: Default TensorRT optimisation profile for the dynamic graph: (height, width) at min / opt / max.
DEFAULT_PROFILE = ((64, 64), (720, 1280), (1088, 1920))


class ShapeError(UserError, ValueError):
    """A tile size or profile string that cannot be used."""


@dataclass(frozen=True)
class ShapeSpec:
    """The input shape an exported graph accepts.

    Args:
        height: tile height (None for dynamic).
        width: tile width (None for dynamic).
        batch: fixed batch of a tile graph (dynamic graphs accept any batch).
    """

    height: int | None = None
    width: int | None = None
    batch: int = 1

    def __post_init__(self) -> None:
        if (self.height is None) != (self.width is None):
            raise ShapeError("a tile needs both height and width (or neither for a dynamic graph)")
        for v in (self.height, self.width):
            if v is not None and v < 1:
                raise ShapeError(f"tile sides must be positive, got {self.height}x{self.width}")
        if self.batch < 1:
            raise ShapeError(f"batch must be >= 1, got {self.batch}")

    @classmethod
    def dynamic(cls) -> ShapeSpec:
        return cls()

    @classmethod
    def tile(cls, height: int, width: int, batch: int = 1) -> ShapeSpec:
        return cls(int(height), int(width), int(batch))

    @property
    def is_dynamic(self) -> bool:
        return self.height is None

    @property
    def tag(self) -> str:
        """Short name used in artifact names: ``dynamic``, ``512x512`` or ``b4-512x512``."""
        if self.is_dynamic:
            return "dynamic"
        return (f"b{self.batch}-" if self.batch != 1 else "") + f"{self.height}x{self.width}"

    def input_shape(self, channels: int = 3) -> list[int | str]:
        """ONNX input shape: ints for a tile, dimension names for a dynamic graph."""
        if self.is_dynamic:
            return ["batch", channels, "height", "width"]
        return [self.batch, channels, self.height, self.width]

    def to_dict(self) -> dict:
        if self.is_dynamic:
            return {"kind": "dynamic", "dims": {"batch": [1, None], "height": [1, None], "width": [1, None]}}
        return {"kind": "tile", "batch": self.batch, "height": self.height, "width": self.width}

    @classmethod
    def from_dict(cls, d: dict) -> ShapeSpec:
        if d.get("kind") == "dynamic":
            return cls.dynamic()
        return cls.tile(d["height"], d["width"], d.get("batch", 1))


def parse_hw(text: str) -> tuple[int, int]:
    """``"720x1280"`` -> (720, 1280); ``"512"`` -> (512, 512)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise ShapeError(str(e)) from None


@dataclass(frozen=True)
class Profile:
    """A TensorRT optimisation profile for the dynamic graph: full NCHW shapes at min / opt / max."""

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        if not all(a <= b <= c for a, b, c in zip(self.min, self.opt, self.max)):
            raise ShapeError(f"profile must satisfy min <= opt <= max in every dimension, got "
                             f"{list(self.min)} / {list(self.opt)} / {list(self.max)}")
        if any(v < 1 for v in self.min):
            raise ShapeError(f"profile dimensions must be positive, got min {list(self.min)}")

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def make_profile(spec: ShapeSpec, hw: tuple[tuple[int, int], ...] = DEFAULT_PROFILE, max_batch: int = 1,
                 channels: int = 3) -> Profile:
    """The optimisation profile of ``spec``: the tile shape three times, or ``hw`` (min, opt, max) for dynamic."""
    if not spec.is_dynamic:
        s = (spec.batch, channels, spec.height, spec.width)
        return Profile(s, s, s)
    (h0, w0), (h1, w1), (h2, w2) = hw
    return Profile((1, channels, h0, w0), (1, channels, h1, w1), (max_batch, channels, h2, w2))


def parse_profile(text: str) -> tuple[tuple[int, int], ...]:
    """``"64x64:720x1280:1088x1920"`` -> ((64, 64), (720, 1280), (1088, 1920)), checked min <= opt <= max."""
    parts = str(text).split(":")
    if len(parts) != 3:
        raise ShapeError(f"expected MIN:OPT:MAX such as 64x64:720x1280:1088x1920, got {text!r}")
    hw = tuple(parse_hw(p) for p in parts)
    make_profile(ShapeSpec.dynamic(), hw)  # validates the ordering
    return hw
