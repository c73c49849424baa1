"""PyTorch -> ONNX with the dynamo exporter: dynamic or fixed-tile graphs, FP32 or mixed FP16.

FP16 placement is decided in one place, the PyTorch model code (``nafnet_core/model.py``,
``nafnet_core/tlc.py``): a ``model.half()`` computes LayerNorm2d, the pooling means and the TLC
cumulative sums in FP32 and casts back, takes FP32 input (cast after padding) and adds the global
residual in FP32. The FP16 graph is that half model exported as written, so ``torch`` half and the
ONNX graph have the same FP32 islands, and :func:`export.graph.fp16_placement_problems` asserts them.

A fixed tile exports with concrete shapes: every TLC window and slice bound is a Python int, so the
graph holds constants only (no Shape/Gather/Min/Mod). The dynamic graph keeps batch/height/width
symbolic (``torch.sym_min`` in TLC) and accepts any size >= 1, not only multiples of 16.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

from nafnet_core.fileio import atomic_path
from nafnet_core.model import NAFNet

from .shapes import ShapeSpec

INPUT_NAME = "input"
OUTPUT_NAME = "output"
DEFAULT_OPSET = 18
#: Protobuf cannot serialise one message above 2 GiB; no preset comes near (width64 fp32: 272 MB).
MAX_EMBEDDED_BYTES = 2**31 - 2**24

_NOISY_LOGGERS = ("torch.onnx", "torch.fx.experimental.symbolic_shapes", "torch.export", "torch._export",
                  "torch._dynamo", "onnxscript")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silences the exporter's progress prints, warnings and log lines (our CLI shows its own progress)."""
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def with_precision(model: NAFNet, precision: str, fp32_stream: list[str] | None = None) -> NAFNet:
    """``model`` for ``fp32``; a half copy for ``fp16`` (FP32 islands and FP32 I/O come from the model code,
    the stream of the ``fp32_stream`` stages stays FP32: :mod:`export.fp16_stream`)."""
    if precision == "fp32":
        return model
    if precision == "fp16":
        from .fp16_stream import to_half

        return to_half(model, fp32_stream)
    raise ValueError(f"precision must be fp32 or fp16, got {precision!r}")


def sample_input(spec: ShapeSpec, pad_multiple: int, channels: int = 3) -> torch.Tensor:
    """The tracing input: the tile itself, or (for dynamic graphs) batch 2 at a size that is not a
    multiple of the padding, so neither the batch nor the padding specialises to a constant."""
    g = torch.Generator().manual_seed(0)
    if spec.is_dynamic:
        shape = (2, channels, 2 * pad_multiple + 5, 3 * pad_multiple + 7)
    else:
        shape = (spec.batch, channels, spec.height, spec.width)
    return torch.rand(shape, generator=g)


def to_onnx_proto(model: NAFNet, spec: ShapeSpec, *, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Exports ``model`` (already folded / TLC / half as wanted) at ``spec``; FP32 input ``input``,
    output ``output``."""
    model = model.eval()
    x = sample_input(spec, model.config.pad_multiple, model.config.img_channel)
    dynamic_shapes = None
    if spec.is_dynamic:
        dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", min=1),
                3: torch.export.Dim("width", min=1)}
        dynamic_shapes = (dims,)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    opset_version=opset, dynamic_shapes=dynamic_shapes, optimize=True,
                                    verbose=False, external_data=False)
        proto = program.model_proto
    proto.producer_name = "nafnet-deblurring"
    return proto


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Replaces the ``nafnet.*`` entries of ``proto.metadata_props`` by ``metadata``."""
    keep = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith("nafnet.")]
    del proto.metadata_props[:]
    for key, value in keep + sorted(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_metadata(path_or_proto: str | Path | onnx.ModelProto) -> dict[str, str]:
    proto = path_or_proto if isinstance(path_or_proto, onnx.ModelProto) else onnx.load(str(path_or_proto),
                                                                                       load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def save_onnx(proto: onnx.ModelProto, path: str | Path) -> Path:
    """Writes ``proto`` as one self-contained file, atomically (weights embedded, not external data)."""
    size = proto.ByteSize()
    if size > MAX_EMBEDDED_BYTES:
        raise ValueError(f"{path}: the graph is {size / 2**30:.1f} GiB; ONNX files above 2 GiB need external "
                         "data, which this exporter does not write (no preset comes near this size)")
    with atomic_path(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    return Path(path)
