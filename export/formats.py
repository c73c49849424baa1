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
        precision: ``fp32`` or ``fp16`` (compute precision of the convs; graph I/O is always FP32).
        suffix: file suffix.
        runtime: what runs it (``onnxruntime`` also covers any ONNX consumer; ``tensorrt``; ``openvino``).
        built_from: the format this one is converted from (None: from the PyTorch model).
        description: one line for ``--help`` and the README.
    """

    name: str
    precision: str
    suffix: str
    runtime: str
    built_from: str | None
    description: str

    def artifact_name(self, spec: ShapeSpec) -> str:
        return f"{self.name}-{spec.tag}"

    def file_name(self, spec: ShapeSpec) -> str:
        return f"model-{self.precision}-{spec.tag}{self.suffix}"


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("onnx-fp32", "fp32", ".onnx", "onnxruntime", None,
           "ONNX, FP32 throughout; TLC cumulative sums in FP32"),
    Format("onnx-fp16", "fp16", ".onnx", "onnxruntime", None,
           "ONNX, strongly typed mixed precision: FP16 convs/elementwise, FP32 LayerNorm, pooling, CumSum, "
           "global residual and I/O"),
    Format("trt-fp16", "fp16", ".engine", "tensorrt", "onnx-fp16",
           "TensorRT engine built from onnx-fp16 as written (strongly typed)"),
    Format("openvino-fp32", "fp32", ".xml", "openvino", "onnx-fp32",
           "OpenVINO IR (.xml + .bin, FP32 weights) converted from onnx-fp32, its BF16 FP32 islands marked; runs "
           "fp32 or bf16"),
]}


def formats_for(fp16: bool, trt: bool, openvino: bool = False) -> list[Format]:
    """The formats an export writes: always onnx-fp32; onnx-fp16 with ``fp16`` or ``trt``; the engine with ``trt``;
    the OpenVINO IR with ``openvino``."""
    names = ["onnx-fp32"] + (["onnx-fp16"] if fp16 or trt else []) + (["trt-fp16"] if trt else []) \
        + (["openvino-fp32"] if openvino else [])
    return [FORMATS[n] for n in names]
