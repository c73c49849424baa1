"""Cost of AdaRevD's adaptive exits at 720x1280: the adaptive path against every fixed depth and NAFNet-width64.

AdaRevD-B (``adarevd-b-naf``: the NAFNet-width64 encoder, K = 4 sub-decoders, the exit classifier) and
NAFNet-width64 (``nafnet-gopro-width64``), both with weights made non-trivial (:func:`make_nontrivial`; no
trained weights can be downloaded here) and TLC, are exported as fp32 ONNX for one 720x1280 image (AdaRevD:
graph E + one graph per sub-decoder step, :mod:`export.adarevd`; NAFNet: the whole-image graph) and run on
onnxruntime's CPU provider, all contenders interleaved per round (:func:`benchmarks.common.interleaved`).
Each AdaRevD row also gives the median time of graph E and of each step with its batch of tiles, and the
share of tiles at each exit. The adaptive row's shares are those of the classifier of these weights; a
trained classifier gives other shares, whose cost follows from the per-step figures:
E + sum over k of (tiles deeper than k) / tiles * step_k.

    python -m benchmarks.adarevd_cost --rounds 2 --work /tmp/adarevd-cost
    python -m benchmarks.adarevd_cost --rounds 2 --warmup 0 --exits auto fixed:0 fixed:2 fixed:4
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch

import nafnet_core as nc
from benchmarks.common import interleaved, machine_line, make_nontrivial, photo
from runtime.bench import blurred


def export_both(work: Path, size: tuple[int, int], seed: int) -> tuple[Path, Path]:
    """The AdaRevD-B export folder and NAFNet-width64's ONNX file in ``work`` (made once, reused)."""
    from export.adarevd import export_adarevd
    from export.api import export_model

    revd, naf = work / "adarevd-b-naf", work / "nafnet-width64"
    if not (revd / "manifest.json").is_file():
        torch.manual_seed(seed)
        export_adarevd(make_nontrivial(nc.create_model("adarevd-b-naf"), seed), revd, size, train_size=256)
    if not (naf / "manifest.json").is_file():
        torch.manual_seed(seed)
        export_model(make_nontrivial(nc.create_model("nafnet-gopro-width64"), seed), naf, tiles=[size],
                     dynamic=False, train_size=256, check=False)
    onnx_file = next(naf.glob(f"model-fp32-{size[0]}x{size[1]}.onnx"))
    return revd, onnx_file


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="example: python -m benchmarks.adarevd_cost --rounds 2")
    parser.add_argument("--size", default="720x1280", help="image HxW")
    parser.add_argument("--rounds", type=int, default=2, help="timed interleaved rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/adarevd-cost"), help="where the exports go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exits", nargs="+", default=None,
                        help="AdaRevD rows: auto and/or fixed:K (default: auto and every fixed:K)")
    args = parser.parse_args(argv)
    h, w = (int(v) for v in args.size.lower().split("x"))
    import onnxruntime as ort

    from runtime.adarevd import AdaRevDRuntime, format_shares

    revd_dir, naf_file = export_both(args.work, (h, w), args.seed)
    runtime = AdaRevDRuntime(revd_dir, threads=args.threads)
    opts = ort.SessionOptions()
    if args.threads:
        opts.intra_op_num_threads = args.threads
    naf = ort.InferenceSession(str(naf_file), opts, providers=["CPUExecutionProvider"])
    x = blurred(photo(h, w)).numpy()
    modes = args.exits or ["auto"] + [f"fixed:{k}" for k in range(runtime.depth + 1)]
    calls = {"nafnet-width64": lambda: naf.run(None, {naf.get_inputs()[0].name: x})}
    calls.update({m: (lambda m=m: runtime.run(x, m)) for m in modes})
    results: dict[str, list] = {m: [] for m in modes}

    def recording(m):
        def call():
            result = calls[m]()
            results[m].append(result)
        return call

    timings = interleaved({"nafnet-width64": calls["nafnet-width64"], **{m: recording(m) for m in modes}},
                          rounds=args.rounds, warmup=args.warmup)
    base = timings.median("nafnet-width64")
    print(f"{machine_line()}; onnxruntime fp32, {h}x{w}, median of {args.rounds} interleaved rounds after "
          f"{args.warmup} warm-up")
    print("| model / exit | median s | vs NAFNet-64 | graph E s | steps s (tiles each) | tiles per exit |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| NAFNet-width64 | {base:.2f} | 1.00 | - | - | - |")
    for m in modes:
        runs = results[m][args.warmup:]
        med = timings.median(m)
        enc = statistics.median(r.seconds["encoder"] for r in runs)
        steps = " + ".join(f"{statistics.median(r.seconds['steps'][i]['seconds'] for r in runs):.2f} ({s['tiles']})"
                           for i, s in enumerate(runs[0].seconds["steps"])) or "-"
        label = "AdaRevD-B adaptive" if m == "auto" else f"AdaRevD-B {m}"
        print(f"| {label} | {med:.2f} | {med / base:.2f} | {enc:.2f} | {steps} | {format_shares(runs[0].histogram)} |")
    out = np.asarray(results["auto"][-1].image)
    print(f"(adaptive output finite: {bool(np.isfinite(out).all())}; {sum(results['auto'][-1].histogram)} tiles)")


if __name__ == "__main__":
    main()
