"""The one table of export formats (like ultralytics' ``export_formats()``), keyed by name.

It drives :func:`export.export_model`, the manifest records and the CLI choices. An *artifact* is
one format at one input shape; its manifest key is ``<format>-<shape tag>`` (``onnx-fp16-512x512``)
and its file ``model-<precision>-<shape tag><suffix>`` (``model-fp16-512x512.onnx``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .shapes import ShapeSpec


@dataclass(frozen=True)
class Format:
    """One export format.

    Args:
        name: key in the table and prefix of artifact names.
        precision: ``fp32``, ``fp16`` or ``int8`` (compute precision of the convs; graph I/O is always FP32).
        suffix: file suffix.
        runtime: what runs it (``onnxruntime`` also covers any ONNX consumer; ``tensorrt``; ``openvino``).
        built_from: the format this one is converted from (None: from the PyTorch model).
        description: one line for ``--help`` and the README.
        stem: the precision part of the file name when two formats share a precision (default: ``precision``).
    """

    name: str
    precision: str
    suffix: str
    runtime: str
    built_from: str | None
    description: str
    stem: str = ""

    def artifact_name(self, spec: ShapeSpec) -> str:
        return f"{self.name}-{spec.tag}"

    def file_name(self, spec: ShapeSpec) -> str:
        return f"model-{self.stem or self.precision}-{spec.tag}{self.suffix}"


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("onnx-fp32", "fp32", ".onnx", "onnxruntime", None,
           "ONNX, FP32 throughout; TLC cumulative sums in FP32"),
    Format("onnx-fp16", "fp16", ".onnx", "onnxruntime", None,
           "ONNX, strongly typed mixed precision: FP16 convs/elementwise, FP32 LayerNorm, pooling, CumSum, "
           "global residual and I/O"),
    Format("trt-fp16", "fp16", ".engine", "tensorrt", "onnx-fp16",
           "TensorRT engine built from onnx-fp16 as written (strongly typed)"),
    Format("onnx-int8", "int8", ".onnx", "onnxruntime", "onnx-fp16",
           "ONNX Q/DQ (TensorRT's placement) in the FP16 graph: signed symmetric INT8 convs (per-channel weights), "
           "the convs that would exceed --int8-budget and everything else as in onnx-fp16 (FP16, FP32 islands)"),
    Format("onnx-int8-cpu", "int8", ".onnx", "onnxruntime", "onnx-fp32",
           "INT8 convs with an output Q each (onnxruntime CPU fuses QLinearConv), float parts FP32; written where "
           "faster than fp32 here", stem="int8cpu"),
    Format("trt-int8", "int8", ".engine", "tensorrt", "onnx-int8",
           "TensorRT engine built from onnx-int8 as written (explicit quantization, strongly typed)"),
    Format("openvino-fp32", "fp32", ".xml", "openvino", "onnx-fp32",
           "OpenVINO IR (.xml + .bin, FP32 weights) converted from onnx-fp32, its BF16 FP32 islands marked; runs "
           "fp32 or bf16"),
]}


def formats_for(fp16: bool, trt: bool, openvino: bool = False, int8: bool = False) -> list[Format]:
    """The formats an export writes: always onnx-fp32; onnx-fp16 with ``fp16``, ``trt`` or ``int8`` (the TensorRT
    INT8 form is built in it); the engine with ``trt``; the OpenVINO IR with ``openvino``; the INT8 graphs with
    ``int8`` (and their engine with ``trt``)."""
    names = ["onnx-fp32"] + (["onnx-fp16"] if fp16 or trt or int8 else []) \
        + (["onnx-int8", "onnx-int8-cpu"] if int8 else []) + (["trt-fp16"] if trt else []) \
        + (["trt-int8"] if trt and int8 else []) \
        + (["openvino-fp32"] if openvino else [])
    return [FORMATS[n] for n in names]
