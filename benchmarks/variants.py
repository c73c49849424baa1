"""Variants side by side at one size: parameters, GFLOP, export time, PyTorch eager vs onnxruntime fp32.

    python -m benchmarks.variants seed-v3 seed-v3-fft --size 720x1280 --repeats 2 --fs
    python -m benchmarks.variants fnafnet-gopro-width32 --size 720x1280 --repeats 2 --tile

For each preset: a model with non-trivial random weights (:func:`benchmarks.common.make_nontrivial`; a fresh one has
beta/gamma at 0, which skips every block), its deploy form (TLC for a 256 training size, folded) exported as a
dynamic fp32 ONNX graph, or with ``--tile`` the fixed graph of exactly that size (timed; what ``export --tile``
writes), then PyTorch eager (the same deploy module) and onnxruntime CPU (through
:class:`runtime.runners.OnnxRuntimeRunner`, the session settings ``bench`` measures) timed interleaved after one
warm-up (A, B, A, B... medians: the machine is shared), and the largest |ONNX - PyTorch| on a photo. For FNAFNet
presets a third eager run swaps every FFT branch's DFT matrices for ``torch.fft`` on complex tensors (the official
formulation; eager only, it cannot be exported for TensorRT): its time and its largest difference from the matrix
form. ``--fs`` adds the frequency-selection image alone: the matrix form against ``torch.fft`` in eager
(interleaved) and their largest difference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

import nafnet_core as nc
from nafnet_core import dft
from nafnet_core.fnafnet import FFTBranch, window_merge, window_partition

from .common import interleaved, machine, make_nontrivial


def torch_fft_forward(branch: FFTBranch, x: torch.Tensor) -> torch.Tensor:
    """``branch``'s forward with ``torch.fft`` and complex tensors (the official formulation), for timing."""
    n, _, h_full, w_full = x.shape
    ws = branch.window
    xw = window_partition(x, ws) if ws else x
    h, w = xw.shape[-2:]
    y = torch.fft.rfft2(xw.float()).permute(0, 2, 3, 1)
    y = y @ torch.complex(branch.complex_weight1_real, branch.complex_weight1_imag) + \
        torch.complex(branch.b1_real, branch.b1_imag)[0]
    y = torch.complex(F.gelu(y.real), F.gelu(y.imag))
    y = y @ torch.complex(branch.complex_weight2_real, branch.complex_weight2_imag) + \
        torch.complex(branch.b2_real, branch.b2_imag)[0]
    y = torch.fft.irfft2(y.permute(0, 3, 1, 2), s=(h, w))
    return window_merge(y, n, (h_full, w_full), ws) if ws else y


@contextlib.contextmanager
def torch_fft_branches() -> Iterator[None]:
    """Every :class:`FFTBranch` computes with ``torch.fft`` inside the block."""
    matrices = FFTBranch.forward
    FFTBranch.forward = torch_fft_forward
    try:
        yield
    finally:
        FFTBranch.forward = matrices


def bench_preset(preset: str, size: tuple[int, int], repeats: int, out_dir: Path, tile: bool = False,
                 threads: int | None = None) -> dict:
    """One preset: parameters, GFLOP, export seconds, eager / onnxruntime seconds (per repeat) and max |diff|."""
    from export.api import prepare_model
    from export.onnx_export import save_onnx, to_onnx_proto
    from export.samples import sample_photo
    from export.shapes import ShapeSpec
    from runtime.runners import OnnxRuntimeRunner

    torch.manual_seed(0)
    model = make_nontrivial(nc.create_model(preset))
    deploy = prepare_model(model)
    row = {"preset": preset, "parameters": nc.count_parameters(model),
           "gflop": round(nc.model_gflops(model.config, *size), 1)}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = ShapeSpec.tile(*size) if tile else ShapeSpec.dynamic()
        path = save_onnx(to_onnx_proto(deploy, spec), out_dir / f"{preset}.onnx")
    row["graph"] = "tile" if tile else "dynamic"
    row["export_s"] = round(time.perf_counter() - start, 1)
    row["onnx_mb"] = round(path.stat().st_size / 2**20, 1)
    x = sample_photo(*size)
    fnaf = model.config.block == "fnaf"

    def eager():
        with torch.no_grad():
            return deploy(x)

    def eager_fft():
        with torch.no_grad(), torch_fft_branches():
            return deploy(x)

    with OnnxRuntimeRunner(path, device="cpu", threads=threads) as sess:
        calls = {"eager": eager, "onnxrt": lambda: sess.infer(x)} | ({"eager_torch_fft": eager_fft} if fnaf else {})
        timings = interleaved(calls, repeats, warmup=1)
    ref = timings.last["eager"]
    row["max_abs_diff"] = float(f"{(timings.last['onnxrt'] - ref).abs().max().item():.3g}")
    if fnaf:
        row["torch_fft_max_abs_diff"] = float(f"{(timings.last['eager_torch_fft'] - ref).abs().max().item():.3g}")
    row["eager_s"] = [round(v, 2) for v in timings.seconds["eager"]]
    row["onnxrt_s"] = [round(v, 2) for v in timings.seconds["onnxrt"]]
    row["onnxrt_over_eager"] = round(timings.ratios()["onnxrt"], 2)
    if fnaf:
        row["eager_torch_fft_s"] = [round(v, 2) for v in timings.seconds["eager_torch_fft"]]
        row["matrices_over_torch_fft"] = round(timings.ratios("eager_torch_fft")["eager"], 2)
    return row


def bench_fs(size: tuple[int, int], repeats: int) -> dict:
    """The frequency-selection image of a (1, 3, H, W) photo: matrices vs torch.fft in eager, interleaved."""
    from export.samples import sample_photo

    x = sample_photo(*size)

    def matrices():
        with dft.matrix_form():
            return dft.frequency_selection(x)

    timings = interleaved({"matrices": matrices, "torch_fft": lambda: dft.frequency_selection(x)}, repeats, warmup=1)
    a, b = timings.last["matrices"], timings.last["torch_fft"]
    return {"size": list(size), "matrices_s": [round(v, 3) for v in timings.seconds["matrices"]],
            "torch_fft_s": [round(v, 3) for v in timings.seconds["torch_fft"]],
            "ratio": round(timings.ratios("torch_fft")["matrices"], 1),
            "max_abs_diff": float(f"{(a - b).abs().max().item():.3g}"), "max_abs_value": round(b.abs().max().item(), 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.variants",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--size", default="720x1280")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tile", action="store_true", help="export the fixed graph of --size, not the dynamic one")
    parser.add_argument("--fs", action="store_true", help="also time the frequency-selection image alone")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of PyTorch and onnxruntime alike (default: each one's own, as `bench`)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    h, _, w = args.size.partition("x")
    size = (int(h), int(w))
    if args.threads:
        torch.set_num_threads(args.threads)
    from runtime.runners import default_threads

    result = {"size": args.size, "threads": torch.get_num_threads(),
              "onnxrt_threads": args.threads or default_threads(), "machine": machine(), "rows": []}
    print(json.dumps({"machine": result["machine"]}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            row = bench_preset(preset, size, args.repeats, Path(tmp), tile=args.tile, threads=args.threads)
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
    if args.fs:
        result["fs"] = bench_fs(size, max(args.repeats, 3))
        print(json.dumps({"fs": result["fs"]}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
