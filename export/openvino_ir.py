"""OpenVINO (CPU) for ``export --openvino`` and the runtime's OpenVINORunner: lazy import, BF16 check, FP32 islands.

OpenVINO is an optional extra (``pip install -e ".[openvino]"``), imported only here and only when
used. BF16 is a compile-time hint (``INFERENCE_PRECISION_HINT``): the CPU plugin then computes every
float node in BF16 unless the node is marked to keep its precision. The marking is the IR attribute
``precise`` (OpenVINO reads it as its ``DisablePrecisionConversion`` runtime attribute; the CPU plugin
keeps such nodes in their original FP32). Python has no API to set that attribute on a node, so the
islands are written into the IR's XML (:func:`mark_fp32_islands`), docs/DESIGN.md §17 (OpenVINO and BF16).

On a CPU without BF16 instructions the CPU plugin ignores a bf16 hint and runs FP32 (measured here:
the compiled model reads the hint back as f32). The runner refuses that case with the reason instead
of labelling an FP32 run "bf16".
"""

from __future__ import annotations

import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from nafnet_core.errors import UserError

INSTALL_HINT = 'pip install -e ".[openvino]"   (or: pip install "openvino>=2026.4")'

#: Float ops that start an FP32 island: LayerNorm statistics (channel-mean MatMuls, x - mean, sqrt, divide),
#: TLC window sums and means (CumSum, band-mean MatMuls, ReduceMean at maps below the window), pooling.
ISLAND_SEEDS = frozenset({"MatMul", "CumSum", "ReduceMean", "ReduceSum", "Sqrt", "Divide", "Power", "Subtract",
                          "MVN", "AvgPool", "Parameter"})
#: Element-wise and data-movement ops that stay FP32 when any float input comes from an island (the LayerNorm
#: variance, +eps, the TLC slices/differences/padding, x * mean, the global residual Add and the crop).
ISLAND_FOLLOWERS = frozenset({"Add", "Multiply", "Subtract", "Divide", "Sqrt", "Slice", "StridedSlice", "Reshape",
                              "Transpose", "Pad", "Concat", "Broadcast", "Squeeze", "Unsqueeze", "MatMul", "CumSum",
                              "ReduceMean", "ReduceSum", "Power", "Convert", "Maximum", "Minimum", "VariadicSplit",
                              "Split"})
#: Ops that must run in BF16 for BF16 to pay off (lint checks none of them is marked).
BF16_OPS = frozenset({"Convolution", "GroupConvolution"})
#: The IR attribute that keeps a node in its original precision.
PRECISE = "precise"
FLOAT_PRECISIONS = frozenset({"FP32", "FP16", "BF16"})


class OpenVINOUnavailable(UserError):
    """The openvino package is not installed; the message gives the install command."""


def import_openvino():
    """The ``openvino`` module, or OpenVINOUnavailable with the install command."""
    try:
        import openvino
    except ImportError:
        raise OpenVINOUnavailable(f"the OpenVINO backend needs the openvino package: {INSTALL_HINT}") from None
    return openvino


def openvino_available() -> tuple[bool, str]:
    """(installed, why not) without raising."""
    try:
        import_openvino()
    except OpenVINOUnavailable as e:
        return False, str(e)
    return True, ""


def cpu_capabilities() -> list[str]:
    """OpenVINO's CPU ``OPTIMIZATION_CAPABILITIES`` (``FP32``, ``BF16``, ``INT8``...)."""
    ov = import_openvino()
    return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def bf16_support() -> tuple[bool, str]:
    """(this CPU runs BF16 in OpenVINO, the reason when not)."""
    ok, why = openvino_available()
    if not ok:
        return False, why
    caps = cpu_capabilities()
    if "BF16" in caps:
        return True, ""
    return False, (f"this CPU has no BF16 instructions (OpenVINO CPU capabilities: {', '.join(caps)}); a bf16 hint "
                   "would silently run FP32. BF16 needs AVX512_BF16 or AMX (e.g. Xeon Cooper Lake / Sapphire Rapids)")


# --------------------------------------------------------------------------------------------- FP32 islands

def island_layers(layers: dict[str, tuple[str, bool]], inputs: dict[str, list[str]]) -> set[str]:
    """The layer ids that stay FP32 in a BF16 run: a pure function of the graph.

    Args:
        layers: layer id -> (op type, produces a float tensor), in topological order.
        inputs: layer id -> ids of the layers feeding it.
    Rule: a float layer is an island if its type starts one (ISLAND_SEEDS: LayerNorm and TLC statistics, the
    graph input) or if it is an element-wise/data-movement op (ISLAND_FOLLOWERS) fed by an island. Convolutions
    end an island (they take its output in BF16), so the residual stream, gates and convs run BF16.
    """
    islands: set[str] = set()
    for lid, (kind, is_float) in layers.items():
        if not is_float:
            continue
        if kind in ISLAND_SEEDS or (kind in ISLAND_FOLLOWERS and any(i in islands for i in inputs.get(lid, ()))):
            islands.add(lid)
    return islands


