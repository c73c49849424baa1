"""The adaptive-exit runtime of AdaRevD exports (:mod:`export.adarevd`), on onnxruntime.

For an image it reflect-pads to the export's padded size, runs graph E (the encoder features and every
tile's classifier logits), picks each tile's depth ``d = exits[argmax(logits)]`` (or a fixed depth:
``exit="fixed:K"``), cuts every level's features into the tiles, and runs step graph k only on the tiles
deeper than k: tiles sorted by depth, so each step runs once on one batch (a prefix of the sorted tiles),
and each tile leaves through the head of its own depth. The tile residuals are blended as the model blends
them (:func:`nafnet_core.adarevd.blend`) and added to the image. :meth:`AdaRevDRuntime.run_all_select` is
the reference: every step on every tile, then each tile's own depth selected.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nafnet_core.adarevd import blend, cut_tiles, pad_reflect
from nafnet_core.config import ModelConfig
from nafnet_core.errors import UserError

FORMAT = "adarevd-export"


@dataclass
class AdaRevDResult:
    """The restored image (1, C, H, W) FP32, each tile's depth (row-major) and how many tiles left at each
    depth 0..K."""

    image: np.ndarray
    depths: list[int]
    histogram: list[int]


def parse_exit(exit_mode: str, depth: int) -> int | None:
    """``auto`` -> None (the classifier decides); ``fixed:K`` -> K (0..depth)."""
    if exit_mode == "auto":
        return None
    if exit_mode.startswith("fixed:") and exit_mode[6:].isdigit() and 0 <= int(exit_mode[6:]) <= depth:
        return int(exit_mode[6:])
    raise UserError(f"--exit {exit_mode!r}: use auto or fixed:K with K in 0..{depth}")


class AdaRevDRuntime:
    """Runs an AdaRevD export folder.

    Args:
        export_dir: what :func:`export.adarevd.export_adarevd` wrote.
        precision: ``fp32`` or ``fp16`` (the FP16 graphs, where exported).
        threads: onnxruntime intra-op threads (None: its default).
    """

    def __init__(self, export_dir: str | Path, precision: str = "fp32", threads: int | None = None):
        import onnxruntime as ort

        self.dir = Path(export_dir)
        try:
            self.manifest = json.loads((self.dir / "manifest.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{self.dir}: no readable manifest.json ({e}); export the model first") from None
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"{self.dir}: not an AdaRevD export (manifest format "
                            f"{self.manifest.get('format')!r})")
        if precision not in self.manifest["precisions"]:
            raise UserError(f"{self.dir}: no {precision} graphs (exported: {', '.join(self.manifest['precisions'])})")
        self.config = ModelConfig.from_dict(self.manifest["config"])
        self.depth = self.manifest["depth"]
        suffix = "" if precision == "fp32" else "-fp16"
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads

        def session(name: str):
            return ort.InferenceSession(str(self.dir / name), opts, providers=["CPUExecutionProvider"])

        self.encoder = session(f"adarevd-encoder{suffix}.onnx")
        self.steps = [session(f"adarevd-step{k + 1}{suffix}.onnx") for k in range(self.depth)]

    # ---------------------------------------------------------------------------------------------------

    def _prepare(self, image: np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        if x.dim() != 4 or x.shape[0] != 1:
            raise UserError(f"expected one image (1, C, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if [h, w] != self.manifest["size"]:
            raise UserError(f"{self.dir}: exported for {self.manifest['size'][0]}x{self.manifest['size'][1]} images, "
                            f"got {h}x{w}; export again with --size {h}x{w}")
        xp = pad_reflect(x, self.config.pad_multiple)
        outs = self.encoder.run(None, {"input": xp.numpy()})
        features = [torch.from_numpy(f) for f in outs[:5]]
        logits = outs[5] if len(outs) > 5 else None
        t = self.manifest["tiles"]
        k1, k2 = t["k"]
        tiles = [cut_tiles(f, level, t["rows"], t["cols"], k1, k2) for level, f in enumerate(features)]
        return x, xp, [s.numpy() for s in tiles[::-1]], logits  # state (e4, e3, e2, e1, e0)

    def _step(self, k: int, state: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        e3, e2, e1, e0, residual = self.steps[k].run(None, dict(zip(("e4", "e3", "e2", "e1", "e0"), state)))
        return [state[0], e3, e2, e1, e0], residual

    def _finish(self, x, xp, residual: np.ndarray, depths: list[int]) -> AdaRevDResult:
        h, w = x.shape[-2:]
        out = (blend(torch.from_numpy(residual), 1, tuple(xp.shape[-2:]), self.config) + xp)[:, :, :h, :w]
        counts = Counter(depths)
        return AdaRevDResult(out.numpy(), depths, [counts.get(d, 0) for d in range(self.depth + 1)])

    def depths_of(self, logits: np.ndarray | None, n_tiles: int, fixed: int | None) -> list[int]:
        if fixed is not None:
            return [fixed] * n_tiles
        if logits is None:
            return [self.depth] * n_tiles
        return [self.config.exits[i] for i in np.argmax(logits, axis=-1).tolist()]

    def run(self, image: np.ndarray, exit_mode: str = "auto") -> AdaRevDResult:
        """Restores ``image`` (1, C, H, W) float32 in [0, 1]: each tile runs only the steps of its depth."""
        fixed = parse_exit(exit_mode, self.depth)
        x, xp, state, logits = self._prepare(image)
        n = state[0].shape[0]
        depths = self.depths_of(logits, n, fixed)
        order = sorted(range(n), key=lambda i: -depths[i])  # deepest first, stable
        d = [depths[i] for i in order]
        state = [s[order] for s in state]
        parts: list[np.ndarray] = []
        pending = None  # the last step's head: the residual of every tile it ran on
        k1, k2 = state[4].shape[-2:]
        for k in range(self.depth + 1):
            still = sum(1 for v in d if v > k)
            if len(state[4]) > still:  # tiles of depth k leave now
                done = len(state[4]) - still
                parts.append(pending[still:] if k > 0 else
                             np.zeros((done, self.config.img_channel, k1, k2), np.float32))
            if still == 0 or k == self.depth:
                break
            state, pending = self._step(k, [s[:still] for s in state])
        residual_sorted = np.concatenate(parts[::-1], 0)
        residual = np.empty_like(residual_sorted)
        residual[order] = residual_sorted
        return self._finish(x, xp, residual, depths)

    def run_all_select(self, image: np.ndarray, exit_mode: str = "auto") -> AdaRevDResult:
        """The reference: every step on every tile, then each tile's residual of its own depth."""
        fixed = parse_exit(exit_mode, self.depth)
        x, xp, state, logits = self._prepare(image)
        n = state[0].shape[0]
        depths = self.depths_of(logits, n, fixed)
        k1, k2 = state[4].shape[-2:]
        every = [np.zeros((n, self.config.img_channel, k1, k2), np.float32)]
        for k in range(self.depth):
            state, residual = self._step(k, state)
            every.append(residual)
        residual = np.stack([every[d][t] for t, d in enumerate(depths)])
        return self._finish(x, xp, residual, depths)


