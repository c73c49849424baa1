"""Tiling sweep: tiled vs whole-image output of a model with non-trivial random weights, per (tile, overlap).

    python -m benchmarks.tiling runs/tiling.json 2 512:0,512:64,512:128,512:192

The measurement behind ``runtime.tiling.DEFAULT_TILE`` / ``DEFAULT_OVERLAP``: a preset with random
non-trivial weights (beta/gamma randomised, SCA amplified, as in the tests) and TLC, on box-blurred
natural photos; per (tile, overlap) the PSNR of the tiled output against the whole-image output, the
largest pixel difference, the change of PSNR against the sharp photo, and seconds per image.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import nafnet_core as nc
from runtime.bench import blurred
from runtime.tiling import TileSpec, count_tiles, restore_tensor

from .common import interleaved, machine, make_nontrivial, photo


@dataclass
class TilingRow:
    tile: int
    overlap: int
    tiles: int
    psnr_vs_whole: float
    max_abs_diff: float
    delta_psnr: float
    seconds: float


def tiling_sweep(model: torch.nn.Module, images: list[torch.Tensor], targets: list[torch.Tensor],
                 configs: list[tuple[int, int]], progress: bool = True) -> tuple[list[TilingRow], float]:
    """Tiled vs whole-image output of ``model`` for each (tile, overlap); returns (rows, whole-image seconds).

    ``psnr_vs_whole``: PSNR of the tiled output against the whole-image output (uint8-rounded), min over
    images; ``delta_psnr``: mean over images of PSNR(tiled, target) - PSNR(whole, target), the parity figure;
    ``seconds``: per image, one timed pass (whole image first, then each configuration in turn).
    """
    q = nc.quantize
    specs = {"whole": None} | {(tile, overlap): TileSpec((tile, tile), overlap) for tile, overlap in configs}

    def restore_all(spec: TileSpec | None):
        return lambda: [restore_tensor(model, x, spec) for x in images]

    with torch.inference_mode():
        timings = interleaved({key: restore_all(spec) for key, spec in specs.items()}, rounds=1, warmup=0)
    outs = timings.last
    wholes = outs["whole"]
    base = [nc.psnr(q(w), q(g)).item() for w, g in zip(wholes, targets)]
    rows = []
    for tile, overlap in configs:
        tiled = outs[(tile, overlap)]
        vs_whole = min(nc.psnr(q(o), q(w)).item() for o, w in zip(tiled, wholes))
        diff = max((o.clamp(0, 1) - w.clamp(0, 1)).abs().max().item() for o, w in zip(tiled, wholes))
        delta = statistics.fmean(nc.psnr(q(o), q(g)).item() - b for o, g, b in zip(tiled, targets, base))
        secs = timings.median((tile, overlap)) / len(images)
        rows.append(TilingRow(tile, overlap, count_tiles(*images[0].shape[-2:], specs[(tile, overlap)]),
                              round(vs_whole, 2), round(diff, 5), round(delta, 4), round(secs, 2)))
        if progress:
            print(rows[-1], file=sys.stderr, flush=True)
    return rows, timings.median("whole") / len(images)


def run_tiling_sweep(preset: str = "nafnet-gopro-width32", size: tuple[int, int] = (720, 1280), n_images: int = 2,
                     configs: list[tuple[int, int]] | None = None, seed: int = 0) -> dict:
    """The sweep on ``preset`` with random non-trivial weights and TLC, on blurred natural photos at ``size``."""
    torch.manual_seed(seed)
    model = nc.convert_to_tlc(make_nontrivial(nc.create_model(preset), seed=seed), 256)
    targets = [photo(*size, index=i) for i in range(n_images)]
    images = [blurred(t) for t in targets]
    configs = configs or [(512, 0), (512, 64), (512, 128), (512, 192)]
    rows, whole_s = tiling_sweep(model, images, targets, configs)
    return {"preset": preset, "size": list(size), "images": n_images, "whole_seconds": round(whole_s, 2),
            "machine": machine(), "rows": [asdict(r) for r in rows]}


def _configs(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(t), int(o)) for t, o in (c.split(":") for c in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TILE:OVERLAP[,TILE:OVERLAP...], e.g. 512:64") from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tiling", description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, help="also write the JSON result here")
    ap.add_argument("images", nargs="?", type=int, default=2, help="number of photos (default 2)")
    ap.add_argument("configs", nargs="?", type=_configs, default=None,
                    help="TILE:OVERLAP,... (default 512:0,512:64,512:128,512:192)")
    a = ap.parse_args(argv)
    text = json.dumps(run_tiling_sweep(n_images=a.images, configs=a.configs), indent=2)
    print(text)
    if a.out is not None:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
