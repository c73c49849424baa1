"""TensorRT readiness of an export without a GPU.

Readiness (per ONNX file): ``onnx.checker``; every op in onnx-tensorrt's supported list; no ``DFT`` op and
no complex tensor anywhere (:func:`check_no_dft`: TensorRT has neither); axes of
ReduceMean/CumSum/Pad/Slice/(Un)Squeeze are initializers; the opset within what every supported
TensorRT parses; Pad modes constant/edge; DepthToSpace in PixelShuffle's CRD order; no INT64 constant
beyond INT32 except clamped Slice bounds; a fixed-tile graph has no shape arithmetic; an FP16 graph
keeps LayerNorm, pooling and CumSum in FP32 with FP32 I/O; an INT8 graph keeps the Q/DQ rules and its float
parts as its metadata says (the TensorRT form: the FP16 placement; the cpu form: FP32); onnxruntime loads it
and runs it at concrete shapes with finite outputs of the input's shape. For a directory the manifest's sha256
of every artifact is checked first.

The FP16 range report that ``export lint --checkpoint`` adds is :mod:`export.ranges`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from nafnet_core.errors import first_line
from nafnet_core.fileio import sha256_file

from . import graph
from .manifest import MANIFEST_NAME, ManifestError, verify
from .shapes import ShapeSpec

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
        add("onnx.checker", [first_line(e, 10_000)])
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
        stream_convs = json.loads(meta.get("nafnet.fp32_convs", "[]"))  # around an FP32 stream, or in FP32 islands
        if stream_convs:
            fp32_ops += (f", FP32 convs {'/'.join(stream_convs)}" if len(stream_convs) <= 4
                         else f", {len(stream_convs)} FP32 convs ({stream_convs[0]}, ...)")
        add("FP16 placement", graph.fp16_placement_problems(model, len(stream_convs)),
            f"Conv fp16 x{prec.get('Conv', {}).get('fp16', 0)}; {fp32_ops} fp32; I/O fp32")
    if precision == "int8":
        meta = {p.key: p.value for p in model.metadata_props}
        form = meta.get("nafnet.int8_form")
        floats = json.loads(meta["nafnet.int8_float_convs"]) if "nafnet.int8_float_convs" in meta else None
        prec = graph.node_precisions(model)
        dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        int8_convs = sum(n.op_type == "Conv" and n.input[1] in dq for n in model.graph.node)
        parts = meta.get("nafnet.int8_float_parts", "fp32")
        scale_types = sorted({graph.float_type({0: t.data_type}, 0) or "?" for t in model.graph.initializer
                              if t.name.endswith("_scale")})
        add("INT8 Q/DQ rules", graph.int8_problems(model, form, floats),
            f"{form or '?'} form: {int8_convs} INT8 convs, {counts.get('Conv', 0) - int8_convs} float; signed "
            f"symmetric, zero points 0, {'/'.join(scale_types)} scales typed like their consumers, per-channel "
            f"weights, opset {graph.opset_of(model)}")
        if parts == "fp16-fp32-islands":  # the TensorRT form: the FP16 graph's placement, Q/DQ around its convs
            stream_convs = json.loads(meta.get("nafnet.fp32_convs", "[]"))
            fp32_ops = "/".join(sorted(op for op in graph.FP32_OPS if op in counts)) or "no LayerNorm/pooling ops"
            add("INT8 float parts (FP16, FP32 islands)", graph.fp16_placement_problems(model, len(stream_convs)),
                f"Conv fp16 x{prec.get('Conv', {}).get('fp16', 0)}"
                + (f", FP32 stream convs {'/'.join(stream_convs)}" if stream_convs else "")
                + f"; {fp32_ops} fp32; I/O fp32")
        else:
            add("INT8 float parts (FP32 islands)", graph.int8_float_problems(model),
                f"{sum(sum(c.values()) for op, c in prec.items() if op not in ('QuantizeLinear', 'DequantizeLinear'))} "
                "float nodes in FP32 (LayerNorm, pooling, CumSum, gates, adds); I/O fp32")
    if run:
        from .int8 import cpu_session

        problems, ran = [], []
        try:
            sess = cpu_session(path)
            for shape in _run_shapes(spec):
                x = np.random.default_rng(0).random(shape, dtype=np.float32)
                y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
                if y.shape != x.shape or y.dtype != np.float32:
                    problems.append(f"{list(shape)} -> {list(y.shape)} {y.dtype}")
                elif not np.isfinite(y).all():
                    problems.append(f"{list(shape)}: non-finite output")
                ran.append("x".join(map(str, shape)))
        except Exception as e:  # noqa: BLE001 - any onnxruntime failure is a lint finding, reported with its text
            problems.append(f"{type(e).__name__}: {first_line(e)}")
        add("onnxruntime run", problems, ", ".join(ran))
    return out


def lint_openvino(path: str | Path) -> list[Finding]:
    """An OpenVINO IR: it loads, and its BF16 placement keeps the FP32 islands (LayerNorm and TLC statistics,
    the global residual) while the convolutions are left to BF16, as in the FP16 graph."""
    from .openvino_ir import OpenVINOUnavailable, import_openvino, island_problems, island_report

    path = Path(path)
    try:
        ov = import_openvino()
    except OpenVINOUnavailable as e:
        return [Finding(path.name, "BF16 FP32 islands (OpenVINO)", True, f"not checked: {e}")]
    try:
        model = ov.Core().read_model(str(path))
    except RuntimeError as e:
        return [Finding(path.name, "OpenVINO reads the IR", False, first_line(e))]
    report = island_report(model)
    kept = sum(v["fp32"] for v in report.values())
    bf16 = sum(v["bf16"] for v in report.values())
    problems = island_problems(model)
    detail = ("; ".join(problems) if problems
              else f"{kept} float ops kept FP32, {bf16} (convs, gates, stream) left to BF16")
    return [Finding(path.name, "OpenVINO reads the IR", True),
            Finding(path.name, "BF16 FP32 islands (OpenVINO)", not problems, detail)]


def _is_adarevd_export(path: Path) -> bool:
    try:
        return json.loads((path / "manifest.json").read_text()).get("format") == "adarevd-export"
    except (OSError, ValueError):
        return False


def lint_adarevd(path: str | Path) -> list[Finding]:
    """``export lint`` of an AdaRevD export folder (:mod:`export.adarevd`): the manifest's sha256 of every graph,
    then every TensorRT readiness check of :func:`lint_onnx` on each graph (running them is the runtime's
    parity: the step graphs take five inputs)."""
    path = Path(path)
    manifest = json.loads((path / "manifest.json").read_text())
    bad = [name for name, rec in manifest["files"].items()
           if not (path / name).is_file() or sha256_file(path / name) != rec["sha256"]]
    findings = [Finding("manifest.json", "manifest sha256", not bad,
                        f"missing or changed: {', '.join(bad)}" if bad else f"{len(manifest['files'])} graphs")]
    for name in manifest["files"]:
        if (path / name).is_file():
            findings += lint_onnx(path / name, run=False)
    return findings


def lint_path(path: str | Path, run: bool = True) -> list[Finding]:
    """Lints one ONNX file or OpenVINO IR, or every artifact of an export directory (after checking its hashes)."""
    path = Path(path)
    if path.is_dir():
        if _is_adarevd_export(path):
            return lint_adarevd(path)
        try:
            manifest = verify(path)
        except ManifestError as e:
            return [Finding(MANIFEST_NAME, "manifest sha256", False, str(e))]
        findings = [Finding(MANIFEST_NAME, "manifest sha256", True, f"{len(manifest.artifacts)} artifacts")]
        for rec in manifest.artifacts.values():
            if rec["file"].endswith(".onnx"):
                findings += lint_onnx(manifest.directory / rec["file"], run=run)
            elif rec["file"].endswith(".xml"):
                findings += lint_openvino(manifest.directory / rec["file"])
        return findings
    if not path.is_file():
        raise ManifestError(f"{path}: no such file or directory; pass an export directory or an .onnx file")
    if path.suffix.lower() == ".xml":
        return lint_openvino(path)
    return lint_onnx(path, run=run)
