"""Image decode/encode: the one pre/post-processing path every backend, the trainer and eval share.

file -> decode (HWC RGB) -> float32 NCHW in [0, 1] -> ... -> clamp -> round -> encode -> atomic write.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError
from .fileio import atomic_path
from .metrics import quantize

#: File suffixes read as images (lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: Largest image accepted by default (pixels); beyond it a file is refused as a possible decompression bomb.
DEFAULT_MAX_PIXELS = 200_000_000


class ImageError(UserError):
    """An image file that cannot be read or written; the message names the file."""


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_rgb8(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes ``path`` to uint8 HWC RGB (EXIF orientation applied; gray/palette/RGBA/CMYK converted)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{path}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
                                 "(possible decompression bomb); raise --max-pixels if the image is genuine")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = ImageOps.exif_transpose(im)
                return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a readable image (unknown format or not an image file)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot decode image (truncated or corrupt): {e}") from None


def image_size(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding the pixels (fast).

    Checks what can be checked cheaply: the file exists, is an image format Pillow knows, its
    header is intact and its size is within ``max_pixels``. A file truncated after its header
    passes; :func:`read_rgb8` (a full decode) finds that.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a readable image (unknown format or not an image file)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot read image header (truncated or corrupt): {e}") from None
    if w * h > max_pixels:
        raise ImageError(f"{path}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
                         "(possible decompression bomb); raise --max-pixels if the image is genuine")
    return h, w


def write_rgb8(path: str | Path, rgb: np.ndarray) -> Path:
    """Atomically encodes uint8 HWC RGB to ``path`` (format from the suffix)."""
    path = Path(path)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"write_rgb8 expects uint8 HxWx3, got {rgb.dtype} {rgb.shape}")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ImageError(f"{path}: unknown image suffix; use one of {', '.join(IMAGE_SUFFIXES)}")
    try:
        with atomic_path(path) as tmp:
            Image.fromarray(rgb).save(tmp, format=fmt)
    except OSError as e:
        raise ImageError(f"{path}: cannot write image: {e}") from None
    return path


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float32 (1, C, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float().div_(255.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (1, C, H, W) or (C, H, W) in [0, 1] -> uint8 HWC (clamp, x255, round)."""
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"to_uint8 takes one image, got batch {x.shape[0]}")
        x = x[0]
    return quantize(x).permute(1, 2, 0).cpu().numpy()
