"""The embedded synthetic GoPro-style data set: real photos, synthetic camera-shake blur, no downloads.

The photos are the samples scikit-image ships inside its package (``skimage/data/*.png|jpg``), read with
the project's one decoder. GoPro made its blurry frames by averaging 7-13 consecutive frames of a 240 fps
video and kept the middle one as the sharp frame; this module averages a virtual camera's sub-frames the
same way, with the sharp frame at the path's mean position instead (why: below):

1. pick a photo, scale it down by a random factor (sharper than the original) and take a random window
   with a margin around the output area;
2. draw a smooth random camera trajectory over exposure time ``s`` in [-1, 1]: translation
   ``a1 s + a2 s^2 + a3 s^3``, rotation ``r1 s + r2 s^2`` about a random point of the frame and zoom
   ``exp(z1 s)`` -- rotation and zoom make the blur vary across the frame, the cubic makes the path curve --
   each with its mean over the exposure removed, so the blur is centred on the sharp frame (below);
3. render sub-frames along it (bilinear warps of the window), enough that neighbours move at most 0.5 px,
   convert them to linear light (sRGB EOTF), average, convert back and round to uint8 -> ``blur``;
4. ``sharp`` = the window itself, pixel for pixel: the view at the path's mean position.

Why centred (version 2): version 1 kept GoPro's convention, sharp = the middle sub-frame ``t(0) = 0``. A
curved path's mean position is then ``a2 / 3`` away from it (0.1-1.2 px here), so the blurry image is
shifted from its target by an offset that only the path's curvature reveals: the test split's sharp images
shifted by that offset alone score 26-34 dB against themselves. Centring keeps the blur, the input PSNR
range and the spatial variation, makes the target the one position the blur determines, and added 0.2 dB
to the demo recipe's test gain (seed 0, 1000 steps: +0.67 -> +0.88 dB; BENCHMARKS.md, "Demo").

Train and test use different photos (test: ``coffee``, ``chelsea``), so the test halves measure
generalisation to unseen content. Everything is a pure function of ``(seed, split, index)``: the same seed
gives byte-identical PNG files. The default set (24 train + 8 test pairs of 192x256) gives input PSNR
around 25 dB (23.7 dB on its test split; BENCHMARKS.md, "Synthetic set").
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError
from .fileio import atomic_write_text
from .images import read_rgb8, resize_bicubic, write_rgb8

VERSION = 2  # 2: the camera path is centred on the sharp frame (module docstring)
TRAIN_PHOTOS = ("astronaut.png", "rocket.jpg", "ihc.png", "hubble_deep_field.jpg", "retina.jpg",
                "motorcycle_left.png", "motorcycle_right.png")
TEST_PHOTOS = ("coffee.png", "chelsea.png")
DEFAULT_COUNT = 24
DEFAULT_SIZE = (192, 256)  # (height, width)
#: End-to-end extent of the straight part of the camera path at ``shake = 1``, pixels of a 256-px-wide frame
#: (20-60 px at GoPro's 1280 width); ``shake`` scales the whole trajectory (translation, rotation, zoom).
BLUR_LENGTH = (4.0, 12.0)
MARGIN = 32  # pixels of scene around the output window, so warps never sample outside the photo
#: Exposure times sampling a path before its sub-frames are counted (its length, and its mean meanwhile).
PATH_SAMPLES = 201


@dataclass(frozen=True)
class BlurParams:
    """The camera trajectory of one pair (pixels of the output frame, radians)."""

    photo: str
    scale: float
    top: int
    left: int
    mirror: bool
    translation: list  # [[a1x, a1y], [a2x, a2y], [a3x, a3y]]
    rotation: list  # [r1, r2]
    zoom: float  # z1
    center: list  # [cx, cy]
    subframes: int


def photo_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


def load_photo(name: str) -> np.ndarray:
    path = photo_dir() / name
    if not path.exists():
        raise UserError(f"{path}: sample photo missing from the installed scikit-image; reinstall scikit-image "
                        "(pip install --force-reinstall scikit-image) or pass --data with a GoPro folder")
    return read_rgb8(path)


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.where(x <= 0.0031308, x * 12.92, 1.055 * x ** (1 / 2.4) - 0.055)


def _texture(rgb: np.ndarray) -> float:
    g = rgb.astype(np.float32).mean(2)
    return float(np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean())


def draw_params(rng: np.random.Generator, photo: np.ndarray, name: str, size: tuple[int, int],
                shake: float = 1.0) -> BlurParams:
    """Random window and camera trajectory for one pair; ``shake`` scales the trajectory (the same random draws
    for every ``shake``, so ``shake = 1`` gives the original set byte for byte)."""
    h, w = size
    ph, pw = photo.shape[:2]
    rh, rw = h + 2 * MARGIN, w + 2 * MARGIN
    min_scale = max(rh / ph, rw / pw)
    if min_scale > 1.0:
        raise UserError(f"sample photo {name} ({pw}x{ph}) is too small for {w}x{h} pairs")
    # Try a few windows and keep the most textured: blur on a flat sky teaches nothing.
    best = None
    for _ in range(4):
        scale = float(rng.uniform(min_scale, min(1.0, 2 * min_scale)))
        sh, sw = round(ph * scale), round(pw * scale)
        top, left = int(rng.integers(0, sh - rh + 1)), int(rng.integers(0, sw - rw + 1))
        score = _texture(photo[int(top / scale):int((top + rh) / scale):4,
                               int(left / scale):int((left + rw) / scale):4])
        if best is None or score > best[0]:
            best = (score, scale, top, left)
    _, scale, top, left = best
    length = rng.uniform(*BLUR_LENGTH)  # end-to-end extent of the straight part, pixels
    angle = rng.uniform(0, 2 * math.pi)
    a1 = [length / 2 * math.cos(angle), length / 2 * math.sin(angle)]
    a2 = list(rng.normal(0, length / 8, 2))
    a3 = list(rng.normal(0, length / 12, 2))
    rotation = [float(rng.uniform(-1, 1) * math.radians(1.0)), float(rng.normal(0, math.radians(0.3)))]
    zoom = float(rng.uniform(-0.015, 0.015))
    center = [float(rng.uniform(0, w)), float(rng.uniform(0, h))]
    if shake != 1.0:
        a1, a2, a3 = ([shake * v for v in a] for a in (a1, a2, a3))
        rotation, zoom = [shake * v for v in rotation], shake * zoom
    params = BlurParams(photo=name, scale=scale, top=top, left=left, mirror=bool(rng.random() < 0.5),
                        translation=[a1, [float(v) for v in a2], [float(v) for v in a3]], rotation=rotation,
                        zoom=zoom, center=center, subframes=0)
    n = _subframes_needed(params, size)
    return BlurParams(**{**asdict(params), "subframes": n})


def _trajectory(p: BlurParams, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Translation (S, 2), rotation (S,), zoom (S,) at exposure times ``s``, centred on the sharp frame:
    over the rendered sub-frames (``p.subframes`` times evenly spaced in [-1, 1]; :data:`PATH_SAMPLES`
    while they are being counted) translation and rotation average to 0 and zoom to 1, so the blur's mean
    position is the window's."""
    def raw(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = torch.tensor(p.translation, dtype=torch.float64)  # (3, 2)
        powers = torch.stack([s, s ** 2, s ** 3], 1)  # (S, 3)
        return powers @ a, p.rotation[0] * s + p.rotation[1] * s ** 2, torch.exp(p.zoom * s)

    t, theta, zoom = raw(s)
    t_all, theta_all, zoom_all = raw(torch.linspace(-1, 1, p.subframes or PATH_SAMPLES, dtype=torch.float64))
    return t - t_all.mean(0), theta - theta_all.mean(), zoom / zoom_all.mean()


def _source_points(p: BlurParams, s: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Where output pixel centres ``xy`` (P, 2) look in the window at times ``s``: (S, P, 2)."""
    t, theta, zoom = _trajectory(p, s)
    c = torch.tensor(p.center, dtype=torch.float64)
    d = xy[None] - c  # (1, P, 2)
    cos, sin = torch.cos(theta)[:, None], torch.sin(theta)[:, None]
    rx = (cos * d[..., 0] - sin * d[..., 1]) * zoom[:, None]
    ry = (sin * d[..., 0] + cos * d[..., 1]) * zoom[:, None]
    return torch.stack([rx, ry], -1) + c + t[:, None]


def _subframes_needed(p: BlurParams, size: tuple[int, int]) -> int:
    h, w = size
    corners = torch.tensor([[0, 0], [w, 0], [0, h], [w, h], [w / 2, h / 2]], dtype=torch.float64)
    s = torch.linspace(-1, 1, PATH_SAMPLES, dtype=torch.float64)
    path = _source_points(p, s, corners)  # (PATH_SAMPLES, 5, 2)
    length = (path[1:] - path[:-1]).norm(dim=-1).sum(0).max().item()
    n = int(math.ceil(length / 0.5)) + 1
    return n + (n % 2 == 0)  # odd: a grid symmetric about s = 0


def render_pair(photo: np.ndarray, p: BlurParams, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(blur, sharp) uint8 HWC for one parameter set."""
    h, w = size
    ph, pw = photo.shape[:2]
    scaled = resize_bicubic(photo, round(ph * p.scale), round(pw * p.scale))
    win = scaled[p.top:p.top + h + 2 * MARGIN, p.left:p.left + w + 2 * MARGIN]
    if p.mirror:
        win = win[:, ::-1]
    win_t = torch.from_numpy(np.ascontiguousarray(win)).permute(2, 0, 1)[None].float() / 255.0
    lin = srgb_to_linear(win_t)  # (1, 3, H + 2M, W + 2M)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                            indexing="ij")
    xy = torch.stack([xs.flatten(), ys.flatten()], 1)  # pixel centres of the output frame
    s = torch.linspace(-1, 1, p.subframes, dtype=torch.float64)
    acc = torch.zeros(1, 3, h, w, dtype=torch.float64)  # float64 sums: the average is exact to rounding
    wh, ww = win_t.shape[-2:]
    for k in range(p.subframes):
        src = _source_points(p, s[k:k + 1], xy)[0] + MARGIN  # window coordinates
        grid = torch.stack([src[:, 0] / ww * 2 - 1, src[:, 1] / wh * 2 - 1], -1).view(1, h, w, 2)
        acc += F.grid_sample(lin, grid.float(), mode="bilinear", padding_mode="border", align_corners=False)
    blur = linear_to_srgb(acc / p.subframes)
    sharp = win_t[..., MARGIN:MARGIN + h, MARGIN:MARGIN + w].double()
    to8 = lambda x: (x[0].permute(1, 2, 0).clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()  # noqa: E731
    return to8(blur), to8(sharp)


def synthesize(out: str | Path, seed: int = 0, count: int = DEFAULT_COUNT, size: tuple[int, int] = DEFAULT_SIZE,
               progress: bool = True, shake: float = 1.0) -> Path:
    """Writes a GoPro-style tree ``out/{train,test}/{blur,sharp}/NNNN.png`` and ``out/synth.json``.

    Args:
        out: new folder (must not exist or be empty). Written under a temporary name and renamed into
            place when complete, so a half-written data set never appears under ``out``.
        seed: everything is a pure function of it.
        count: training pairs; the test folder gets ``max(2, count // 3)`` pairs of unseen photos.
        size: (height, width) of every pair.
        progress: show a progress bar on stderr.
        shake: strength of the camera shake: scales every trajectory (1 = :data:`BLUR_LENGTH`).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not empty; choose a new folder or delete it")
    if count < 1:
        raise UserError(f"--count must be at least 1, got {count}")
    if not 0.0 < shake <= 4.0:
        raise UserError(f"camera shake strength must be in (0, 4], got {shake}")
    h, w = size
    if h < 32 or w < 32:
        raise UserError(f"synthetic image size must be at least 32x32, got {w}x{h}")
    jobs = [("train", i, TRAIN_PHOTOS[i % len(TRAIN_PHOTOS)]) for i in range(count)]
    jobs += [("test", i, TEST_PHOTOS[i % len(TEST_PHOTOS)]) for i in range(max(2, count // 3))]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    photos: dict[str, np.ndarray] = {}
    records = []
    try:
        if progress:
            from tqdm import tqdm

            jobs_iter = tqdm(jobs, desc="synthesizing pairs", unit="pair", leave=False)
        else:
            jobs_iter = jobs
        for split, i, name in jobs_iter:
            if name not in photos:
                photos[name] = load_photo(name)
            rng = np.random.default_rng([seed, RAW_SPLIT_IDS[split], i])
            params = draw_params(rng, photos[name], name, size, shake)
            blur, sharp = render_pair(photos[name], params, size)
            fname = f"{i:04d}.png"
            write_rgb8(tmp / split / "blur" / fname, blur)
            write_rgb8(tmp / split / "sharp" / fname, sharp)
            records.append({"split": split, "name": fname, **asdict(params)})
        manifest = {"generator": "nafnet-deblurring synthetic GoPro-style blur", "version": VERSION, "seed": seed,
                    "count": count, "size": [h, w], **({"shake": shake} if shake != 1.0 else {}), "pairs": records}
        atomic_write_text(tmp / "synth.json", json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


RAW_SPLIT_IDS = {"train": 0, "test": 1}


def cache_dir() -> Path:
    """Where the default synthetic set lives: ``$NAFNET_CACHE_DIR`` or ``~/.cache/nafnet-deblurring``."""
    env = os.environ.get("NAFNET_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "nafnet-deblurring"


def default_root(seed: int = 0, count: int = DEFAULT_COUNT, shake: float = 1.0) -> Path:
    return cache_dir() / (f"synth-v{VERSION}-seed{seed}-n{count}" + ("" if shake == 1.0 else f"-shake{shake:g}"))


def ensure_synthetic(seed: int = 0, count: int = DEFAULT_COUNT, progress: bool = True, shake: float = 1.0) -> Path:
    """The default synthetic set, generated into the cache on first use (safe if several processes race).

    Args:
        seed / count: as :func:`synthesize`.
        progress: show a progress bar on stderr.
        shake: as :func:`synthesize` (a set of its own in the cache).
    """
    root = default_root(seed, count, shake)
    if (root / "synth.json").exists():
        return root
    try:
        synthesize(root, seed=seed, count=count, progress=progress, shake=shake)
    except (UserError, OSError):
        if (root / "synth.json").exists():  # another process finished first
            return root
        raise
    return root
