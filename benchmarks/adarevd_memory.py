"""Training memory of AdaRevD's sub-decoders: reversible backward against plain autograd, as K grows.

Each measurement runs in a fresh process: an AdaRevD model (encoder frozen, stage 1), one forward of every
exit depth and the backward of the official loss (mean over depths of L1 + 0.01 |rfft2 difference|); the
figure is the growth of the process's peak resident memory (``ru_maxrss``) over that step, so the weights,
the optimizer-free setup and the input are excluded.

    python -m benchmarks.adarevd_memory --width 16 --size 128 --batch 2 --k 1 2 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

STEP = """
import json, resource, sys, torch
import nafnet_core as nc
from nafnet_core.adarevd import set_training_stage
from train.objectives import depth_mean_loss, l1freq_loss
torch.set_num_threads(2)
width, size, batch, k, reversible = {width}, {size}, {batch}, {k}, {reversible}
torch.manual_seed(0)
model = nc.create_model("tiny-adarevd", width=width, sub_decoders=k, exits=(), tile=size, tile_overlap=16)
set_training_stage(model, 1)
model.reversible = reversible
model.train()
x, y = torch.rand(batch, 3, size, size), torch.rand(batch, 3, size, size)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
depth_mean_loss(l1freq_loss, model(x, all_depths=True), y).backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"k": k, "reversible": reversible, "peak_mib": (after - before) / 1024}}))
"""


def measure(width: int, size: int, batch: int, k: int, reversible: bool) -> dict:
    code = STEP.format(width=width, size=size, batch=batch, k=k, reversible=reversible)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="example: python -m benchmarks.adarevd_memory --k 1 2 4")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)
    print("| K | plain autograd MiB | reversible MiB |")
    print("| --- | --- | --- |")
    for k in args.k:
        plain = measure(args.width, args.size, args.batch, k, False)["peak_mib"]
        rev = measure(args.width, args.size, args.batch, k, True)["peak_mib"]
        print(f"| {k} | {plain:.0f} | {rev:.0f} |", flush=True)


if __name__ == "__main__":
    main()
