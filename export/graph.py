"""Static checks on ONNX graphs, shared by ``export lint`` and the tests (no GPU, no TensorRT needed)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

#: Operators onnx-tensorrt (TensorRT 10.x, docs/operators.md) lists as supported ("Y"), restricted to the
#: ONNX domain; anything an image-to-image CNN export plausibly contains. Not in it: Sequence*, string ops,
#: NonMaxSuppression's relatives, random normal, ...
TRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GroupNormalization HardSigmoid HardSwish Identity If
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax LpNormalization
LpPool LRN MatMul Max MaxPool Mean Min Mish Mod Mul Neg Not Or Pad Pow PRelu QuantizeLinear Range Reciprocal
ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize Round Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze
Where Xor
""".split())

#: Ops that only exist to compute shapes; a fixed-tile graph must contain none of them.
SHAPE_ARITHMETIC_OPS = frozenset({"Shape", "Size", "Gather", "Min", "Max", "Mod"})

#: (op, input index) pairs that onnx-tensorrt needs as initializers (constants), not computed tensors.
CONSTANT_INPUTS = {"ReduceMean": 1, "ReduceSum": 1, "CumSum": 1, "Pad": 3, "Slice": 3, "Squeeze": 1, "Unsqueeze": 1}

#: Ops that must compute in FP32 inside an FP16 graph: LayerNorm2d (ReduceMean, Pow, Sqrt; folded: MatMul
#: channel means), the pooling means (ReduceMean) and the TLC window sums (CumSum; band MatMuls on small
#: maps). The network's only MatMuls are these means.
FP32_OPS = frozenset({"ReduceMean", "Pow", "Sqrt", "CumSum", "MatMul"})

#: Pad modes of this model's graphs: zero padding to the pad multiple (``constant``) and TLC's replicate
#: padding (``edge``, a clamping ISliceLayer in TensorRT, no size limit). Why the others are flagged:
PAD_MODE_PROBLEMS = {
    "reflect": "TensorRT's reflect (ISliceLayer kREFLECT) repeats reflections for any pad size where ONNX and "
               "onnxruntime require pads smaller than the input, so results can differ; the model never reflect-pads",
    "wrap": "wrap is an opset-19 mode that older TensorRT parsers reject; the model never wrap-pads",
}
PAD_MODES_OK = ("constant", "edge")

#: DepthToSpace channel orders: PyTorch's PixelShuffle is ONNX ``CRD``; ``DCR`` (the ONNX default,
#: TensorFlow's order) is parsed by TensorRT too but scrambles the channels of this model's up-sampling.
DEPTH_TO_SPACE_PROBLEMS = {
    "DCR": "DCR is TensorFlow's channel order; PyTorch's PixelShuffle exports as CRD, so the ups would be scrambled",
}

#: ONNX opsets each TensorRT parser documents (onnx-tensorrt docs/operators.md: 10.0 "opset 9 to opset 20",
#: 10.15 "opset 9 to opset 24"; 11.x up to 25). The project supports TensorRT >= 10.12, so a graph must stay
#: within what 10.0 documents: 9..20.
TRT_OPSETS = {"10.0": (9, 20), "10.15": (9, 24), "11.0": (9, 25)}
TRT_OPSET_SAFE = TRT_OPSETS["10.0"]

_INT32 = (-2**31, 2**31 - 1)

_FLOAT_TYPES = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16",
                TensorProto.DOUBLE: "fp64"}


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types TensorRT's ONNX parser does not list (custom domains included), sorted."""
    bad = {f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
           for n in model.graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in TRT_SUPPORTED_OPS}
    return sorted(bad)