def is_adarevd_export(path: str | Path) -> bool:
    """True for a folder that :func:`export.adarevd.export_adarevd` wrote."""
    manifest = Path(path) / "manifest.json"
    if not Path(path).is_dir() or not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def infer_images(export_dir: str | Path, input_path: str | Path, out_dir: str | Path, exit_mode: str = "auto",
                 precision: str = "fp32", threads: int | None = None, overwrite: bool = False,
                 say=print) -> list[int]:
    """Deblurs an image or the images of a folder tree with an AdaRevD export into ``out_dir`` (same relative
    paths, PNG/JPEG as the input); says each image's exit histogram; returns the total histogram."""
    from nafnet_core.images import IMAGE_SUFFIXES, read_rgb8, write_rgb8

    runtime = AdaRevDRuntime(export_dir, precision, threads)
    input_path, out_dir = Path(input_path), Path(out_dir)
    files = [input_path] if input_path.is_file() else sorted(
        p for p in input_path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{input_path}: no images found (looked for {' '.join(IMAGE_SUFFIXES)})")
    total = [0] * (runtime.depth + 1)
    for path in files:
        rel = path.name if input_path.is_file() else path.relative_to(input_path)
        target = out_dir / rel
        if target.exists() and not overwrite:
            continue
        rgb = read_rgb8(path).astype(np.float32) / 255.0
        result = runtime.run(rgb.transpose(2, 0, 1)[None], exit_mode)
        out = (np.clip(result.image[0].transpose(1, 2, 0), 0, 1) * 255.0 + 0.5).astype(np.uint8)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_rgb8(target, out)
        total = [a + b for a, b in zip(total, result.histogram)]
        say(f"{rel}: exits {format_histogram(result.histogram)}")
    return total


def format_histogram(histogram: list[int]) -> str:
    """``depth 0: n (p%), depth 1: ...`` of tiles per exit depth."""
    n = sum(histogram) or 1
    return ", ".join(f"depth {d}: {c} ({100 * c / n:.0f}%)" for d, c in enumerate(histogram))
