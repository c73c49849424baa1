"""INT8 calibration methods compared: convs left in float, val and test ΔPSNR against PyTorch fp32.

For one checkpoint, the fp32 deploy graph (dynamic, TLC, folded) is exported once; then each calibration method
quantizes it in each form with the export's own search (``export.int8.quantize_graph``: SQNR ranking, worst convs
back to float until the val |ΔPSNR| is within the budget; the qdq form in the FP16 graph, as export writes it, the
cpu form with FP32 float parts), and the result is scored on the test split, whole
images, against PyTorch fp32 (mean PSNR of uint8-rounded outputs vs the sharp images)::

    python -m benchmarks.int8 runs/demo/train/best.pt --methods minmax,percentile,entropy
    python -m benchmarks.int8 w32.pt --methods minmax --forms qdq,cpu --json int8.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_line


def split_delta_db(path: Path, reference: torch.nn.Module, root: Path, shape: tuple[int, int] | None) -> float:
    """Mean PSNR (uint8, vs sharp) of ``path`` in onnxruntime minus PyTorch fp32's on the test images (whole, or
    centred crops at ``shape`` mirrored out where smaller, as the export's val crops)."""
    import onnxruntime as ort

    from export.int8 import _psnr_db, _split_images, fit

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    deltas = []
    for pair in _split_images(root, "test"):
        blur, sharp = fit(list(pair), shape, None)
        with torch.no_grad():
            ref = _psnr_db(reference(blur), sharp)
        deltas.append(_psnr_db(torch.from_numpy(sess.run(None, {"input": blur.numpy()})[0]), sharp) - ref)
    return float(np.mean(deltas))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.int8", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--preset", default=None)
    p.add_argument("--methods", default="minmax,percentile,entropy")
    p.add_argument("--forms", default="qdq")
    p.add_argument("--budget", type=float, default=0.10)
    p.add_argument("--crops", type=int, default=16)
    p.add_argument("--tile", default=None, help="HxW: quantize a fixed-tile graph (default: the dynamic graph)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)

    from export import export_model, load_manifest
    from export.api import prepare_model
    from export.int8 import Int8BudgetError, Int8Options, data_root, quantize_graph
    from nafnet_core.checkpoint import load_checkpoint

    ckpt = load_checkpoint(a.checkpoint, preset=a.preset)
    deploy = prepare_model(ckpt.model, train_size=ckpt.train_size)
    root = data_root(Int8Options())
    shape = tuple(int(v) for v in a.tile.split("x")) if a.tile else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_model(a.checkpoint, tmp / "export", preset=a.preset, tiles=[shape] if shape else [],
                     dynamic=shape is None, fp16=True, check=False)
        fp32 = load_manifest(tmp / "export").path(f"onnx-fp32-{a.tile or 'dynamic'}")
        fp16 = load_manifest(tmp / "export").path(f"onnx-fp16-{a.tile or 'dynamic'}")  # the qdq form's float parts
        for method in a.methods.split(","):
            for form in a.forms.split(","):
                work = tmp / f"{method}-{form}"
                work.mkdir()
                options = Int8Options(budget_db=a.budget, calibration=method, crops=a.crops)
                start = time.perf_counter()
                try:
                    r = quantize_graph(fp32, work / "int8.onnx", deploy, shape, options, form, root, work,
                                       lambda s: print(s, file=sys.stderr), fp16_path=fp16)
                except Int8BudgetError as e:
                    rows.append({"method": method, "form": form, "status": str(e)})
                    continue
                rows.append({"method": method, "form": form, "float_convs": len(r.float_convs),
                             "quantized_convs": r.quantized_convs, "val_delta_db": round(r.delta_db, 4),
                             "all_int8_val_delta_db": round(r.trials[0][1], 4),
                             "test_delta_db": round(split_delta_db(work / "int8.onnx", deploy, root, shape), 4),
                             "float": r.float_convs, "seconds": round(time.perf_counter() - start, 1),
                             "status": "ok"})
    print(f"{a.checkpoint} ({ckpt.preset or 'project config'}), {a.tile or 'dynamic'} graph, budget {a.budget} dB, "
          f"{a.crops} train crops; "
          f"{machine_line()}")
    print("| method | form | convs INT8 / float | val ΔPSNR all INT8 | val ΔPSNR | test ΔPSNR | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['method']} | {r['form']} | {r['status']} | | | | |")
            continue
        print(f"| {r['method']} | {r['form']} | {r['quantized_convs']} / {r['float_convs']} | "
              f"{r['all_int8_val_delta_db']:+.4f} | {r['val_delta_db']:+.4f} | {r['test_delta_db']:+.4f} | "
              f"{r['seconds']:.0f} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
