"""INT8 graphs: Q/DQ ONNX calibrated on the fp32 deploy graph's train crops, sensitive convs kept in float.

Placed the way the FP16 graph is placed: deliberately, measured, and checked by parity.

* **Quantization** (onnxruntime's ``quantize_static``, QDQ format): signed INT8 activations, symmetric, zero
  points 0 (TensorRT rejects UINT8 and asymmetric Q/DQ); weights per output channel (axis 0), symmetric; biases
  stay float (``QuantizeBias=False``); ``Conv`` is the only quantized op (``op_types_to_quantize=["Conv"]``):
  LayerNorm, gates, pooling, TLC sums and band means, PixelShuffle, the variants' FFT matrices and every
  residual add stay float. The graph is preprocessed with ``quant_pre_process(skip_optimization=True)`` so node
  and tensor names stay those of the fp32 graph, and convs are named by their weight (``encoders.0.0.conv3``).
* **Two forms.** ``qdq`` (the TensorRT form, NVIDIA's recommended placement: a Q/DQ pair on each quantized
  conv's activation input and its weight, no Q on its output, ``OpTypesToExcludeOutputQuantization=["Conv"]``),
  and ``cpu`` (an output Q/DQ after every quantized conv too, the pattern onnxruntime's CPU provider fuses into
  ``QLinearConv``/``QLinearMul``). Each form gets its own float list: the output Q adds error of its own.
* **Float parts.** The TensorRT form's are the FP16 graph's: FP16, with its FP32 islands (LayerNorm, pooling and
  TLC sums, the FFT matrices, an FP32 residual stream's convs, FP32 I/O). The search quantizes the fp32 graph
  (onnxruntime's calibration and quantizer take FP32 graphs only), and each of its graphs is carried into the FP16
  graph (:func:`fp16_form`): a Q/DQ pair on the activation input of every conv INT8 there and its weight INT8 per
  channel with a DQ, with the same scales, in FP16 where the conv computes in FP16 (rounded up to an FP16 value,
  the weights quantized again with it) and FP32 where the FP16 graph keeps the conv in FP32 (``nafnet.fp32_convs``).
  FP16 scales need opset 19 (DequantizeLinear 13-18 has FP32 scales only), which TensorRT >= 10.0 parses (9-20),
  so the form's opset is raised to 19. The budget is measured on that graph, so every step of the search includes
  the FP16 roundings (onnxruntime's CPU provider computes the FP16 nodes it has no kernel for in FP32, between
  casts, so it may under-state FP16 arithmetic; the FP16 graph's own numerics are checked by PyTorch half,
  ``export lint --checkpoint``); the record also has the ΔPSNR of the same convs with FP32 float parts. The cpu
  form's float parts stay FP32: onnxruntime's x86 CPU provider has no FP16 conv kernels and would cast every FP16
  node to FP32 and back.
  ``export lint`` checks each form's float parts (the FP16 placement rules, or all FP32) and scale types.
* **Calibration** on crops of the **train** split (the embedded synthetic set unless ``data`` names another)
  at the graph's shape: the tile size for a fixed tile (an image smaller than the tile is mirrored out to it),
  the whole image for the dynamic graph. Methods: ``minmax``, ``percentile`` (99.999th), ``entropy``
  (:data:`CALIBRATION_METHODS`). The ranges are computed once per graph (onnxruntime's calibration cache) and
  reused by every quantization of the greedy search.
* **Sensitive convs by measurement.** Each quantized conv is scored by onnxruntime's QDQ debugging tools
  (``qdq_loss_debug``): the SQNR of every tensor it quantizes (activation input, weight, and in the cpu form its
  output), combined as noise powers add. The worst are returned to float (``nodes_to_exclude``), k = 0, 1, 2,
  4, ... then bisected, until the val-split |ΔPSNR| against PyTorch fp32 is within ``budget_db``; the smallest
  k found is kept. When the budget needs every conv in float there is no INT8 graph (:class:`Int8BudgetError`).

ΔPSNR here is measured on the **val** split at the graph's shape (crops fitted as for calibration, the same
pixels for PyTorch fp32 and the INT8 graph, uint8-rounded outputs against the sharp crop, mean over images);
``parity`` checks the export on the **test** split, whole and tiled, against the same budget.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from nafnet_core.errors import UserError

#: Calibration methods: option value -> onnxruntime CalibrationMethod name.
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
#: The default calibration method (the three compared in BENCHMARKS.md, "INT8").
DEFAULT_CALIBRATION = "minmax"
#: Default |ΔPSNR| budget (dB) on the val split against PyTorch fp32.
DEFAULT_BUDGET_DB = 0.10
#: Default number of train crops the ranges are calibrated on.
DEFAULT_CROPS = 16
#: Val images the budget is measured on (at most).
DEFAULT_VAL_IMAGES = 8
#: Percentile of |activation| the ``percentile`` method keeps.
PERCENTILE = 99.999
#: The forms of an INT8 graph: ``qdq`` (TensorRT's placement) and ``cpu`` (an output Q after each quantized conv).
FORMS = ("qdq", "cpu")
#: Where the cpu form is written: ``auto`` (when it is faster than the fp32 graph in onnxruntime here, measured at
#: export), ``always``, ``never``.
CPU_FORM_CHOICES = ("auto", "always", "never")


class Int8BudgetError(UserError):
    """The INT8 budget cannot be met with any conv quantized; no INT8 file was written."""


@dataclass(frozen=True)
class Int8Options:
    """How ``export --int8`` quantizes.

    Attributes:
        budget_db: largest val-split |ΔPSNR| (dB) against PyTorch fp32.
        calibration: a key of :data:`CALIBRATION_METHODS`.
        data: data set root for calibration (train split) and the budget (val split); None: the synthetic set.
        crops: train crops to calibrate on.
        val_images: val images to measure the budget on (at most).
        cpu_form: ``auto``, ``always`` or ``never`` (:data:`CPU_FORM_CHOICES`).
        seed: crop positions.
    """

    budget_db: float = DEFAULT_BUDGET_DB
    calibration: str = DEFAULT_CALIBRATION
    data: str | Path | None = None
    crops: int = DEFAULT_CROPS
    val_images: int = DEFAULT_VAL_IMAGES
    cpu_form: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATION_METHODS:
            raise UserError(f"INT8 calibration {self.calibration!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
        if not self.budget_db > 0:
            raise UserError(f"--int8-budget {self.budget_db}: the budget must be a positive number of dB")
        if self.crops < 1 or self.val_images < 1:
            raise UserError("INT8 calibration needs at least one train crop and one val image")
        if self.cpu_form not in CPU_FORM_CHOICES:
            raise UserError(f"INT8 cpu form {self.cpu_form!r}: choose one of {', '.join(CPU_FORM_CHOICES)}")


# --------------------------------------------------------------------------------------------- data


def data_root(options: Int8Options, progress: bool = False) -> Path:
    if options.data is not None:
        return Path(options.data)
    from nafnet_core.synth import ensure_synthetic

    return ensure_synthetic(progress=progress)


def _split_images(root: Path, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from nafnet_core.data import load_pairs
    from nafnet_core.images import read_image, to_tensor

    pairs = load_pairs(root)
    if not pairs.get(split):
        raise UserError(f"{root}: no {split} pairs for INT8 calibration/validation; pass --data with a data set "
                        f"that has a {split} split")
    return [(to_tensor(read_image(p.blur)), to_tensor(read_image(p.sharp))) for p in pairs[split]]


def _mirror_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``x`` (N, C, H, W) mirrored out (symmetric) until it is at least h x w."""
    while x.shape[-2] < h or x.shape[-1] < w:
        ph, pw = min(max(h - x.shape[-2], 0), x.shape[-2]), min(max(w - x.shape[-1], 0), x.shape[-1])
        x = torch.cat([x, x.flip(-2)[..., :ph, :]], -2) if ph else x
        x = torch.cat([x, x.flip(-1)[..., :pw]], -1) if pw else x
    return x


