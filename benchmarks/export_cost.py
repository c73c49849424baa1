"""Export benchmarks: export time, artifact sizes, onnxruntime CPU latency folded vs unfolded, tile sizes.

    python -m benchmarks.export_cost --preset nafnet-gopro-width32 --size 720x1280 --repeats 5 --out runs/bench-export
    python -m benchmarks.export_cost --reuse --repeats 9 --tiles ''     # re-time the same files

Weights are random (:func:`benchmarks.common.make_nontrivial`, so no block is skipped): latency does not
depend on their values. Each latency is the median of ``--repeats`` onnxruntime CPU runs after one warm-up
run, through :class:`runtime.runners.OnnxRuntimeRunner` (the session settings ``bench`` measures); the
machine's other load makes single runs noisy, so the compared graphs take turns run by run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import torch

import nafnet_core as nc
from export.api import export_model
from export.manifest import load_manifest
from export.shapes import parse_hw

from .common import interleaved, machine, machine_line, make_nontrivial


def ort_latency(path: Path, shape: tuple[int, ...], repeats: int, threads: int | None = None) -> float:
    """Median seconds of ``repeats`` onnxruntime CPU runs after one warm-up."""
    return ort_latencies({"x": path}, shape, repeats, threads)["x"]


def ort_latencies(paths: dict[str, Path], shape: tuple[int, ...], repeats: int,
                  threads: int | None = None) -> dict[str, float]:
    """Median seconds per graph on onnxruntime CPU (:class:`runtime.runners.OnnxRuntimeRunner`, as ``bench`` runs
    it); the graphs take turns run by run, so background load hits all alike."""
    from runtime.runners import OnnxRuntimeRunner

    x = torch.rand(shape)
    with contextlib.ExitStack() as stack:
        runners = {k: stack.enter_context(OnnxRuntimeRunner(p, device="cpu", threads=threads))
                   for k, p in paths.items()}
        timings = interleaved({k: (lambda r=r: r.infer(x)) for k, r in runners.items()}, repeats, warmup=1)
    return timings.medians()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.export_cost",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nafnet-gopro-width32")
    ap.add_argument("--size", default="720x1280", help="frame size for folded vs unfolded latency")
    ap.add_argument("--tiles", default="256,384,512,768", help="square tile sides for the tile-size sweep ('' skips)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="runs/bench-export")
    ap.add_argument("--reuse", action="store_true", help="reuse the exports of a previous run in --out")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: as `bench`)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    h, w = parse_hw(args.size)
    model = make_nontrivial(nc.create_model(args.preset))
    rows: dict = {"preset": args.preset, "size": [h, w], "repeats": args.repeats, "machine": machine()}
    print(machine_line(rows["machine"]), flush=True)

    # 1. Full export (folded, TLC): dynamic + frame-sized tile, fp32 + fp16: export time and sizes.
    if args.reuse:
        man, unf = load_manifest(out / "folded"), load_manifest(out / "unfolded")
    else:
        man = export_model(model, out / "folded", tiles=[(h, w)], dynamic=True, fp16=True, check=False)
        unf = export_model(model, out / "unfolded", tiles=[(h, w)], dynamic=False, fold=False, check=False)
    rows["artifacts"] = {k: {"bytes": r["bytes"], "export_seconds": r["export_seconds"]}
                         for k, r in [*man.artifacts.items(),
                                      *(("unfolded " + k, r) for k, r in unf.artifacts.items())]}
    print(json.dumps(rows["artifacts"], indent=1), flush=True)

    # 2. onnxruntime CPU latency at the frame size: folded vs unfolded (static graph), and the dynamic graph.
    shape = (1, 3, h, w)
    lat = ort_latencies({"fp32 folded, static": man.path(f"onnx-fp32-{h}x{w}"),
                         "fp32 unfolded, static": unf.path(f"onnx-fp32-{h}x{w}"),
                         "fp32 folded, dynamic": man.path("onnx-fp32-dynamic")}, shape, args.repeats, args.threads)
    rows["load_average_1min"] = os.getloadavg()[0]
    rows["latency_s"] = lat
    print(json.dumps(lat, indent=1), flush=True)

    # 3. Tile-size sweep: seconds per megapixel of the static folded fp32 graph.
    sweep = {}
    for side in [int(s) for s in args.tiles.split(",") if s.strip()]:
        d = out / f"tile{side}"
        m = load_manifest(d) if args.reuse else export_model(model, d, tiles=[(side, side)], dynamic=False, check=False)
        sec = ort_latency(m.path(f"onnx-fp32-{side}x{side}"), (1, 3, side, side), args.repeats, args.threads)
        sweep[side] = {"seconds": sec, "s_per_mpix": sec / (side * side / 1e6)}
        print(side, sweep[side], flush=True)
    sweep["frame"] = {"seconds": lat["fp32 folded, static"], "s_per_mpix": lat["fp32 folded, static"] / (h * w / 1e6)}
    rows["tile_sweep"] = sweep
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
