"""Image decode/encode: the one pre/post-processing path every backend, the trainer and eval share.

    file -> read_image (Decoded: RGB uint8 / uint16 / float32, alpha kept aside, EXIF orientation applied)
         -> to_tensor: float32 (1, 3, H, W) in [0, 1] -> ... model ...
         -> from_tensor: clamp, scale to the source depth, round, alpha and gray re-attached
         -> write_image (atomic)

Formats: PNG, JPEG, BMP, TIFF, WebP; 8- and 16-bit; gray, gray+alpha, palette, RGB, RGBA, CMYK;
float32 TIFF in [0, 1]. Pillow decodes everything except 16-bit colour PNGs (it truncates them to
8 bits), read with pypng, and TIFFs, read with tifffile (Pillow truncates 16-bit RGB TIFFs and cannot
open float ones). A decoded image keeps its bit depth, its alpha and whether it was gray, so the
restored file is written the way the input was.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError
from .fileio import atomic_path
from .metrics import quantize

#: File suffixes read as images (lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: File suffixes read as videos (lower case) -> the FFmpeg muxer that writes them back (runtime/video.py;
#: the output keeps the input's container).
VIDEO_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}
#: Largest image accepted by default (pixels); beyond it a file is refused as a possible decompression bomb.
#: The environment variable NAFNET_MAX_PIXELS sets it for every command (infer also has --max-pixels).
DEFAULT_MAX_PIXELS = 200_000_000
MAX_PIXELS_ENV = "NAFNET_MAX_PIXELS"
#: JPEG / WebP quality used when writing.
JPEG_QUALITY = 95

_MAX_VALUE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(np.float32): 1.0}
_PIL_LOCK = threading.Lock()  # Image.MAX_IMAGE_PIXELS is process-global


class ImageError(UserError):
    """An image file that cannot be read or written; the message names the file."""


@dataclass
class Decoded:
    """A decoded image, upright, with what is needed to write the result back the same way.

    Attributes:
        rgb: (H, W, 3) uint8, uint16 or float32 (float images are in [0, 1]).
        alpha: (H, W) of the same dtype, or None. Not restored: re-attached unchanged.
        gray: the source had one colour channel (it is written back as gray).
        icc_profile: the source's ICC profile bytes, kept on 8-bit outputs.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    gray: bool = False
    icc_profile: bytes | None = None

    @property
    def dtype(self) -> np.dtype:
        return self.rgb.dtype

    @property
    def bits(self) -> int:
        return {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(self.rgb.dtype, 32)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.rgb.shape[0], self.rgb.shape[1]


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def is_video_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_FORMATS


# ----------------------------------------------------------------------------------------------- decode

def max_pixels_limit(max_pixels: int | None = None) -> int:
    """``max_pixels``, or else $NAFNET_MAX_PIXELS, or else :data:`DEFAULT_MAX_PIXELS`.

    Read when used, not at import, so a bad value is one clear error rather than a crash of every command.
    """
    if max_pixels is not None:
        return max_pixels
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    if not re.fullmatch(r"[0-9]+", raw) or int(raw) < 1:
        raise UserError(f"{MAX_PIXELS_ENV}={raw!r} is not a positive whole number of pixels; unset it or set "
                        f"e.g. {MAX_PIXELS_ENV}=400000000")
    return int(raw)


def _check_pixels(path: Path, w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise ImageError(f"{path}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
                         "(possible decompression bomb); if the image is genuine raise the limit with "
                         "--max-pixels (infer) or the NAFNET_MAX_PIXELS environment variable")


def _orient(a: np.ndarray, orientation: int | None) -> np.ndarray:
    """Applies an EXIF/TIFF orientation (1-8) to an (H, W, ...) array, so it reads upright."""
    ops = {2: lambda x: x[:, ::-1], 3: lambda x: x[::-1, ::-1], 4: lambda x: x[::-1],
           5: lambda x: x.swapaxes(0, 1), 6: lambda x: x.swapaxes(0, 1)[:, ::-1],
           7: lambda x: x.swapaxes(0, 1)[::-1, ::-1], 8: lambda x: x.swapaxes(0, 1)[::-1]}
    op = ops.get(orientation or 1)
    return np.ascontiguousarray(op(a)) if op else a


def _split(path: Path, a: np.ndarray, gray: bool, icc: bytes | None = None) -> Decoded:
    """(H, W), (H, W, 1..4) array -> Decoded with 3-channel rgb and separate alpha."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise ImageError(f"{path}: unsupported image layout {a.shape} (expected gray, gray+alpha, RGB or RGBA)")
    channels = a.shape[2]
    color = a[:, :, :1 if channels <= 2 else 3]
    alpha = a[:, :, -1] if channels in (2, 4) else None
    if color.shape[2] == 1:
        color = np.repeat(color, 3, axis=2)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ImageError(f"{path}: float image contains NaN or Inf values; "
                             "only finite values in [0, 1] are supported")
        a_min, a_max = float(a.min()), float(a.max())
        if a_min < 0.0 or a_max > 1.0:
            raise ImageError(f"{path}: float image has values in [{a_min:g}, {a_max:g}]; only [0, 1] is supported")
        color, alpha = color.astype(np.float32), None if alpha is None else alpha.astype(np.float32)
    elif a.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"{path}: unsupported sample type {a.dtype} (8- or 16-bit integers or float32 in [0, 1])")
    # Writable and contiguous (Pillow's arrays are read-only views; torch.from_numpy warns on those).
    return Decoded(np.require(color, requirements=["C", "W"]),
                   None if alpha is None else np.require(alpha, requirements=["C", "W"]),
                   gray=channels <= 2, icc_profile=icc)


def _png_header(path: Path) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG's IHDR, or None if not a PNG."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"), head[24], head[25]


def _read_png16(path: Path, orientation: int | None) -> Decoded:
    import png  # pypng: Pillow truncates 16-bit colour PNGs to 8 bits

    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    a = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(height, width, info["planes"])
    return _split(path, _orient(a, orientation), gray=info["greyscale"])


def _read_tiff(path: Path, max_pixels: int) -> Decoded:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        shape = page.shape
        h, w = (shape[0], shape[1]) if page.planarconfig != 2 or len(shape) == 2 else (shape[1], shape[2])
        _check_pixels(path, w, h, max_pixels)
        tag = page.tags.get(274)
        orientation = int(tag.value) if tag is not None else None
        photometric = int(page.photometric)
        a = page.asarray()
    if a.ndim == 3 and page.planarconfig == 2:  # separate planes -> (H, W, C)
        a = np.moveaxis(a, 0, -1)
    if photometric not in (0, 1, 2):  # palette, CMYK, YCbCr... -> let Pillow convert
        raise _PillowFallback
    if photometric == 0 and a.dtype.kind == "u":  # min-is-white
        a = np.iinfo(a.dtype).max - a
    if a.dtype.kind == "f" and a.dtype != np.float32:
        a = a.astype(np.float32)
    return _split(path, _orient(a, orientation), gray=a.ndim == 2 or a.shape[2] <= 2)


class _PillowFallback(Exception):
    """Internal: a file the specialised reader leaves to Pillow."""


def _open_unlimited(path: Path) -> Image.Image:
    """``Image.open`` without Pillow's own pixel limit: callers apply ours (``_check_pixels``), which is
    configurable."""
    with _PIL_LOCK:  # Image.MAX_IMAGE_PIXELS is process-global
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _read_pillow(path: Path, max_pixels: int) -> Decoded:
    with _open_unlimited(path) as im:
        w, h = im.size
        _check_pixels(path, w, h, max_pixels)
        icc = im.info.get("icc_profile")
        header = _png_header(path) if im.format == "PNG" else None
        if header is not None and header[2] == 16 and header[3] in (2, 4, 6):  # 16-bit RGB, gray+alpha, RGBA
            return _read_png16(path, im.getexif().get(0x0112))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = ImageOps.exif_transpose(im)
        mode = im.mode
        if mode.startswith("I;16"):
            return _split(path, np.asarray(im).astype(np.uint16), gray=True)
        if mode == "I":
            a = np.asarray(im)
            if a.min() < 0 or a.max() > 65535:
                raise ImageError(f"{path}: 32-bit integer image with values outside 0..65535 is not supported")
            return _split(path, a.astype(np.uint16), gray=True)
        if mode == "F":
            return _split(path, np.asarray(im, dtype=np.float32), gray=True)
        gray = mode in ("1", "L", "LA", "La") or (mode in ("P", "PA") and _gray_palette(im))
        has_alpha = "A" in mode or "a" in mode or "transparency" in im.info
        if gray:
            target = "LA" if has_alpha else "L"
        else:
            target = "RGBA" if has_alpha else "RGB"
        return _split(path, np.asarray(im.convert(target), dtype=np.uint8), gray=gray, icc=icc)


def _gray_palette(im: Image.Image) -> bool:
    pal = im.getpalette() or []
    rgb = np.asarray(pal[: len(pal) // 3 * 3]).reshape(-1, 3)
    return bool(len(rgb)) and bool((rgb == rgb[:, :1]).all())


def _tiff_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of a TIFF's first page from its header, or None if tifffile cannot parse it."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return int(page.imagelength), int(page.imagewidth)
    except Exception:  # not a TIFF, truncated, unreadable...: the Pillow path below names the problem
        return None


_FILE_ERRORS = (FileNotFoundError, IsADirectoryError, PermissionError, UnidentifiedImageError)


def _file_error(path: Path, e: Exception) -> ImageError:
    """The one-line error for a file that cannot be opened as an image at all (one of ``_FILE_ERRORS``)."""
    reason = {FileNotFoundError: "no such file", IsADirectoryError: "is a directory, not an image",
              PermissionError: "permission denied"}.get(
        type(e), "not a readable image (unknown format or not an image file)")
    return ImageError(f"{path}: {reason}")


def image_size(path: str | Path, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding the pixels (fast).

    Checks what can be checked cheaply: the file exists, is an image format Pillow knows, its header is
    intact and its size is within ``max_pixels``. A file truncated after its header passes; a full decode
    (:func:`read_image`) finds that. EXIF orientation is not applied.
    """
    path, max_pixels = Path(path), max_pixels_limit(max_pixels)
    if path.suffix.lower() in (".tif", ".tiff"):
        size = _tiff_size(path)  # Pillow cannot open float or some 16-bit RGB TIFFs that read_image reads
        if size is not None:
            _check_pixels(path, size[1], size[0], max_pixels)
            return size
    try:
        with _open_unlimited(path) as im:
            w, h = im.size
    except _FILE_ERRORS as e:
        raise _file_error(path, e) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot read image header (truncated or corrupt): {e}") from None
    _check_pixels(path, w, h, max_pixels)
    return h, w


def read_image(path: str | Path, max_pixels: int | None = None) -> Decoded:
    """Decodes ``path`` upright (EXIF/TIFF orientation applied), keeping depth, alpha and grayness.

    Raises :class:`ImageError` naming the file for anything unreadable, too large or unsupported.
    """
    path, max_pixels = Path(path), max_pixels_limit(max_pixels)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            try:
                return _read_tiff(path, max_pixels)
            except (_PillowFallback, ValueError, NotImplementedError) as e:
                if isinstance(e, ImageError):
                    raise
                # compressions tifffile needs imagecodecs for, palette/CMYK: Pillow reads those as 8-bit
        return _read_pillow(path, max_pixels)
    except ImageError:
        raise
    except _FILE_ERRORS as e:
        raise _file_error(path, e) from None
    except MemoryError:
        raise ImageError(f"{path}: not enough memory to decode this image") from None
    except (OSError, ValueError, SyntaxError, EOFError, KeyError, IndexError, TypeError, Image.DecompressionBombError,
            _PillowFallback) as e:
        raise ImageError(f"{path}: cannot decode image (truncated or corrupt): {type(e).__name__}: {e}") from None
    except Exception as e:  # pypng / tifffile raise their own error types for corrupt data
        if type(e).__module__.split(".")[0] in ("png", "tifffile"):
            raise ImageError(f"{path}: cannot decode image (truncated or corrupt): {e}") from None
        raise


# ----------------------------------------------------------------------------------------------- tensors

def to_tensor(image: Decoded | np.ndarray) -> torch.Tensor:
    """A Decoded image or an (H, W, C) uint8 / uint16 / float32 array -> float32 (1, C, H, W) in [0, 1]."""
    a = image.rgb if isinstance(image, Decoded) else image
    scale = _MAX_VALUE.get(a.dtype)
    if scale is None:
        raise ValueError(f"to_tensor expects uint8, uint16 or float32, got {a.dtype}")
    a = np.ascontiguousarray(a) if a.flags.writeable else a.copy()
    t = torch.from_numpy(a).permute(2, 0, 1)[None]
    return t.float().div_(scale) if scale != 1.0 else t.clone()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (1, C, H, W) or (C, H, W) in [0, 1] -> uint8 HWC (clamp, x255, round)."""
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"to_uint8 takes one image, got batch {x.shape[0]}")
        x = x[0]
    return quantize(x).permute(1, 2, 0).cpu().numpy()


def from_tensor(x: torch.Tensor, like: Decoded) -> Decoded:
    """The restored (1, 3, H, W) float tensor as a Decoded with ``like``'s depth, alpha and grayness.

    Clamp to [0, 1], scale to the source's range, round half to even (integers); float sources stay float.
    """
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"from_tensor takes one image, got batch {x.shape[0]}")
        x = x[0]
    if tuple(x.shape[-2:]) != like.size:
        raise ValueError(f"from_tensor: tensor size {tuple(x.shape[-2:])} differs from the source {like.size}")
    x = x.detach().float().clamp(0, 1).permute(1, 2, 0).cpu()
    if like.dtype == np.uint8:
        rgb = to_uint8(x.permute(2, 0, 1))
    elif like.dtype == np.uint16:
        rgb = (x.double() * 65535.0).round().numpy().astype(np.uint16)
    else:
        rgb = x.numpy().astype(np.float32)
    return replace(like, rgb=np.ascontiguousarray(rgb))


# ----------------------------------------------------------------------------------------------- encode

def _gray_of(rgb: np.ndarray) -> np.ndarray:
    """The restored RGB of a gray source back to one channel: mean of R, G, B, in the same dtype."""
    if rgb.dtype.kind == "f":
        return rgb.mean(axis=2, dtype=np.float32)
    return np.rint(rgb.mean(axis=2, dtype=np.float64)).astype(rgb.dtype)


def _planes(image: Decoded) -> np.ndarray:
    """(H, W, C) array to encode: gray or RGB, with alpha re-attached."""
    color = _gray_of(image.rgb)[:, :, None] if image.gray else image.rgb
    if image.alpha is not None:
        color = np.concatenate([color, image.alpha[:, :, None].astype(color.dtype)], axis=2)
    return color


def write_image(path: str | Path, image: Decoded) -> Path:
    """Atomically encodes ``image`` to ``path`` (format from the suffix).

    16-bit and float images keep their depth in PNG (16-bit) and TIFF; formats that cannot hold them
    (JPEG, BMP, WebP) get the image reduced to 8 bits. JPEG drops alpha (it has none).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or suffix not in IMAGE_SUFFIXES:
        raise ImageError(f"{path}: unknown image suffix; use one of {', '.join(IMAGE_SUFFIXES)}")
    if image.dtype != np.uint8 and not (suffix in (".tif", ".tiff") or (suffix == ".png" and image.dtype == np.uint16)):
        image = to_8bit(image)
    if fmt == "JPEG" and image.alpha is not None:
        image = replace(image, alpha=None)
    a = _planes(image)
    try:
        with atomic_path(path) as tmp:
            if suffix in (".tif", ".tiff"):
                _write_tiff(tmp, a)
            elif image.dtype == np.uint16:
                _write_png16(tmp, a)
            else:
                mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[a.shape[2]]
                pil = Image.fromarray(a.squeeze(2) if a.shape[2] == 1 else a, mode=mode)
                opts = {"quality": JPEG_QUALITY} if fmt in ("JPEG", "WEBP") else {}
                if image.icc_profile and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
                    opts["icc_profile"] = image.icc_profile
                pil.save(tmp, format=fmt, **opts)
    except OSError as e:
        raise ImageError(f"{path}: cannot write image: {e}") from None
    return path


def to_8bit(image: Decoded) -> Decoded:
    """The image at 8 bits per sample (uint8 images are returned as they are)."""
    if image.dtype == np.uint8:
        return image

    def conv(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        x = a.astype(np.float64) / _MAX_VALUE[a.dtype]
        return np.rint(np.clip(x, 0, 1) * 255.0).astype(np.uint8)

    return replace(image, rgb=conv(image.rgb), alpha=conv(image.alpha))


def _write_png16(path: Path, a: np.ndarray) -> None:
    import png

    h, w, c = a.shape
    writer = png.Writer(w, h, greyscale=c <= 2, alpha=c in (2, 4), bitdepth=16)
    with open(path, "wb") as f:
        writer.write(f, a.reshape(h, w * c))


def _write_tiff(path: Path, a: np.ndarray) -> None:
    import tifffile

    c = a.shape[2]
    photometric = "minisblack" if c <= 2 else "rgb"
    extras = {"extrasamples": ["unassalpha"]} if c in (2, 4) else {}
    tifffile.imwrite(path, a.squeeze(2) if c == 1 else a, photometric=photometric, compression="zlib", **extras)


# ----------------------------------------------------------------------------------------------- 8-bit RGB

def read_rgb8(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Decodes ``path`` to uint8 HWC RGB (orientation applied; alpha dropped; gray replicated; 16-bit reduced)."""
    image = read_image(path, max_pixels)
    return (to_8bit(image) if image.dtype != np.uint8 else image).rgb


def write_rgb8(path: str | Path, rgb: np.ndarray) -> Path:
    """Atomically encodes uint8 HWC RGB to ``path`` (format from the suffix)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"write_rgb8 expects uint8 HxWx3, got {rgb.dtype} {rgb.shape}")
    return write_image(path, Decoded(rgb))


def resize_bicubic(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of uint8 HWC (Pillow's, antialiased when shrinking, as torchvision's Resize on images)."""
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BICUBIC))