def shape_arithmetic(model: onnx.ModelProto) -> list[str]:
    """Names of shape-arithmetic nodes (Shape/Size/Gather/Min/Max/Mod) in ``model``.

    A Gather of a floating-point tensor at constant indices moves data, not shapes (CascadedGaze's
    nearest upsampling), and is not counted.
    """
    nodes = [n for n in model.graph.node if n.op_type in SHAPE_ARITHMETIC_OPS]
    if any(n.op_type == "Gather" for n in nodes):
        types, constants = tensor_types(model), _constant_names(model)
        nodes = [n for n in nodes if not (n.op_type == "Gather" and types.get(n.input[0]) in _FLOAT_TYPES
                                          and n.input[1] in constants)]
    return [f"{n.op_type} {n.name}" for n in nodes]


def _constant_names(model: onnx.ModelProto) -> set[str]:
    names = {init.name for init in model.graph.initializer}
    names |= {out for n in model.graph.node if n.op_type == "Constant" for out in n.output}
    return names


def computed_axes(model: onnx.ModelProto) -> list[str]:
    """Nodes whose axes input (ReduceMean/CumSum/Pad/Slice/Squeeze/Unsqueeze) is not an initializer."""
    constants = _constant_names(model)
    bad = []
    for n in model.graph.node:
        idx = CONSTANT_INPUTS.get(n.op_type)
        if idx is not None and len(n.input) > idx and n.input[idx] and n.input[idx] not in constants:
            bad.append(f"{n.op_type} {n.name}: input {idx} ({n.input[idx]}) is computed")
    return bad


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor name (after ONNX shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)
    g = inferred.graph
    types = {init.name: init.data_type for init in g.initializer}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def float_type(types: dict[str, int], name: str) -> str | None:
    return _FLOAT_TYPES.get(types.get(name, 0))


