"""One preset at one size: parameters, GFLOP, export time, PyTorch eager vs onnxruntime fp32 latency.

    python -m export.bench_variant cgnet-gopro --size 720x1280 --repeats 2

The model is the preset with non-trivial random weights (latency does not depend on the values); the
export is the default deploy form (TLC, folded where the block kind folds, dynamic fp32 graph), timed
end to end. PyTorch eager (the same TLC model, not folded) and onnxruntime (CPU) run interleaved in one
process, A, B, A, B..., after one warm-up each; the medians and their ratio are printed. Output is a
small table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    """Parses the command line and prints the figures.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).
    """
    import onnxruntime as ort

    import nafnet_core as nc
    from nafnet_core.flops import model_gflops

    from .api import export_model
    from .onnx_export import INPUT_NAME, OUTPUT_NAME
    from .samples import sample_photo

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset")
    p.add_argument("--size", default="720x1280", help="HxW [720x1280]")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each side [2]")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of both sides")
    args = p.parse_args(argv)
    h, w = (int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = nc.create_model(args.preset).eval()
    with torch.no_grad():  # non-zero beta/gamma so that no block is skipped anywhere
        for name, prm in model.named_parameters():
            if name.endswith(("beta", "gamma")):
                prm.normal_(0, 0.1)
    print(f"{args.preset}: {nc.count_parameters(model):,} parameters, "
          f"{model_gflops(model.config, h, w):.1f} GFLOP at {h}x{w}, {args.threads} threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = nc.save_checkpoint(Path(tmp) / "model.pt", model)
        t0 = time.perf_counter()
        manifest = export_model(ckpt, Path(tmp) / "export", tiles=None, dynamic=True, check=False)
        export_s = time.perf_counter() - t0
        print(f"export (TLC, deploy form, dynamic fp32 graph, end to end): {export_s:.1f} s", flush=True)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(str(manifest.path("onnx-fp32-dynamic")), opts,
                                    providers=["CPUExecutionProvider"])
        tlc = nc.convert_to_tlc(model)
        x = sample_photo(h, w)
        sides = {"torch-eager": lambda: tlc(x), "onnxruntime": lambda: sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})}
        times: dict[str, list[float]] = {k: [] for k in sides}
        outs = {}
        with torch.no_grad():
            for run in range(args.repeats + 1):  # run 0 warms up
                for name, fn in sides.items():
                    t0 = time.perf_counter()
                    out = fn()
                    if run:
                        times[name].append(time.perf_counter() - t0)
                    outs[name] = out
        diff = (torch.from_numpy(outs["onnxruntime"][0]) - outs["torch-eager"]).abs().max().item()
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, v in times.items():
        print(f"{name:<12} median {med[name]:.2f} s  runs {', '.join(f'{t:.2f}' for t in v)}")
    print(f"torch / onnxruntime = {med['torch-eager'] / med['onnxruntime']:.2f}; max |onnxruntime - torch| = {diff:.2e}")


if __name__ == "__main__":
    main()