def fit(images: list[torch.Tensor], shape: tuple[int, int] | None,
        rng: np.random.Generator | None) -> list[torch.Tensor]:
    """The same crop of every tensor in ``images`` (one pair: blur and sharp) at ``shape`` (None: whole):
    mirrored out where smaller, at a random position (``rng``) or the centre (None)."""
    if shape is None:
        return images
    h, w = shape
    images = [_mirror_to(x, h, w) for x in images]
    H, W = images[0].shape[-2:]
    top = int(rng.integers(0, H - h + 1)) if rng is not None else (H - h) // 2
    left = int(rng.integers(0, W - w + 1)) if rng is not None else (W - w) // 2
    return [x[..., top:top + h, left:left + w].contiguous() for x in images]


def calibration_inputs(root: Path, shape: tuple[int, int] | None, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` train-split crops (1, 3, h, w) float32 at ``shape`` (None: whole images), cycling the images."""
    rng = np.random.default_rng(seed)
    train = _split_images(root, "train")
    return [fit([train[i % len(train)][0]], shape, rng)[0].numpy() for i in range(count)]


def val_inputs(root: Path, shape: tuple[int, int] | None, count: int) -> list[tuple[np.ndarray, torch.Tensor]]:
    """(blur crop as float32 array, sharp crop tensor) of the first ``count`` val pairs, centred at ``shape``."""
    return [(b.numpy(), s) for b, s in (fit(list(pair), shape, None) for pair in _split_images(root, "val")[:count])]


class _Reader:
    """An onnxruntime CalibrationDataReader over a list of inputs."""

    def __init__(self, inputs: list[np.ndarray], name: str = "input"):
        self.inputs, self.name = inputs, name
        self._it = iter(inputs)

    def get_next(self):
        x = next(self._it, None)
        return None if x is None else {self.name: x}

    def __iter__(self):
        return ({self.name: x} for x in self.inputs)

    def __len__(self) -> int:
        return len(self.inputs)


# --------------------------------------------------------------------------------------------- quantization


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime.quantization logs a line per call (pre-processing hints) and its histogram calibrators print to
    stdout; our progress is our own."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def conv_names(model: onnx.ModelProto) -> dict[str, str]:
    """Conv key -> node name, the key being the conv's weight name without ``.weight`` (``encoders.0.0.conv3``):
    the PyTorch module path, the same in every graph of an export."""
    out = {}
    for n in model.graph.node:
        if n.op_type == "Conv":
            key = n.input[1][:-len(".weight")] if n.input[1].endswith(".weight") else n.input[1]
            out[key] = n.name
    return out


def quantize(pre_path: Path, out_path: Path, inputs: list[np.ndarray], cache: Path, method: str,
             exclude: list[str], form: str) -> Path:
    """Writes the Q/DQ graph of ``pre_path`` (preprocessed fp32) with the convs ``exclude`` (keys) in float.

    The ranges come from ``cache`` (computed on ``inputs`` with ``method`` on the first call)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(pre_path))
    names = conv_names(model)
    unknown = [k for k in exclude if k not in names]
    if unknown:
        raise ValueError(f"no conv {', '.join(unknown)} in {pre_path.name}")
    extra: dict[str, Any] = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                             "CalibPercentile": PERCENTILE}
    if form == "qdq":
        extra["OpTypesToExcludeOutputQuantization"] = ["Conv"]
    elif form != "cpu":
        raise ValueError(f"INT8 form must be one of {FORMS}, got {form!r}")
    with _quiet():
        quantize_static(str(pre_path), str(out_path), _Reader(inputs), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv"], per_channel=True, reduce_range=False,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=[names[k] for k in exclude],
                        calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                        extra_options=extra, calibration_cache_path=str(cache))
    model = onnx.load(str(out_path))
    if keep_float_consumers(model, form):
        onnx.save(model, str(out_path))
    return out_path


def keep_float_consumers(model: onnx.ModelProto, form: str) -> int:
    """Rewires the non-conv readers of a Q/DQ'd tensor to the float tensor itself, in place; returns how many.

    onnxruntime shares one Q/DQ pair between all readers of a tensor, so the input quantization of a conv also
    reaches the residual add or the Pad that reads the same tensor. Here only convs read dequantized values,
    except, in the ``cpu`` form, the readers of a quantized conv's own output (that output Q is the form's
    point: onnxruntime then fuses DQ -> Conv -> Q into one integer conv). Q/DQ pairs left unread are removed."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    dq_of = {n.input[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    changed = 0
    for q in [n for n in g.node if n.op_type == "QuantizeLinear"]:
        dq = dq_of.get(q.output[0])
        origin = producer.get(q.input[0])
        if dq is None or (form == "cpu" and origin is not None and origin.op_type == "Conv"):
            continue
        for n in g.node:
            if n.op_type != "Conv":
                for i, name in enumerate(n.input):
                    if name == dq.output[0]:
                        n.input[i] = q.input[0]
                        changed += 1
    for out in g.output:  # a graph output must stay float too
        if out.name in dq_of:
            changed += 1
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for _ in range(2):  # an unread DQ, then the Q it read
        dead = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in read]
        for n in dead:
            g.node.remove(n)
        read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    return changed


#: What the float parts of each form compute in (manifest and metadata ``float_parts``): the TensorRT form's are
#: the FP16 graph's (FP16 with its FP32 islands), the cpu form's FP32 (onnxruntime's x86 CPU provider has no FP16
#: conv kernels: it would cast every FP16 conv to FP32 and back).
FLOAT_PARTS = {"qdq": "fp16-fp32-islands", "cpu": "fp32"}
#: The opset of the FP16 form: QuantizeLinear/DequantizeLinear take FP16 scales from opset 19 (13-18: FP32 only).
FP16_QDQ_OPSET = 19


def conv_key(weight: str) -> str:
    """The conv key of a (quantized) weight name: ``encoders.0.0.conv3.weight_quantized`` -> ``encoders.0.0.conv3``."""
    return weight.removesuffix("_quantized").removesuffix(".weight")


def fp16_at_least(scale: np.ndarray) -> np.ndarray:
    """The smallest FP16 value >= each (positive) FP32 ``scale``: as an FP16 scale it clips nothing the FP32 one
    kept. Raises ValueError beyond FP16's range."""
    s = np.atleast_1d(np.asarray(scale, np.float32))
    s = np.maximum(s, np.float32(2.0**-24))  # FP16's smallest subnormal: TensorRT takes positive scales only
    h = s.astype(np.float16)
    low = h.astype(np.float32) < s
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    if not np.isfinite(h).all():
        raise ValueError(f"an INT8 scale of {float(s.max()):.4g} is beyond FP16's range")
    return h.reshape(np.shape(scale))


def _quantized_convs(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Conv key -> (activation scale, weight scales, INT8 weights) of every INT8 conv of a Q/DQ graph."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        wdq = producer.get(n.input[1]) if n.op_type == "Conv" else None
        if wdq is None or wdq.op_type != "DequantizeLinear":
            continue
        xdq = producer[n.input[0]]
        out[conv_key(wdq.input[0])] = tuple(onnx.numpy_helper.to_array(inits[name])
                                            for name in (xdq.input[1], wdq.input[1], wdq.input[0]))
    return out


def _fp32_key(weight: str, keys: set[str]) -> str:
    """The fp32 graph's key of an FP16 graph conv: the same, or for a conv the FP16 graph computes in FP32
    (``export.fp16_stream.Fp32Conv``, weight ``intro.conv.weight``) the key without ``.conv``."""
    stem = weight.removesuffix(".weight")
    if stem in keys:
        return stem
    if stem.endswith(".conv") and stem[:-len(".conv")] in keys:
        return stem[:-len(".conv")]
    raise ValueError(f"conv {stem} of the FP16 graph has no counterpart in the fp32 graph")


def fp16_form(qdq_path: Path, fp16_path: Path, fp32_path: Path, out_path: Path) -> Path:
    """Writes the TensorRT form with FP16 float parts: the FP16 graph (``fp16_path``, FP32 islands and I/O as
    exported) with a Q/DQ pair on the activation input and an INT8 per-channel weight with its DQ for every conv
    that is INT8 in ``qdq_path`` (the qdq form of the fp32 graph), with its scales.

    Scales have the type the conv computes in: for an FP16 conv the smallest FP16 value at or above each FP32 scale
    (:func:`fp16_at_least`; the weights are quantized again from the fp32 graph's ``fp32_path`` with those scales,
    within [-127, 127]), for a conv the FP16 graph keeps in FP32 (``nafnet.fp32_convs``) the FP32 scales and weights
    as they are. Zero points INT8 0. The opset becomes at least :data:`FP16_QDQ_OPSET`; every conv's weight is named
    by its fp32 key (``<key>.weight``)."""
    from onnx import TensorProto, helper, numpy_helper

    from .graph import tensor_types

    quant = _quantized_convs(onnx.load(str(qdq_path)))
    fp32 = onnx.load(str(fp32_path))
    keys = set(conv_names(fp32))
    weights = {t.name: t for t in fp32.graph.initializer if conv_key(t.name) in quant}
    model = onnx.load(str(fp16_path))
    g = model.graph
    types = tensor_types(model)
    inits = {t.name: t for t in g.initializer}
    nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    dequantized: dict[tuple[str, bytes, str], str] = {}  # (tensor, scale bytes, dtype) -> its DQ output
    for node in g.node:
        n = onnx.NodeProto()
        n.CopyFrom(node)
        if n.op_type != "Conv":
            nodes.append(n)
            continue
        key = _fp32_key(n.input[1], keys)
        weight = f"{key}.weight"
        if key not in quant:
            if n.input[1] != weight:  # a float FP32 conv of the FP16 graph: named by its key
                t = onnx.TensorProto()
                t.CopyFrom(inits[n.input[1]])
                t.name = weight
                added.append(t)
                n.input[1] = weight
            nodes.append(n)
            continue
        x_scale, w_scale, w_int8 = quant[key]
        if types.get(n.input[0]) == TensorProto.FLOAT16:
            x_scale, w_scale = fp16_at_least(x_scale), fp16_at_least(w_scale)
            w = numpy_helper.to_array(weights[weight]).astype(np.float32)
            w_int8 = np.clip(np.round(w / w_scale.astype(np.float32).reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
        elif types.get(n.input[0]) != TensorProto.FLOAT:
            raise ValueError(f"conv {key} of the FP16 graph reads {n.input[0]} of type {types.get(n.input[0])}")
        x = n.input[0]
        tag = (x, x_scale.tobytes(), x_scale.dtype.str)
        if tag not in dequantized:
            base = x if not any(t[0] == x for t in dequantized) else f"{x}_{len(dequantized)}"
            added += [numpy_helper.from_array(x_scale, f"{base}_scale"),
                      numpy_helper.from_array(np.array(0, np.int8), f"{base}_zero_point")]
            nodes += [helper.make_node("QuantizeLinear", [x, f"{base}_scale", f"{base}_zero_point"],
                                       [f"{base}_QuantizeLinear_Output"], name=f"{base}_QuantizeLinear"),
                      helper.make_node("DequantizeLinear", [f"{base}_QuantizeLinear_Output", f"{base}_scale",
                                                            f"{base}_zero_point"],
                                       [f"{base}_DequantizeLinear_Output"], name=f"{base}_DequantizeLinear")]
            dequantized[tag] = f"{base}_DequantizeLinear_Output"
        added += [numpy_helper.from_array(w_int8, f"{weight}_quantized"),
                  numpy_helper.from_array(w_scale, f"{weight}_scale"),
                  numpy_helper.from_array(np.zeros(w_scale.shape, np.int8), f"{weight}_zero_point")]
        nodes.append(helper.make_node("DequantizeLinear", [f"{weight}_quantized", f"{weight}_scale",
                                                           f"{weight}_zero_point"],
                                      [f"{weight}_DequantizeLinear_Output"], name=f"{weight}_DequantizeLinear", axis=0))
        n.input[0], n.input[1] = dequantized[tag], f"{weight}_DequantizeLinear_Output"
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(added)
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    kept = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(kept)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, FP16_QDQ_OPSET)
    model.ir_version = max(model.ir_version, 9)  # opset 19's IR
    del g.value_info[:]  # the FP16 graph's inferred types; the Q/DQ outputs have their own
    onnx.save(model, str(out_path))
    return out_path


def preprocess(fp32_path: Path, out_path: Path) -> Path:
    """``quant_pre_process`` with ``skip_optimization`` (node and tensor names kept) and ONNX's own shape inference:
    onnxruntime's symbolic shape inference gives up on the dynamic TLC graphs (and then leaves a temporary model in
    the working directory), and the Conv-only quantization needs no more than ONNX's shapes."""
    from onnxruntime.quantization.preprocess import quant_pre_process

    with _quiet():
        quant_pre_process(str(fp32_path), str(out_path), skip_optimization=True, skip_symbolic_shape=True)
    return out_path


def conv_sqnr(fp32_path: Path, qdq_path: Path, inputs: list[np.ndarray], work: Path) -> dict[str, float]:
    """Conv key -> SQNR (dB) of the quantized conv's output, each conv alone: its float output on the float
    activations (collected from the fp32 graph) against the same conv on
    those activations and weights quantized with the graph's scales (and, in the cpu form, its output quantized
    too), scored by ``qdq_loss_debug``'s SQNR. Lower is worse; convs left in float are absent.

    Why the output and not the activation tensor (``qdq_err``): a tensor's SQNR is dominated by its largest
    channels, so a long-tailed channel that takes the whole INT8 range still scores well while the other channels
    round to zero; the conv's output shows what that costs (tests/test_export_int8.py, the outlier layer).
    """
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio

    acts = _conv_inputs(fp32_path, inputs)
    model = onnx.load(str(qdq_path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    out: dict[str, float] = {}
    for n in model.graph.node:
        wdq = producer.get(n.input[1]) if n.op_type == "Conv" else None
        xdq = producer.get(n.input[0]) if wdq is not None else None
        if wdq is None or wdq.op_type != "DequantizeLinear" or xdq is None or xdq.op_type != "DequantizeLinear":
            continue
        xq = producer[xdq.input[0]]
        w = torch.from_numpy(inits[wdq.input[0]].astype(np.float32))
        w_scale = torch.from_numpy(inits[wdq.input[1]].astype(np.float32)).view(-1, 1, 1, 1)
        x_scale = float(inits[xdq.input[1]])
        bias = torch.from_numpy(inits[n.input[2]].copy()) if len(n.input) > 2 and n.input[2] in inits else None
        out_q = next((r for r in readers.get(n.output[0], []) if r.op_type == "QuantizeLinear"), None)
        out_scale = float(inits[out_q.input[1]]) if out_q is not None else None
        weight_float = _float_weight(fp32_path, wdq.input[0])
        ref, noisy = [], []
        for x in acts[xq.input[0]]:
            x = torch.from_numpy(x)
            ref.append(_conv(n, x, weight_float, bias).numpy())
            y = _conv(n, _fake_quant(x, x_scale), w * w_scale, bias)
            noisy.append((y if out_scale is None else _fake_quant(y, out_scale)).numpy())
        key = wdq.input[0].removesuffix("_quantized").removesuffix(".weight")
        out[key] = compute_signal_to_quantization_noice_ratio(ref, noisy)
    return out


def _conv_inputs(fp32_path: Path, inputs: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Tensor name -> its values on ``inputs``, for the activation input of every conv of the fp32 graph."""
    import onnxruntime as ort

    model = onnx.load(str(fp32_path))
    names = list(dict.fromkeys(n.input[0] for n in model.graph.node if n.op_type == "Conv"))
    known = {o.name for o in model.graph.output}
    for name in names:
        if name not in known:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    acts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for x in inputs:
        for name, value in zip(names, sess.run(names, {"input": x})):
            acts[name].append(value)
    return acts


_WEIGHTS: dict[tuple[str, str], torch.Tensor] = {}


def _float_weight(fp32_path: Path, quantized_name: str) -> torch.Tensor:
    """The fp32 graph's weight behind a ``<name>_quantized`` initializer."""
    name = quantized_name.removesuffix("_quantized")
    key = (str(fp32_path), name)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        model = onnx.load(str(fp32_path))
        for t in model.graph.initializer:
            _WEIGHTS[(str(fp32_path), t.name)] = torch.from_numpy(onnx.numpy_helper.to_array(t).copy())
    return _WEIGHTS[key]


def _fake_quant(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric signed INT8 quantize-dequantize (ONNX QuantizeLinear: round half to even, saturate)."""
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def _conv(node: onnx.NodeProto, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    import torch.nn.functional as F

    a = {att.name: onnx.helper.get_attribute_value(att) for att in node.attribute}
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if any(pads):
        x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
    return F.conv2d(x, w, b, stride=tuple(a.get("strides", [1, 1])), dilation=tuple(a.get("dilations", [1, 1])),
                    groups=int(a.get("group", 1)))


# --------------------------------------------------------------------------------------------- the budget


def _psnr_db(out: torch.Tensor, sharp: torch.Tensor) -> float:
    from nafnet_core.metrics import psnr
    from nafnet_core.metrics import quantize as to_uint8

    return float(psnr(to_uint8(out.clamp(0, 1)), to_uint8(sharp)).mean())


class Validator:
    """ΔPSNR of a graph against PyTorch fp32 on fixed val crops (:func:`val_inputs`)."""

    def __init__(self, reference: torch.nn.Module, val: list[tuple[np.ndarray, torch.Tensor]]):
        self.val = val
        with torch.no_grad():
            self.ref_db = [_psnr_db(reference(torch.from_numpy(x)), s) for x, s in val]

    def delta_db(self, path: Path) -> float:
        sess = cpu_session(path)
        dbs = [_psnr_db(torch.from_numpy(sess.run(None, {"input": x})[0]), s) for x, s in self.val]
        return float(np.mean(dbs) - np.mean(self.ref_db))


@dataclass
class Int8Result:
    """One INT8 graph: its form, the convs kept in float (worst SQNR first) and the measured val ΔPSNR."""

    form: str
    float_convs: list[str]
    quantized_convs: int
    delta_db: float
    sqnr_db: dict[str, float]
    trials: list[tuple[int, float]] = field(default_factory=list)
    float_parts: str = "fp32"
    opset: int | None = None
    fp32_parts_delta_db: float | None = None

    def record(self, budget: float) -> dict[str, Any]:
        out = {"form": self.form, "float_parts": self.float_parts, "quantized_convs": self.quantized_convs,
               "float_convs": [{"conv": k, "sqnr_db": _round(self.sqnr_db.get(k))} for k in self.float_convs],
               "val_delta_psnr_db": round(self.delta_db, 4), "budget_db": budget,
               "search": [{"float_convs": k, "val_delta_psnr_db": round(d, 4)} for k, d in self.trials]}
        if self.opset is not None:
            out["opset"] = self.opset
        if self.fp32_parts_delta_db is not None:  # the same convs and scales with FP32 float parts
            out["val_delta_psnr_db_fp32_parts"] = round(self.fp32_parts_delta_db, 4)
        return out


def _round(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(v, 2)


def search(total: int, measure: Callable[[int], float], budget: float) -> tuple[int | None, list[tuple[int, float]]]:
    """The smallest k (convs returned to float, worst first) with |measure(k)| <= budget: k = 0, 1, 2, 4, ... up
    to ``total - 1`` (at least one conv quantized), then bisection between the last failing and the first passing
    k. Returns (k or None when no k < total passes, [(k, ΔPSNR) in the order measured])."""
    trials: list[tuple[int, float]] = []
    seen: dict[int, float] = {}

    def ok(k: int) -> bool:
        if k not in seen:
            seen[k] = measure(k)
            trials.append((k, seen[k]))
        return abs(seen[k]) <= budget

    if total < 1:
        return None, trials
    lo, k = -1, 0
    while not ok(k):
        lo = k
        if k >= total - 1:
            return None, trials
        k = min(max(1, 2 * k), total - 1)
    hi = k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi, trials


def quantize_graph(fp32_path: Path, out_path: Path, reference: torch.nn.Module, shape: tuple[int, int] | None,
                   options: Int8Options, form: str, root: Path, work: Path,
                   log: Callable[[str], None] = lambda s: None, fp16_path: Path | None = None) -> Int8Result:
    """Quantizes ``fp32_path`` into ``out_path`` in ``form`` within the budget (see the module docstring).

    With ``fp16_path`` (the FP16 graph of the same shape) the ``qdq`` form is written with FP16 float parts
    (:func:`fp16_form`) and every step of the search measures that graph; without it, or in the ``cpu`` form, the
    float parts are FP32. Raises :class:`Int8BudgetError` (``out_path`` not written) when the budget needs every
    conv in float."""
    fp16 = form == "qdq" and fp16_path is not None
    pre = preprocess(fp32_path, work / f"pre-{form}.onnx")
    cache = work / f"ranges-{options.calibration}.json"
    calib = calibration_inputs(root, shape, options.crops, options.seed)
    validator = Validator(reference, val_inputs(root, shape, options.val_images))
    trial = work / f"trial-{form}.onnx"
    final = work / f"trial-{form}-fp16.onnx" if fp16 else trial
    label = f"{form} (FP16 float parts)" if fp16 else form
    start = time.perf_counter()
    quantize(pre, trial, calib, cache, options.calibration, [], form)
    sqnr = conv_sqnr(pre, trial, calib[:2], work)
    order = sorted(sqnr, key=lambda k: sqnr[k])  # worst first
    log(f"  {form}: {len(order)} convs ranked by SQNR ({time.perf_counter() - start:.0f} s); worst: "
        + ", ".join(f"{k} {sqnr[k]:.1f} dB" for k in order[:3]))

    def build(k: int) -> Path:
        quantize(pre, trial, calib, cache, options.calibration, order[:k], form)
        return fp16_form(trial, fp16_path, pre, final) if fp16 else trial

    def measure(k: int) -> float:
        d = validator.delta_db(build(k))
        log(f"  {label}: {k} conv(s) in float: val ΔPSNR {d:+.4f} dB")
        return d

    k, trials = search(len(order), measure, options.budget_db)
    if k is None:
        worst = ", ".join(f"k={kk}: {d:+.3f} dB" for kk, d in trials)
        raise Int8BudgetError(f"INT8 ({label} form) cannot meet --int8-budget {options.budget_db} dB with any conv "
                              f"quantized (val |ΔPSNR| with the worst k convs in float: {worst}); no INT8 file "
                              "written: raise the budget, try --int8-calibration percentile/entropy, or use FP16")
    if trials[-1][0] != k:  # the file on disk is from the last trial: rebuild the chosen one
        build(k)
    fp32_parts = validator.delta_db(trial) if fp16 else None  # what the FP16 float parts add
    shutil.move(str(final), str(out_path))
    opset = next(o.version for o in onnx.load(str(out_path)).opset_import if o.domain in ("", "ai.onnx")) \
        if fp16 else None
    return Int8Result(form, order[:k], len(order) - k, dict(trials)[k], sqnr, trials,
                      float_parts=FLOAT_PARTS[form] if fp16 else "fp32", opset=opset, fp32_parts_delta_db=fp32_parts)


def cpu_session(path: str | Path):
    """An onnxruntime CPU session that logs errors only: on the FP16 form its constant folding warns, once per
    FP16 weight DQ, that it has no FP16 CPU kernel to fold with (it computes them unfolded)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_latency_ms(path: str | Path, x: np.ndarray, rounds: int = 3) -> float:
    """Median ms of ``path`` on onnxruntime CPU at ``x`` (one warm-up)."""
    sess = cpu_session(path)
    sess.run(None, {"input": x})
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        sess.run(None, {"input": x})
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def work_dir(out_dir: Path) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=".int8-", dir=out_dir)


def progress_log(enabled: bool) -> Callable[[str], None]:
    return (lambda s: print(s, file=sys.stderr)) if enabled else (lambda s: None)
