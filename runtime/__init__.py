"""Runtime: one Runner interface over torch / onnxruntime / TensorRT, tiling, inference, parity, bench.

    from runtime import open_runner, restore_image, infer_path
    with open_runner("runs/demo/export") as runner:            # fastest backend the export has here
        report = infer_path(runner, "blurry/", "sharp/")

    from runtime import check_parity
    report = check_parity("runs/demo/export", data_root)      # every backend vs PyTorch fp32
    print(report.table())

TensorRT is imported only when an engine runs (runtime/trt.py).
"""

from .backends import BACKEND_CHOICES, BACKENDS, Backend
from .infer import InferReport, infer_path
from .models import open_runner, read_export
from .parity import ParityReport, ParityRow, check_parity, run_parity
from .restore import choose_tiling, restore, restore_image
from .runners import OnnxRuntimeRunner, Runner, RunnerError, TensorRTRunner, TorchRunner
from .tiling import DEFAULT_OVERLAP, DEFAULT_TILE, TileSpec, restore_tensor

__all__ = [
    "Runner", "TorchRunner", "OnnxRuntimeRunner", "TensorRTRunner", "RunnerError", "BACKENDS", "BACKEND_CHOICES",
    "Backend", "open_runner",
    "read_export", "TileSpec", "DEFAULT_TILE", "DEFAULT_OVERLAP", "restore_tensor", "choose_tiling", "restore",
    "restore_image", "infer_path", "InferReport", "check_parity", "run_parity", "ParityReport", "ParityRow",
]
