"""Natural sample images for export checks, lint and benchmarks (scikit-image's bundled photos).

Uniform noise hides TLC bugs (local and global means agree on it), so checks use photos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

#: scikit-image's bundled colour photos, by ``skimage.data`` name. The export checks cycle over the first four.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
_SAMPLES = 4


def photo(height: int, width: int, index: int = 0) -> torch.Tensor:
    """``PHOTOS[index % 5]`` resized (bicubic) to (1, 3, height, width) float32 in [0, 1]."""
    import skimage.data

    img = getattr(skimage.data, PHOTOS[index % len(PHOTOS)])()
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255.0
    return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)


def sample_photo(height: int, width: int, index: int = 0, batch: int = 1) -> torch.Tensor:
    """(batch, 3, height, width) float32 in [0, 1]: bundled photos resized (bicubic), one per batch item."""
    return torch.cat([photo(height, width, (index + b) % _SAMPLES) for b in range(batch)])


def load_images(folder: str | Path, limit: int = 4) -> list[torch.Tensor]:
    """Up to ``limit`` images of ``folder`` (sorted) as (1, 3, H, W) float32 via the project's one decode path."""
    from nafnet_core.images import is_image_file, read_rgb8, to_tensor

    files = sorted(p for p in Path(folder).iterdir() if is_image_file(p))[:limit]
    return [to_tensor(read_rgb8(p)) for p in files]
