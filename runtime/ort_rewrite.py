"""A rewrite of an exported FP32 graph for onnxruntime's CPU provider: wide 1x1 convolutions as MatMul.

onnxruntime runs a ``Conv`` through its NCHWc kernels. For the 1x1 convolutions with many input channels
(NAFNet's middle levels, 256 and 512 channels on a 16th or less of the pixels) those ran at 51.5 GFLOP/s
on a 720x1280 frame here, while the same product as one GEMM, ``W[O, C] @ x[C, H*W]``, ran at 73 GFLOP/s
in isolation (the GEMM roof of this machine: 119 GFLOP/s). At full resolution with few channels the NCHWc
kernels are the faster ones (87 GFLOP/s at 32 channels) and rewriting those as well also raised the peak
memory by 1 GB, so only convolutions with at least :data:`MIN_CHANNELS` input channels are rewritten, and
in a fixed-tile graph only where the output has at least :data:`MIN_OUTPUT` values (below that it fits
in cache and the NCHWc kernel wins) (BENCHMARKS.md, "onnxruntime FP32 and the GEMM roof").

The rewrite is done in memory when the runner opens the graph; the exported file (the one TensorRT,
OpenVINO and the manifest's hashes see) is untouched::

    x [N, C, H, W] -> Reshape [N, C, H*W] -> MatMul(W [O, C]) -> Add(b [O, 1]) -> Reshape [N, O, H, W]

The output shape comes from ``Shape(x)`` (one Shape/Slice/Concat per rewritten conv), so dynamic graphs
work too; onnxruntime folds them to constants in fixed graphs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Input channels from which a 1x1 conv becomes a MatMul (measured on width32's 720x1280 graph: the
#: middle levels' 256/512-channel convs gained, the 32-128-channel ones at higher resolution did not).
MIN_CHANNELS = 256
#: Output size (channels x pixels, per image) below which a conv of known size stays a Conv: while its
#: output fits in cache the NCHWc kernel is the faster one. One conv alone, conv vs MatMul: 256->512 at
#: 16x16 (131k values) 0.76 vs 0.89 ms, 32x32 (524k) 2.89 vs 3.25 ms, 64x64 (2.1M) 21.5 vs 18.0 ms,
#: 90x160 (7.4M) 100.7 vs 58.9 ms; 512->1024 at 16x16 (262k) 3.77 vs 3.75 ms, 45x80 (3.7M) 57.1 vs
#: 35.3 ms. Sizes a dynamic graph leaves open count as large: such graphs run whole images.
MIN_OUTPUT = 1 << 20


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _is_plain_1x1(node: onnx.NodeProto, weight_dims: list[int]) -> bool:
    a = _attributes(node)
    return (len(weight_dims) == 4 and list(weight_dims[2:]) == [1, 1] and a.get("group", 1) == 1
            and all(s == 1 for s in a.get("strides", [1, 1])) and all(d == 1 for d in a.get("dilations", [1, 1]))
            and not any(a.get("pads", [0, 0, 0, 0])) and a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"))


def _known_pixels(model: onnx.ModelProto) -> dict[str, int]:
    """H * W of every 4-D tensor whose spatial size shape inference can fix (fixed-tile graphs)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # no shapes: every conv counts as large
        return {}
    out = {}
    for v in inferred.graph.value_info:
        dims = v.type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[2:]):
            out[v.name] = dims[2].dim_value * dims[3].dim_value
    return out


def conv1x1_as_matmul(model: onnx.ModelProto, min_channels: int | None = None,
                      min_output: int | None = None) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` whose FP32 1x1 convs with ``>= min_channels`` input channels (default
    :data:`MIN_CHANNELS`) and, where the graph fixes it, an output of ``>= min_output`` values per image
    (default :data:`MIN_OUTPUT`) are MatMuls.

    Returns:
        (the rewritten model, the number of convs rewritten). Convs whose weights are not FP32
        initializers (FP16 graphs, computed weights) and grouped, strided, padded or larger kernels are
        kept as they are.
    """
    min_channels = MIN_CHANNELS if min_channels is None else min_channels
    min_output = MIN_OUTPUT if min_output is None else min_output
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    pixels = _known_pixels(out)
    inits = {t.name: t for t in graph.initializer}
    nodes, extra, rewritten = [], [], 0
    taken = {n for node in graph.node for n in (*node.input, *node.output)} | set(inits)

    def fresh(stem: str) -> str:
        name, i = stem, 0
        while name in taken:
            i += 1
            name = f"{stem}_{i}"
        taken.add(name)
        return name

    def const(stem: str, array: np.ndarray) -> str:
        name = fresh(stem)
        extra.append(numpy_helper.from_array(array, name))
        return name

    for node in graph.node:
        w_init = inits.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if w_init is None or w_init.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        dims = list(w_init.dims)
        small = dims[0] * pixels.get(node.output[0], min_output) < min_output
        if not _is_plain_1x1(node, dims) or dims[1] < min_channels or small:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(w_init)  # only the weights that move
        o, c = w.shape[:2]
        x, y = node.input[0], node.output[0]
        stem = f"{node.name or y}_mm"
        flat, prod = fresh(stem + "_in"), fresh(stem + "_out")
        nodes.append(helper.make_node("Reshape", [x, const(stem + "_flat", np.array([0, c, -1], np.int64))], [flat]))
        nodes.append(helper.make_node("MatMul", [const(stem + "_w", w.reshape(o, c)), flat], [prod]))
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(inits[node.input[2]]).reshape(o, 1)
            summed = fresh(stem + "_bias")
            nodes.append(helper.make_node("Add", [prod, const(stem + "_b", bias)], [summed]))
            prod = summed
        shape, hw, target = fresh(stem + "_shape"), fresh(stem + "_hw"), fresh(stem + "_target")
        nodes.append(helper.make_node("Shape", [x], [shape]))
        nodes.append(helper.make_node("Slice", [shape, const(stem + "_s", np.array([2], np.int64)),
                                                const(stem + "_e", np.array([4], np.int64))], [hw]))
        nodes.append(helper.make_node("Concat", [const(stem + "_no", np.array([0, o], np.int64)), hw], [target],
                                      axis=0))
        nodes.append(helper.make_node("Reshape", [prod, target], [y]))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(extra)
    used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return out, rewritten
