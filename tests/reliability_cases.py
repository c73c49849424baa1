"""The bad-input table shared by the tests/test_reliability_*.py files.

Every case is one file written by a small function, with the outcome every entry point must show:
``ok`` (decoded and processed) or ``error`` with a fragment of the one-line message (which must also
name the file). Entry points differ only in how they are fed the files (a folder for ``infer``, a
GoPro-style data set for ``data check`` / ``eval`` / ``train`` / ``parity``).

Root can read any file whatever its mode, so the "unreadable file" case makes ``open`` raise
PermissionError for that one path (:func:`deny_read`) when the tests run as root (CI does).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (40, 48)  # (H, W) of the good images: larger than the 32-px training crop used in the tests


def pixels(h: int = SIZE[0], w: int = SIZE[1], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 100-byte PNG whose header declares ``width`` x ``height`` RGB pixels (10 gigapixels by default)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + _png_chunk(b"IEND", b""))


def _save(path: Path, im: Image.Image, **kw) -> None:
    im.save(path, **kw)


def _truncated(fmt: str) -> Callable[[Path, int], None]:
    def make(path: Path, seed: int) -> None:
        _save(path, Image.fromarray(pixels(seed=seed)), format=fmt)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut

    return make


def _png16(path: Path, seed: int) -> None:
    import png

    a = (pixels(seed=seed).astype(np.uint16) * 257 + np.uint16(seed)).reshape(SIZE[0], -1)
    with open(path, "wb") as f:
        png.Writer(SIZE[1], SIZE[0], greyscale=False, bitdepth=16).write(f, a)


def _float_tiff_nan(path: Path, seed: int) -> None:
    import tifffile

    a = pixels(seed=seed).astype(np.float32) / 255.0
    a[3, 4, 1] = np.nan
    a[5, 6, 0] = np.inf
    tifffile.imwrite(path, a, photometric="rgb")


def _float_tiff(path: Path, seed: int) -> None:
    import tifffile

    tifffile.imwrite(path, pixels(seed=seed).astype(np.float32) / 255.0, photometric="rgb")


def _mode(mode: str, fmt: str = "PNG") -> Callable[[Path, int], None]:
    def make(path: Path, seed: int) -> None:
        im = Image.fromarray(pixels(seed=seed))
        im = im.quantize(64) if mode == "P" else im.convert(mode)
        _save(path, im, format=fmt)

    return make


def _size(h: int, w: int) -> Callable[[Path, int], None]:
    return lambda path, seed: _save(path, Image.fromarray(pixels(h, w, seed)), format="PNG")


@dataclass(frozen=True)
class Case:
    """One bad (or merely unusual) input file.

    Attributes:
        name: id of the case (also the stem of its file).
        suffix: file suffix.
        make: writes the file (path, seed).
        outcome: ``ok`` or ``error``.
        message: fragment of the one-line error (``error`` cases).
        header_ok: a header-only check (``data check`` without ``--full``, ``train``'s pre-check) passes it.
        small: smaller than the 32-px training crop (train refuses it, the others process it).
    """

    name: str
    suffix: str
    make: Callable[[Path, int], None]
    outcome: str
    message: str = ""
    header_ok: bool = False
    small: bool = False

    @property
    def file_name(self) -> str:
        return f"z_{self.name}{self.suffix}"


CASES: list[Case] = [
    Case("zero_byte", ".png", lambda p, s: p.write_bytes(b""), "error", "not a readable image"),
    Case("truncated_png", ".png", _truncated("PNG"), "error", "truncated or corrupt", header_ok=True),
    Case("truncated_jpeg", ".jpg", _truncated("JPEG"), "error", "truncated or corrupt", header_ok=True),
    Case("text_as_png", ".png", lambda p, s: p.write_text("this is a text file, not a picture\n"), "error",
         "not a readable image"),
    Case("one_by_one", ".png", _size(1, 1), "ok", small=True),
    Case("one_by_n", ".png", _size(1, 37), "ok", small=True),
    Case("png16", ".png", _png16, "ok"),
    Case("palette", ".png", _mode("P"), "ok"),
    Case("gray", ".png", _mode("L"), "ok"),
    Case("rgba", ".png", _mode("RGBA"), "ok"),
    Case("cmyk", ".jpg", _mode("CMYK", "JPEG"), "ok"),
    Case("bomb", ".png", lambda p, s: p.write_bytes(bomb_png()), "error", "possible decompression bomb"),
    Case("unreadable", ".png", _size(*SIZE), "error", "permission denied"),
    Case("non_ascii_ümlaut_日本", ".png", _size(*SIZE), "ok"),
    Case("float_tiff_nan", ".tif", _float_tiff_nan, "error", "NaN or Inf", header_ok=True),
    Case("float_tiff", ".tif", _float_tiff, "ok"),
]
BY_NAME = {c.name: c for c in CASES}
OK = [c for c in CASES if c.outcome == "ok"]
ERRORS = [c for c in CASES if c.outcome == "error"]


def write_case(folder: Path, case: Case, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / case.file_name
    case.make(path, seed)
    if case.name == "unreadable":
        path.chmod(0)
    return path


def unreadable_paths(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(BY_NAME["unreadable"].file_name)]


@contextlib.contextmanager
def deny_read(paths: list[str]):
    """Makes ``open`` raise PermissionError for ``paths`` when running as root (mode 000 stops everyone else)."""
    if os.geteuid() != 0 or not paths:
        yield
        return
    real_open, real_os_open = builtins.open, os.open
    denied = {os.path.abspath(p) for p in paths}

    def is_denied(file) -> bool:
        return isinstance(file, (str, os.PathLike)) and os.path.abspath(os.fspath(file)) in denied

    def guarded_open(file, *a, **k):
        if is_denied(file):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *a, **k)

    def guarded_os_open(file, *a, **k):
        if is_denied(file):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_os_open(file, *a, **k)

    builtins.open, os.open = guarded_open, guarded_os_open
    try:
        yield
    finally:
        builtins.open, os.open = real_open, real_os_open


def make_dataset(root: Path, cases: list[Case], *, train: bool = True, test: bool = True, n_good: int = 2) -> Path:
    """A DBlur-layout data set: ``n_good`` good pairs per split plus one pair (blur and sharp) per case.

    Case files sort after the good ones (``z_`` prefix), so in the test folder they fall in the ``test``
    half when ``n_good`` equals the number of cases... callers that need a split choose it explicitly.
    """
    for split, on in (("train", train), ("test", test)):
        for kind in ("blur", "sharp"):
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n_good):
                Image.fromarray(pixels(seed=i + (kind == "sharp"))).save(folder / f"a{i + 1}.png")
            if on:
                for case in cases:
                    write_case(folder, case, seed=1 if kind == "sharp" else 0)
    return root


def one_line_naming(text: str, path: Path | str, fragment: str) -> bool:
    """Some line of ``text`` names ``path`` and contains ``fragment``."""
    return any(str(path) in line and fragment in line for line in text.splitlines())


def tamper_weights(onnx_path: Path) -> None:
    """Rewrites an ONNX file with its first float weight doubled: still a valid graph, other numbers."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    init = next(i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and i.dims)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2, init.name))
    onnx.save(model, str(onnx_path))
