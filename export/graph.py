"""Static checks on ONNX graphs, shared by ``export lint`` and the tests (no GPU, no TensorRT needed)."""

from __future__ import annotations

from collections import Counter

import onnx
from onnx import TensorProto

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
    """Names of shape-arithmetic nodes (Shape/Size/Gather/Min/Max/Mod) in ``model``."""
    return [f"{n.op_type} {n.name}" for n in model.graph.node if n.op_type in SHAPE_ARITHMETIC_OPS]


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
    """``fp16`` if any Conv computes in FP16, else ``fp32``."""
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


def fp16_placement_problems(model: onnx.ModelProto) -> list[str]:
    """What is wrong with an FP16 graph's placement: FP32 graph I/O, every Conv in FP16 (weights too),
    and every LayerNorm/pooling/CumSum op (:data:`FP32_OPS`) computing in FP32. Empty list: fine."""
    types = tensor_types(model)
    problems = []
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.type.tensor_type.elem_type != TensorProto.FLOAT:
            problems.append(f"graph I/O {vi.name} is {_FLOAT_TYPES.get(vi.type.tensor_type.elem_type, '?')}, "
                            "expected fp32")
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    if not convs:
        problems.append("no Conv nodes")
    for n in convs:
        kinds = {float_type(types, i) for i in n.input[:2]}
        if kinds != {"fp16"}:
            problems.append(f"Conv {n.name} computes in {sorted(map(str, kinds))}, expected fp16")
    for n in model.graph.node:
        if n.op_type in FP32_OPS:
            kinds = {float_type(types, i) for i in n.input[:1]}
            if kinds != {"fp32"}:
                problems.append(f"{n.op_type} {n.name} computes in {sorted(map(str, kinds))}, expected fp32")
    return problems
