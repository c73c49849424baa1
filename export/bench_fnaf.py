"""FNAFNet at one size: parameters, GFLOP, export time, PyTorch eager vs onnxruntime FP32, FFT as matrices vs torch.fft.

Run once for BENCHMARKS.md (the figures depend on the machine's load; interleaved A, B, A, B rounds, medians):

    python -m export.bench_fnaf --preset fnafnet-gopro-width32 --size 720x1280 --repeats 2

The model has random non-zero beta/gamma/biases (latency does not depend on the weights). The ONNX graph is the
fixed-tile FP32 export with TLC, as ``export`` writes it. "torch.fft" swaps every FFT branch's DFT matrices
for ``torch.fft.rfft2``/``irfft2`` on complex tensors (eager only; it cannot be exported for TensorRT).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nafnet_core.config import get_config
from nafnet_core.fnafnet import FFTBranch, window_merge, window_partition
from nafnet_core.flops import model_gflops
from nafnet_core.model import NAFNet, count_parameters
from nafnet_core.tlc import convert_to_tlc


def torch_fft_forward(branch: FFTBranch, x: torch.Tensor) -> torch.Tensor:
    """``branch``'s forward with ``torch.fft`` and complex tensors (the official formulation)."""
    n, c, h_full, w_full = x.shape
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


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fnafnet-gopro-width32")
    p.add_argument("--size", default="720x1280", help="HxW, e.g. 720x1280")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    h, w = map(int, args.size.lower().split("x"))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = get_config(args.preset)
    model = NAFNet(config).eval()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith(("beta", "gamma")) or ".b1_" in name or ".b2_" in name:
                prm.normal_(0, 0.1)
    model = convert_to_tlc(model, 256)
    print(f"{args.preset} at {h}x{w}: {count_parameters(model):,} parameters, "
          f"{model_gflops(config, h, w):.1f} GFLOP (convs + DFT/complex-linear MatMuls)")

    import onnxruntime as ort

    from export.onnx_export import to_onnx_proto
    from export.shapes import ShapeSpec

    start = time.perf_counter()
    proto = to_onnx_proto(model, ShapeSpec.tile(h, w, 1))
    export_s = time.perf_counter() - start
    ops = {n.op_type for n in proto.graph.node}
    print(f"export (fixed tile, fp32, TLC): {export_s:.1f} s, {len(proto.graph.node)} nodes, DFT op: {'DFT' in ops}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del proto
    x = torch.rand(1, 3, h, w)
    with torch.no_grad():
        ref = model(x)
        out = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
        print(f"onnxruntime fp32 vs PyTorch: max |diff| {(out - ref).abs().max().item():.2e}")
        matrices = FFTBranch.forward
        FFTBranch.forward = torch_fft_forward
        try:
            alt = model(x)
        finally:
            FFTBranch.forward = matrices
        print(f"FFT as matrices vs torch.fft (whole model): max |diff| {(alt - ref).abs().max().item():.2e}")

        eager, onnx_rt, fft_mat, fft_torch = [], [], [], []
        for _ in range(args.repeats):  # interleaved: eager (matrices), onnxruntime, eager (torch.fft)
            fft_mat.append(_time(lambda: model(x)))
            eager.append(fft_mat[-1])
            onnx_rt.append(_time(lambda: sess.run(None, {"input": x.numpy()})))
            FFTBranch.forward = torch_fft_forward
            try:
                fft_torch.append(_time(lambda: model(x)))
            finally:
                FFTBranch.forward = matrices
    med = statistics.median
    print(f"PyTorch eager (FFT as matrices): {med(eager):.2f} s  {[round(v, 2) for v in eager]}")
    print(f"onnxruntime CPU fp32:            {med(onnx_rt):.2f} s  {[round(v, 2) for v in onnx_rt]}  "
          f"(eager / onnxruntime = {med(eager) / med(onnx_rt):.2f})")
    print(f"PyTorch eager (torch.fft):       {med(fft_torch):.2f} s  {[round(v, 2) for v in fft_torch]}  "
          f"(matrices / torch.fft = {med(fft_mat) / med(fft_torch):.2f})")


if __name__ == "__main__":
    main()
