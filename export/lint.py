"""TensorRT readiness without a GPU, and an FP16 range report.

Readiness (per ONNX file): ``onnx.checker``; every op in onnx-tensorrt's supported list; axes of
ReduceMean/CumSum/Pad/Slice/(Un)Squeeze are initializers; the opset within what every supported
TensorRT parses; Pad modes constant/edge; DepthToSpace in PixelShuffle's CRD order; no INT64 constant
beyond INT32 except clamped Slice bounds; a fixed-tile graph has no shape arithmetic; an FP16 graph keeps LayerNorm, pooling and CumSum in FP32 with FP32 I/O; onnxruntime
loads it and runs it at concrete shapes with finite outputs of the input's shape. For a directory
the manifest's sha256 of every artifact is checked first.

FP16 range (needs the PyTorch model): FP32 forward hooks on sample photos record, per NAFBlock,
the largest |activation| of any layer and the largest channel sum of squares ``sum_c (x - mean)^2``
the LayerNorms see, against the FP16 maximum 65504; then a PyTorch half run (the same FP32 islands
as the FP16 graph) is compared with FP32 by PSNR. ORT on CPU cannot reveal FP16 overflow (it
computes FP16 nodes in FP32), PyTorch half can.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from nafnet_core.metrics import psnr
from nafnet_core.model import LayerNorm2d, NAFBlock, NAFNet

from . import graph
from .fold import DeployBlock, GatedConv
from .manifest import MANIFEST_NAME, ManifestError, verify
from .shapes import ShapeSpec

FP16_MAX = 65504.0
#: Concrete sizes the dynamic graph is run at (odd, non-square, below and above a multiple of 16).
DYNAMIC_RUN_SHAPES = ((1, 3, 37, 53), (2, 3, 64, 96))


@dataclass
class Finding:
    file: str
    check: str
    ok: bool
    detail: str = ""


def _shape_of(model: onnx.ModelProto) -> ShapeSpec:
    meta = {p.key: p.value for p in model.metadata_props}
    if "nafnet.shape" in meta:
        return ShapeSpec.from_dict(json.loads(meta["nafnet.shape"]))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if all(d.HasField("dim_value") for d in dims):
        return ShapeSpec.tile(dims[2].dim_value, dims[3].dim_value, dims[0].dim_value)
    return ShapeSpec.dynamic()


def _run_shapes(spec: ShapeSpec) -> list[tuple[int, ...]]:
    return list(DYNAMIC_RUN_SHAPES) if spec.is_dynamic else [(spec.batch, 3, spec.height, spec.width)]


def lint_onnx(path: str | Path, run: bool = True) -> list[Finding]:
    """All readiness checks on one ONNX file."""
    path = Path(path)
    name = path.name
    model = onnx.load(str(path))
    out: list[Finding] = []

    def add(check: str, problems: list[str], ok_detail: str = "") -> None:
        shown = "; ".join(problems[:5]) + (f" ... ({len(problems)} in all)" if len(problems) > 5 else "")
        out.append(Finding(name, check, not problems, shown if problems else ok_detail))

    try:
        onnx.checker.check_model(model, full_check=True)
        add("onnx.checker", [])
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        add("onnx.checker", [str(e).splitlines()[0]])
    counts = graph.op_counts(model)
    add("TensorRT ops", graph.unsupported_ops(model), f"{len(counts)} op types, all supported")
    add("constant axes", graph.computed_axes(model))
    add("opset within TensorRT's parser", graph.opset_problems(model),
        f"opset {graph.opset_of(model)}, parsed by TensorRT >= 10.0 (opsets {graph.TRT_OPSET_SAFE[0]}-"
        f"{graph.TRT_OPSET_SAFE[1]})")
    pads = counts.get("Pad", 0)
    add("Pad modes (constant/edge)", graph.pad_mode_problems(model), f"{pads} Pad" if pads else "no Pad")
    d2s = counts.get("DepthToSpace", 0)
    add("DepthToSpace mode (CRD)", graph.depth_to_space_problems(model),
        f"{d2s} DepthToSpace" if d2s else "no DepthToSpace")
    big, harmless = graph.int64_beyond_int32(model)
    add("INT64 constants within INT32", big,
        ("harmless: " + "; ".join(harmless[:3]) + (f" ... ({len(harmless)} in all)" if len(harmless) > 3 else "")
         + " (Slice bounds, clamped to the dimension by the parser)") if harmless else "")
    spec = _shape_of(model)
    if not spec.is_dynamic:
        add("static tile (no Shape/Gather/Min/Mod)", graph.shape_arithmetic(model), spec.tag)
    precision = graph.precision_of(model)
    if precision == "fp16":
        prec = graph.node_precisions(model)
        fp32_ops = "/".join(sorted(op for op in graph.FP32_OPS if op in counts)) or "no LayerNorm/pooling ops"
        add("FP16 placement", graph.fp16_placement_problems(model),
            f"Conv fp16 x{prec.get('Conv', {}).get('fp16', 0)}; {fp32_ops} fp32; I/O fp32")
    if run:
        import onnxruntime as ort

        problems, ran = [], []
        try:
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for shape in _run_shapes(spec):
                x = np.random.default_rng(0).random(shape, dtype=np.float32)
                y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
                if y.shape != x.shape or y.dtype != np.float32:
                    problems.append(f"{list(shape)} -> {list(y.shape)} {y.dtype}")
                elif not np.isfinite(y).all():
                    problems.append(f"{list(shape)}: non-finite output")
                ran.append("x".join(map(str, shape)))
        except Exception as e:  # noqa: BLE001 - any onnxruntime failure is a lint finding, reported with its text
            problems.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        add("onnxruntime run", problems, ", ".join(ran))
    return out


def lint_path(path: str | Path, run: bool = True) -> list[Finding]:
    """Lints one ONNX file, or every ONNX artifact of an export directory (after checking its hashes)."""
    path = Path(path)
    if path.is_dir():
        try:
            manifest = verify(path)
        except ManifestError as e:
            return [Finding(MANIFEST_NAME, "manifest sha256", False, str(e))]
        findings = [Finding(MANIFEST_NAME, "manifest sha256", True, f"{len(manifest.artifacts)} artifacts")]
        for name, rec in manifest.artifacts.items():
            if rec["file"].endswith(".onnx"):
                findings += lint_onnx(manifest.directory / rec["file"], run=run)
        return findings
    if not path.is_file():
        raise ManifestError(f"{path}: no such file or directory; pass an export directory or an .onnx file")
    return lint_onnx(path, run=run)


# ---------------------------------------------------------------------------------------------------------
# FP16 range report


@dataclass
class BlockRange:
    block: str
    max_abs: float = 0.0  # largest |output| of any layer in the block
    max_sumsq: float = 0.0  # largest sum over channels of (x - mean)^2 at a LayerNorm input

    @property
    def headroom(self) -> float:
        """FP16 max / the larger of the two (< 1 means FP16 would overflow there)."""
        worst = max(self.max_abs, self.max_sumsq)
        return FP16_MAX / worst if worst else float("inf")


@dataclass
class RangeReport:
    blocks: list[BlockRange] = field(default_factory=list)
    half_psnr_db: float | None = None
    half_size: tuple[int, int] | None = None
    images: int = 0

    @property
    def overflows(self) -> list[str]:
        return [b.block for b in self.blocks if b.headroom < 1]


def fp16_range_report(model: NAFNet, images: list[torch.Tensor], half_size: tuple[int, int] | None = (128, 128)) -> RangeReport:
    """FP32 activation ranges per NAFBlock over ``images``, and PSNR of PyTorch half vs FP32 at ``half_size``.

    Args:
        model: the FP32 model as deployed (TLC and folding applied or not, as exported).
        images: (1, 3, H, W) float32 tensors in [0, 1].
        half_size: (h, w) centre crop for the half-vs-fp32 run (half precision is slow on CPU); None skips it.
    """
    model = model.eval()
    report = RangeReport(images=len(images))
    handles = []
    for name, block in model.named_modules():
        if not isinstance(block, (NAFBlock, DeployBlock)):  # as trained, or folded for deployment
            continue
        row = BlockRange(name)
        report.blocks.append(row)

        def track_abs(_m, _inp, out, row=row):
            if isinstance(out, torch.Tensor):
                row.max_abs = max(row.max_abs, out.detach().abs().max().item())

        def track_sumsq(_m, inp, row=row):
            x = inp[0].detach().float()
            ss = (x - x.mean(1, keepdim=True)).pow(2).sum(1).max().item()
            row.max_sumsq = max(row.max_sumsq, ss)
            row.max_abs = max(row.max_abs, x.abs().max().item())

        for sub in block.modules():
            # leaves, and the deploy form's gate products (act(a) * b is no leaf's output there)
            if sub is not block and (not list(sub.children()) or isinstance(sub, GatedConv)):
                handles.append(sub.register_forward_hook(track_abs))
            if isinstance(sub, LayerNorm2d):
                handles.append(sub.register_forward_pre_hook(track_sumsq))
    try:
        with torch.no_grad():
            for x in images:
                model(x)
    finally:
        for h in handles:
            h.remove()
    if half_size is not None and images:
        x = _center_crop(images[0], *half_size)
        half = copy.deepcopy(model).half()
        with torch.no_grad():
            ref, out = model(x), half(x).float()
        report.half_psnr_db = round(float(psnr(out.clamp(0, 1), ref.clamp(0, 1), data_range=1.0).min()), 2)
        report.half_size = tuple(x.shape[-2:])
    return report


def _center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    H, W = x.shape[-2:]
    h, w = min(h, H), min(w, W)
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w]