def precision_of(model: onnx.ModelProto) -> str:
    """``int8`` if any Conv reads a dequantized weight (a Q/DQ graph), ``fp16`` if any Conv computes in FP16, else
    ``fp32``."""
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    if any(n.op_type == "Conv" and n.input[1] in dq_out for n in model.graph.node):
        return "int8"
    types = tensor_types(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    return "fp16" if any(float_type(types, n.input[0]) == "fp16" for n in convs) else "fp32"


def node_precisions(model: onnx.ModelProto) -> dict[str, Counter]:
    """op type -> Counter of the float type of each node's first input (e.g. {"Conv": {"fp16": 36}})."""
    types = tensor_types(model)
    out: dict[str, Counter] = {}
    for n in model.graph.node:
        t = float_type(types, n.input[0]) if n.input else None
        if t is not None:
            out.setdefault(n.op_type, Counter())[t] += 1
    return out


def fp16_placement_problems(model: onnx.ModelProto, fp32_convs: int = 0) -> list[str]:
    """What is wrong with an FP16 graph's placement: FP32 graph I/O, every Conv in FP16 (weights too) except
    exactly ``fp32_convs`` FP32 ones (the convs around an FP32 residual stream, ``export.fp16_stream``, or inside
    an FP32 island such as AdaRevD's FFT branches, ``export.adarevd``), and every
    LayerNorm/pooling/CumSum op (:data:`FP32_OPS`) computing in FP32. Empty list: fine."""
    types = tensor_types(model)
    problems = []
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.type.tensor_type.elem_type != TensorProto.FLOAT:
            problems.append(f"graph I/O {vi.name} is {_FLOAT_TYPES.get(vi.type.tensor_type.elem_type, '?')}, "
                            "expected fp32")
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    if not convs:
        problems.append("no Conv nodes")
    not_fp16 = []
    for n in convs:
        kinds = {float_type(types, i) for i in n.input[:2]}
        if kinds != {"fp16"}:
            not_fp16.append((n, kinds))
    fp32 = [n for n, kinds in not_fp16 if kinds == {"fp32"}]
    for n, kinds in not_fp16:
        if kinds != {"fp32"} or len(fp32) != fp32_convs:
            problems.append(f"Conv {n.name} computes in {sorted(map(str, kinds))}, expected fp16"
                            + (f" ({fp32_convs} FP32 convs expected, {len(fp32)} found)" if fp32_convs else ""))
    if fp32_convs and len(fp32) < fp32_convs:
        problems.append(f"{fp32_convs} FP32 convs (around an FP32 residual stream or in FP32 islands) expected, "
                        f"{len(fp32)} found")
    for n in model.graph.node:
        if n.op_type in FP32_OPS:
            kinds = {float_type(types, i) for i in n.input[:1]}
            if kinds != {"fp32"}:
                problems.append(f"{n.op_type} {n.name} computes in {sorted(map(str, kinds))}, expected fp32")
    return problems


#: op -> (its mode attribute's ONNX default, the modes that are fine, why each other mode is flagged)
MODE_RULES = {
    "Pad": ("constant", PAD_MODES_OK, PAD_MODE_PROBLEMS, "not an ONNX pad mode"),
    "DepthToSpace": ("DCR", ("CRD",), DEPTH_TO_SPACE_PROBLEMS, "TensorRT's importer knows only DCR and CRD"),
}


def mode_problems(model: onnx.ModelProto, op_type: str) -> list[str]:
    """Nodes of ``op_type`` (a key of :data:`MODE_RULES`) whose ``mode`` attribute is not fine, each with why."""
    default, ok, why, otherwise = MODE_RULES[op_type]
    out = []
    for n in model.graph.node:
        if n.op_type == op_type:
            mode = next((a.s.decode() for a in n.attribute if a.name == "mode"), default)
            if mode not in ok:
                out.append(f"{op_type} {n.name}: mode {mode!r}: " + why.get(mode, otherwise))
    return out


def pad_mode_problems(model: onnx.ModelProto) -> list[str]:
    """Pad nodes whose mode is not ``constant``/``edge``, each with why it is flagged."""
    return mode_problems(model, "Pad")


def depth_to_space_problems(model: onnx.ModelProto) -> list[str]:
    """DepthToSpace nodes whose mode is not ``CRD`` (PixelShuffle's order), each with why."""
    return mode_problems(model, "DepthToSpace")


def _int64_constants(model: onnx.ModelProto):
    for init in model.graph.initializer:
        if init.data_type == TensorProto.INT64:
            yield init.name, numpy_helper.to_array(init)
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.INT64:
                    yield n.output[0], numpy_helper.to_array(a.t)


def int64_beyond_int32(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """INT64 constants with values outside the INT32 range: (problems, harmless ones).

    Harmless: Slice ``starts``/``ends`` (inputs 1 and 2), such as the ``INT64_MAX`` end of a slice to the end
    of an axis; onnx-tensorrt clamps them to the dimension (``decodeOnnxStartsAndEnds``). Anywhere else such a
    value is a shape, axis or index that cannot be right for an image model (and TensorRT before 10 cast
    INT64 down to INT32), so it is a problem.
    """
    consumers: dict[str, list[tuple[str, int]]] = {}
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n.op_type, i))
    problems, harmless = [], []
    for name, values in _int64_constants(model):
        big = values[(values < _INT32[0]) | (values > _INT32[1])]
        if big.size == 0:
            continue
        uses = consumers.get(name, [])
        used = Counter(f"{op} input {i}" for op, i in uses)
        text = f"{name} = {', '.join(str(v) for v in np.unique(big)[:3])} (used by " \
               f"{', '.join(k + (f' x{c}' if c > 1 else '') for k, c in sorted(used.items())) or 'nothing'})"
        if uses and all(op == "Slice" and i in (1, 2) for op, i in uses):
            harmless.append(text)
        else:
            problems.append(text)
    return problems, harmless


def opset_problems(model: onnx.ModelProto) -> list[str]:
    """The ai.onnx opset against :data:`TRT_OPSET_SAFE` (what every supported TensorRT parses)."""
    opset = opset_of(model)
    lo, hi = TRT_OPSET_SAFE
    if opset is None:
        return ["no ai.onnx opset import"]
    if not lo <= opset <= hi:
        ranges = "; ".join(f"TensorRT {v}: {a}-{b}" for v, (a, b) in TRT_OPSETS.items())
        return [f"opset {opset} is outside {lo}-{hi}, the range every TensorRT >= 10.0 parses ({ranges}); "
                f"export with --opset {hi} or lower"]
    return []


