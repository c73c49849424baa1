"""TensorRT readiness without a GPU, and an FP16 range report.

Readiness (per ONNX file): ``onnx.checker``; every op in onnx-tensorrt's supported list; no ``DFT`` op and
no complex tensor anywhere (:func:`check_no_dft`: TensorRT has neither); axes of
ReduceMean/CumSum/Pad/Slice/(Un)Squeeze are initializers; the opset within what every supported
TensorRT parses; Pad modes constant/edge; DepthToSpace in PixelShuffle's CRD order; no INT64 constant
beyond INT32 except clamped Slice bounds; a fixed-tile graph has no shape arithmetic; an FP16 graph keeps LayerNorm, pooling and CumSum in FP32 with FP32 I/O; onnxruntime
loads it and runs it at concrete shapes with finite outputs of the input's shape. For a directory
the manifest's sha256 of every artifact is checked first.

FP16 range (needs the PyTorch model): FP32 forward hooks on sample photos record, per NAFBlock,
the largest |value| of the residual stream, of the gate products and of any layer output against
the FP16 maximum 65504, and the fraction of values below FP16's smallest normal (6.1e-5); then a
PyTorch half run (the same FP32 islands as the FP16 graph, and the same FP32 stream stages) is
compared with FP32 by PSNR. ORT on CPU cannot reveal FP16 overflow (it computes FP16 nodes in
FP32), PyTorch half can. (The LayerNorm sums are no column: they are computed in FP32.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from nafnet_core.metrics import psnr
from nafnet_core.model import Gate, NAFBlock, NAFNet

from . import graph
from .fold import DeployBlock, GatedConv
from .manifest import MANIFEST_NAME, ManifestError, verify
from .shapes import ShapeSpec

FP16_MAX = 65504.0
#: Smallest normal FP16 value (2**-14); smaller magnitudes lose precision (subnormal) or flush to zero.
FP16_MIN_NORMAL = 2.0**-14
#: Fourier-transform ops: ONNX's (DFT, STFT) and onnxruntime's contrib ones (com.microsoft Rfft/Irfft). TensorRT's
#: ONNX parser has none of them.
FOURIER_OPS = frozenset({"DFT", "STFT", "Rfft", "Irfft"})
#: ONNX element types TensorRT cannot hold (it has no complex tensors).
COMPLEX_TYPES = {onnx.TensorProto.COMPLEX64: "complex64", onnx.TensorProto.COMPLEX128: "complex128"}
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


def _all_nodes(g: onnx.GraphProto, where: str = ""):
    """(node, where) for every node of ``g`` and of its subgraphs (If/Loop/Scan bodies)."""
    for n in g.node:
        yield n, where
        for a in n.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subs:
                yield from _all_nodes(sub, f"{where}{n.op_type} {n.name or '?'}/{a.name}: ")


def check_no_dft(model: onnx.ModelProto) -> list[str]:
    """What TensorRT cannot run for lack of Fourier support: every ``DFT``/``STFT`` (or contrib Rfft/Irfft) node
    and every complex tensor (inputs, outputs, initializers, value infos, Cast targets, constants), each
    named. Empty list: none. FFTs must be real matrix products (``nafnet_core.dft``).

    Args:
        model: the ONNX model (subgraphs are searched too).
    """
    problems = []
    for n, where in _all_nodes(model.graph):
        if n.op_type in FOURIER_OPS:
            problems.append(f"{where}{n.op_type} node {n.name or '?'} (inputs {', '.join(n.input)}): TensorRT has no "
                            "Fourier op; export FFTs as matrix products (nafnet_core.dft)")
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i in COMPLEX_TYPES:
                problems.append(f"{where}Cast node {n.name or '?'} casts to {COMPLEX_TYPES[a.i]}: TensorRT has no "
                                "complex tensors")
            elif (a.type == onnx.AttributeProto.TENSOR and a.t.data_type in COMPLEX_TYPES
                  and (where or n.op_type != "Constant")):  # top-level constants: typed below
                problems.append(f"{where}{n.op_type} node {n.name or '?'} holds a {COMPLEX_TYPES[a.t.data_type]} "
                                f"constant: TensorRT has no complex tensors")
    g = model.graph
    io = {vi.name: "input" for vi in g.input} | {vi.name: "output" for vi in g.output}
    io |= {t.name: "initializer" for t in g.initializer}
    problems += [f"{io.get(name, 'tensor')} {name} is {COMPLEX_TYPES[t]}: TensorRT has no complex tensors"
                 for name, t in graph.tensor_types(model).items() if t in COMPLEX_TYPES]
    return problems


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
    add("no DFT op, no complex tensor", check_no_dft(model),
        "no DFT/STFT op, no complex tensor")
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
        meta = {p.key: p.value for p in model.metadata_props}
        stream_convs = json.loads(meta.get("nafnet.fp32_convs", "[]"))
        if stream_convs:
            fp32_ops += f", stream convs {'/'.join(stream_convs)}"
        add("FP16 placement", graph.fp16_placement_problems(model, len(stream_convs)),
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
    """FP32 activation ranges of one block, as the FP16 graph would hold them.

    Args:
        block: module name (``encoders.0.0``).
        max_stream: largest |value| of the residual stream: the block's input, the sum after the first add
            and its output (FP16 tensors in the FP16 graph unless the stage is kept in FP32).
        max_gate: largest |value| of the gate products ``act(a) * b`` and the attention product ``x * sca(x)``.
        max_abs: largest |output| of any layer in the block (convs included).
        subnormal: fraction of the non-zero layer outputs below FP16's smallest normal (6.1e-5), which FP16
            stores with fewer bits or flushes to zero.
    """

    block: str
    max_stream: float = 0.0
    max_gate: float = 0.0
    max_abs: float = 0.0
    subnormal: float = 0.0
    _tiny: int = 0
    _nonzero: int = 0

    @property
    def headroom(self) -> float:
        """FP16 max / the largest of the three maxima (< 1 means FP16 would overflow there)."""
        worst = max(self.max_stream, self.max_gate, self.max_abs)
        return FP16_MAX / worst if worst else float("inf")


@dataclass
class RangeReport:
    blocks: list[BlockRange] = field(default_factory=list)
    half_psnr_db: float | None = None
    half_size: tuple[int, int] | None = None
    images: int = 0
    fp32_stream: list[str] = field(default_factory=list)

    @property
    def overflows(self) -> list[str]:
        return [b.block for b in self.blocks if b.headroom < 1]


def fp16_range_report(model: NAFNet, images: list[torch.Tensor], half_size: tuple[int, int] | None = (128, 128),
                      fp32_stream: list[str] | None = None) -> RangeReport:
    """FP32 activation ranges per NAFBlock over ``images``, and PSNR of PyTorch half vs FP32 at ``half_size``.

    Args:
        model: the FP32 model as deployed (TLC and folding applied or not, as exported).
        images: (1, 3, H, W) float32 tensors in [0, 1].
        half_size: (h, w) centre crop for the half-vs-fp32 run (half precision is slow on CPU); None skips it.
        fp32_stream: stages whose residual stream the half model keeps in FP32 (as the export does; see
            :mod:`export.fp16_stream`).
    """
    from .fp16_stream import to_half

    model = model.eval()
    report = RangeReport(images=len(images), fp32_stream=list(fp32_stream or []))
    handles = []

    def hook(module, fn, pre=False):
        handles.append(module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn))

    for name, block in model.named_modules():
        if not isinstance(block, (NAFBlock, DeployBlock)):  # as trained, or folded for deployment
            continue
        row = BlockRange(name)
        report.blocks.append(row)

        def track(_m, _inp, out, row=row):
            if isinstance(out, torch.Tensor):
                a = out.detach().abs()
                row.max_abs = max(row.max_abs, a.max().item())
                nonzero = a > 0
                row._tiny += int((nonzero & (a < FP16_MIN_NORMAL)).sum())
                row._nonzero += int(nonzero.sum())

        def stream(_m, inp, out=None, row=row):
            for t in (inp[0], out):
                if isinstance(t, torch.Tensor):
                    row.max_stream = max(row.max_stream, t.detach().abs().max().item())

        def gate(_m, inp, out=None, row=row):
            t = inp[0] if out is None else out
            row.max_gate = max(row.max_gate, t.detach().abs().max().item())

        hook(block, stream, pre=True)
        hook(block, stream)
        hook(block.norm2, stream, pre=True)  # norm2 reads the stream after the first add
        hook(block.conv3, gate, pre=True)  # conv3 reads x * sca(x)
        for sub in block.modules():
            # leaves, and the deploy form's gate products (act(a) * b is no leaf's output there)
            if sub is not block and (not list(sub.children()) or isinstance(sub, GatedConv)):
                hook(sub, track)
            if isinstance(sub, (Gate, GatedConv)):
                hook(sub, gate)
    try:
        with torch.no_grad():
            for x in images:
                model(x)
    finally:
        for h in handles:
            h.remove()
    for row in report.blocks:
        row.subnormal = row._tiny / row._nonzero if row._nonzero else 0.0
    if half_size is not None and images:
        x = _center_crop(images[0], *half_size)
        half = to_half(model, report.fp32_stream)
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