def _ir_graph(root: ET.Element) -> tuple[dict[str, tuple[str, bool]], dict[str, list[str]], dict[str, ET.Element]]:
    elems: dict[str, ET.Element] = {}
    layers: dict[str, tuple[str, bool]] = {}
    for layer in root.iter("layer"):
        lid = layer.get("id")
        precs = {p.get("precision") for p in layer.findall("./output/port")}
        layers[lid] = (layer.get("type"), bool(precs & FLOAT_PRECISIONS))
        elems[lid] = layer
    inputs: dict[str, list[str]] = {}
    for edge in root.iter("edge"):
        inputs.setdefault(edge.get("to-layer"), []).append(edge.get("from-layer"))
    # the IR lists layers in topological order already; keep it
    return layers, inputs, elems


def mark_fp32_islands(xml_path: str | Path) -> int:
    """Writes the ``precise`` attribute into every FP32-island layer of an IR's XML, in place; returns the count.

    Args:
        xml_path: the ``.xml`` of an OpenVINO IR (its ``.bin`` beside it is not touched).
    """
    from nafnet_core.fileio import atomic_path

    xml_path = Path(xml_path)
    tree = ET.parse(xml_path)
    layers, inputs, elems = _ir_graph(tree.getroot())
    marked = island_layers(layers, inputs)
    for lid in marked:
        layer = elems[lid]
        rt = layer.find("rt_info")
        if rt is None:
            rt = ET.SubElement(layer, "rt_info")
        if not any(a.get("name") == PRECISE for a in rt.findall("attribute")):
            ET.SubElement(rt, "attribute", {"name": PRECISE, "version": "0", "value": ""})
    with atomic_path(xml_path) as tmp:
        tree.write(tmp, encoding="utf-8", xml_declaration=True)
    return len(marked)


def island_report(model) -> dict[str, dict[str, int]]:
    """Per op type of a loaded ``ov.Model``: {"fp32": n marked, "bf16": n unmarked} over float ops."""
    out: dict[str, dict[str, int]] = {}
    for op in model.get_ordered_ops():
        if (not any(o.get_element_type().is_real() for o in op.outputs())
                or op.get_type_name() in ("Constant", "Result")):
            continue
        kept = any(k.startswith("DisablePrecisionConversion") for k in op.get_rt_info().keys())
        slot = out.setdefault(op.get_type_name(), {"fp32": 0, "bf16": 0})
        slot["fp32" if kept else "bf16"] += 1
    return out


def island_problems(model) -> list[str]:
    """What is wrong with the BF16 placement of a loaded ``ov.Model`` (empty = the islands are in place)."""
    report = island_report(model)
    problems = []
    for kind in ("MatMul", "CumSum", "ReduceMean", "Sqrt", "Divide"):
        if report.get(kind, {}).get("bf16"):
            problems.append(f"{report[kind]['bf16']} {kind} not kept in FP32 (LayerNorm/TLC statistics)")
    for kind in BF16_OPS:
        if report.get(kind, {}).get("fp32"):
            problems.append(f"{report[kind]['fp32']} {kind} kept in FP32 (no BF16 speed-up there)")
    result_feed = [op.input_value(0).get_node() for op in model.get_results()]
    for node in result_feed:  # the output (crop of the global residual) must be FP32
        if not any(k.startswith("DisablePrecisionConversion") for k in node.get_rt_info().keys()):
            problems.append(f"the output's producer {node.get_type_name()} (global residual / crop) is not FP32")
    if not any(report.get(k, {}).get("bf16") for k in BF16_OPS):
        problems.append("no convolution left to run in BF16")
    return problems


def write_ir(onnx_path: str | Path, xml_path: str | Path) -> tuple[Path, Path, int]:
    """ONNX -> OpenVINO IR (``.xml`` + ``.bin``, FP32 weights) with the FP32 islands marked; atomic per file.

    Returns (xml, bin, number of island layers)."""
    from nafnet_core.fileio import atomic_path

    ov = import_openvino()
    xml_path = Path(xml_path)
    bin_path = xml_path.with_suffix(".bin")
    model = ov.convert_model(str(onnx_path))
    with tempfile.TemporaryDirectory(dir=xml_path.parent, prefix=".ir-") as tmp:
        tmp_xml = Path(tmp) / "model.xml"
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        n = mark_fp32_islands(tmp_xml)
        with atomic_path(bin_path) as part:
            Path(tmp_xml.with_suffix(".bin")).replace(part)
        with atomic_path(xml_path) as part:
            tmp_xml.replace(part)
    return xml_path, bin_path, n


def read_marked(core, path: Path):
    """An ``ov.Model`` with the FP32 islands marked: an IR as written by :func:`write_ir` (islands re-marked if
    missing), or an ONNX converted through a temporary IR."""
    ov = import_openvino()
    with tempfile.TemporaryDirectory(prefix="nafnet-ov-") as tmp:
        tmp_xml = Path(tmp) / "model.xml"
        if path.suffix.lower() == ".xml":
            text = path.read_text(encoding="utf-8")
            if f'name="{PRECISE}"' in text:
                return core.read_model(str(path))
            tmp_xml.write_text(text, encoding="utf-8")
            bin_src = path.with_suffix(".bin")
            mark_fp32_islands(tmp_xml)
            return core.read_model(str(tmp_xml), str(bin_src))
        ov.save_model(core.read_model(str(path)), str(tmp_xml), compress_to_fp16=False)
        mark_fp32_islands(tmp_xml)
        return core.read_model(str(tmp_xml))  # the weights are read (or mapped) now; the folder may go