def opset_of(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


#: The first opset whose QuantizeLinear/DequantizeLinear take per-axis scales (the weights' per-channel ones).
QDQ_MIN_OPSET = 13
#: The first opset whose QuantizeLinear/DequantizeLinear take FP16 scales (the FP16 convs of the TensorRT form).
QDQ_FP16_MIN_OPSET = 19
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def int8_problems(model: onnx.ModelProto, form: str | None = None, float_convs: list[str] | None = None) -> list[str]:
    """What is wrong with an INT8 Q/DQ graph (``export.int8``); empty list: fine.

    Q/DQ rules (TensorRT's explicit quantization, onnxruntime's QLinearConv): opset >= 13, >= 19 where a scale is
    FP16; every zero point an INT8 initializer of zeros (signed, symmetric; no UINT8 anywhere); every scale an
    initializer of the float type of what it scales (a Q: its input; a DQ: what its consumers compute in: an FP16
    conv FP16 scales, an FP32 conv FP32 ones); activations per tensor, weights per
    output channel (axis 0, one scale per output channel) from INT8 initializers; Q/DQ only around Conv: every DQ
    feeds a Conv or dequantizes a Conv's output, and a Conv output is quantized only in the ``cpu`` form (in every
    INT8 conv there). ``float_convs``: the conv keys (weight names without ``.weight``) that must compute in float.
    """
    problems = []
    opset = opset_of(model)
    if opset is None or opset < QDQ_MIN_OPSET:
        problems.append(f"opset {opset}: per-channel Q/DQ needs opset >= {QDQ_MIN_OPSET}")
    types = tensor_types(model)
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for name, t in types.items():
        if t == TensorProto.UINT8:
            problems.append(f"{name} is UINT8: TensorRT takes signed INT8 Q/DQ only")
    for n in model.graph.node:
        if n.op_type not in _QDQ:
            continue
        if len(n.input) < 3 or n.input[2] not in inits:
            problems.append(f"{n.op_type} {n.name}: no zero-point initializer (the INT8 type comes from it)")
        else:
            zp = inits[n.input[2]]
            if zp.data_type != TensorProto.INT8:
                problems.append(f"{n.op_type} {n.name}: zero point is {TensorProto.DataType.Name(zp.data_type)}, "
                                "expected INT8")
            elif np.any(numpy_helper.to_array(zp) != 0):
                problems.append(f"{n.op_type} {n.name}: zero point not 0 (asymmetric)")
        scale = inits.get(n.input[1])
        if scale is None:
            problems.append(f"{n.op_type} {n.name}: scale {n.input[1]} is not an initializer")
            continue
        if scale.data_type != TensorProto.FLOAT and (opset or 0) < QDQ_FP16_MIN_OPSET:
            problems.append(f"{n.op_type} {n.name}: {_FLOAT_TYPES.get(scale.data_type, '?')} scale at opset {opset}: "
                            f"scales other than FP32 need opset >= {QDQ_FP16_MIN_OPSET}")
        if n.op_type == "QuantizeLinear":
            if types.get(n.input[0]) != scale.data_type:
                problems.append(f"QuantizeLinear {n.name}: scale {_FLOAT_TYPES.get(scale.data_type, '?')}, input "
                                f"{_FLOAT_TYPES.get(types.get(n.input[0], 0), '?')}")
            if len(scale.dims) and int(np.prod(scale.dims)) != 1:
                problems.append(f"QuantizeLinear {n.name}: activations are quantized per tensor, scale has shape "
                                f"{list(scale.dims)}")
            if any(c.op_type != "DequantizeLinear" for c in consumers.get(n.output[0], [])):
                problems.append(f"QuantizeLinear {n.name}: its INT8 output feeds something other than a DQ")
            continue
        # DequantizeLinear
        outs = consumers.get(n.output[0], [])
        for c in outs:
            others = [types.get(i) for i in c.input if i and i != n.output[0] and types.get(i) in _FLOAT_TYPES]
            if others and any(t != scale.data_type for t in others):
                problems.append(f"DequantizeLinear {n.name}: scale {_FLOAT_TYPES.get(scale.data_type, '?')} but its "
                                f"consumer {c.op_type} {c.name} computes in {_FLOAT_TYPES.get(others[0], '?')}")
        src = n.input[0]
        if src in inits:  # a weight
            w = inits[src]
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if w.data_type != TensorProto.INT8:
                problems.append(f"DequantizeLinear {n.name}: weight {src} is {TensorProto.DataType.Name(w.data_type)}")
            if axis != 0 or list(scale.dims) != [w.dims[0]]:
                problems.append(f"DequantizeLinear {n.name}: weights need one scale per output channel (axis 0, "
                                f"{w.dims[0]} scales), got axis {axis}, scale shape {list(scale.dims)}")
            if any(c.op_type != "Conv" or c.input[1] != n.output[0] for c in outs):
                problems.append(f"DequantizeLinear {n.name}: a quantized weight read by something other than a Conv")
            continue
        q = producer.get(src)
        if q is None or q.op_type != "QuantizeLinear":
            problems.append(f"DequantizeLinear {n.name}: input {src} comes from no QuantizeLinear")
            continue
        origin = producer.get(q.input[0])
        from_conv = origin is not None and origin.op_type == "Conv"
        if not from_conv and any(c.op_type != "Conv" for c in outs):
            problems.append(f"DequantizeLinear {n.name}: Q/DQ of {q.input[0]} feeds "
                            f"{', '.join(sorted({c.op_type for c in outs if c.op_type != 'Conv'}))}: only Conv is "
                            "quantized")
        if from_conv and form == "qdq" and any(c.op_type != "Conv" for c in outs):
            problems.append(f"Conv {origin.name}: its output is quantized for a non-conv consumer; TensorRT's "
                            "placement (the qdq form) quantizes conv inputs only")
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    int8_convs = [n for n in convs if n.input[1] in dq_out]
    for n in int8_convs:
        if n.input[0] not in dq_out:
            problems.append(f"Conv {n.name}: INT8 weights but a float activation input")
        if form == "cpu" and not any(c.op_type == "QuantizeLinear" for c in consumers.get(n.output[0], [])):
            problems.append(f"Conv {n.name}: no output Q (the cpu form quantizes every INT8 conv's output)")
    if not int8_convs:
        problems.append("no INT8 conv")
    if float_convs is not None:
        float_keys = {n.input[1].removesuffix(".weight") for n in convs if n.input[1] not in dq_out}
        if float_keys != set(float_convs):
            extra, missing = sorted(float_keys - set(float_convs)), sorted(set(float_convs) - float_keys)
            problems.append("float convs differ from the manifest's list"
                            + (f"; float but not listed: {', '.join(extra[:5])}" if extra else "")
                            + (f"; listed but INT8: {', '.join(missing[:5])}" if missing else ""))
    return problems


def int8_float_problems(model: onnx.ModelProto) -> list[str]:
    """The float parts of an INT8 graph: every tensor that is not INT8 (Q outputs, quantized weights) is FP32 —
    LayerNorm, pooling, CumSum and band means (:data:`FP32_OPS`) above all — and the graph I/O is FP32."""
    types = tensor_types(model)
    problems = []
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.type.tensor_type.elem_type != TensorProto.FLOAT:
            problems.append(f"graph I/O {vi.name} is {_FLOAT_TYPES.get(vi.type.tensor_type.elem_type, '?')}")
    for n in model.graph.node:
        if n.op_type in _QDQ:
            continue
        for i in n.input:
            t = float_type(types, i)
            if t is not None and t != "fp32":
                problems.append(f"{n.op_type} {n.name} reads {t} {i}, expected fp32"
                                + (" (an FP32 island)" if n.op_type in FP32_OPS else ""))
                break
    return problems
