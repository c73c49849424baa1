"""FP32 residual streams inside the FP16 graph, for checkpoints whose stream would overflow FP16.

In the FP16 graph the residual stream of every block (its input, ``inp + conv3(...)`` and
``y + conv5(...)``) is an FP16 tensor. If a checkpoint drives it past 65504 the graph computes inf and
then NaN. Export measures the stream on sample photos (FP32 hooks, :func:`export.ranges.fp16_range_report`)
and keeps the stream of the affected *stages* in FP32:

* every block of the stage (``fp32_stream = True``, see ``nafnet_core/model.py``): input cast to FP32,
  conv3/conv5 outputs cast to FP32 for the two adds, LayerNorm (FP32 anyway) reading the FP32 stream and
  handing FP16 to the convs — the convs and gates stay FP16;
* the convs that write the stage's input (``intro``, ``downs.i`` or ``ups.j.0``) and read its output
  (``downs.i``, ``ups.j.0`` or ``ending``) compute in FP32 on FP32 weights (:class:`Fp32Conv`): a value
  above 65504 can be neither the FP16 output of the first nor the FP16 input of the second;
* an encoder stage's mirrored decoder stage, which receives its output through the skip.

Whole stages, not single blocks: the stream accumulates along a stage, so the blocks after an
overflowing one carry the same magnitude up to the conv at the stage's end.

Margin (:data:`STREAM_MARGIN`): a stage is kept in FP32 when its stream exceeds 65504 / 4 on the sample
photos. Other images reach higher values (brighter, more saturated or more textured content than the
bundled photos; the stream scales with the input's contrast), and an add of two FP16 values each below
the limit can still overflow, so a 4x margin keeps FP16 where it is safe by a clear distance and costs
little where it triggers (FP32 adds and two FP32 convs per stage). Official NAFNet checkpoints stay far
below it (their stream reaches a few hundred), so their FP16 graphs are unchanged.

The PyTorch half model built by :func:`to_half` computes exactly what the FP16 graph computes (the FP16
ONNX is that model exported as written).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from nafnet_core.model import NAFNet

FP16_MAX = 65504.0
#: A stage's stream is kept in FP32 when it exceeds FP16_MAX / STREAM_MARGIN on the sample photos.
STREAM_MARGIN = 4.0
#: Size of the sample photos the export measures the stream on.
SAMPLE_HW = (256, 256)


class Fp32Conv(nn.Module):
    """A conv computed in FP32 on FP32 weights, returning ``out_dtype``: the reader of an FP32 stream.

    Args:
        conv: the conv with FP32 weights (taken from the FP32 model, not the half one).
        out_dtype: dtype of the output (FP32 when the next stage's stream is FP32 too, else FP16).
    """

    def __init__(self, conv: nn.Conv2d, out_dtype: torch.dtype):
        super().__init__()
        self.conv = conv
        self.out_dtype = out_dtype

    @property
    def weight(self) -> torch.Tensor:
        """The conv's FP32 weight (``NAFNet.forward`` casts the image to ``intro.weight.dtype``)."""
        return self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.float()).to(self.out_dtype)


def stage_names(model: NAFNet) -> list[str]:
    """``encoders.0`` ... ``middle_blks`` ... ``decoders.N`` in forward order."""
    n = len(model.encoders)
    return [f"encoders.{i}" for i in range(n)] + ["middle_blks"] + [f"decoders.{j}" for j in range(n)]


def stage_of(block: str) -> str:
    """``encoders.0.1`` -> ``encoders.0``; ``middle_blks.3`` -> ``middle_blks``."""
    parts = block.split(".")
    return parts[0] if parts[0] == "middle_blks" else ".".join(parts[:2])


def _convs(levels: int) -> list[tuple[str, str | None, str | None]]:
    """(conv, stage it reads, stage it writes) for the convs between stages, in forward order."""
    out = [("intro", None, "encoders.0")]
    out += [(f"downs.{i}", f"encoders.{i}", f"encoders.{i + 1}" if i + 1 < levels else "middle_blks")
            for i in range(levels)]
    out += [(f"ups.{j}.0", f"decoders.{j - 1}" if j else "middle_blks", f"decoders.{j}") for j in range(levels)]
    return out + [("ending", f"decoders.{levels - 1}", None)]


def fp32_stream_stages(stream_max: dict[str, float], levels: int, margin: float = STREAM_MARGIN) -> list[str]:
    """Stages to keep in FP32: those with a block whose stream exceeds ``FP16_MAX / margin``, plus the
    mirrored decoder of every such encoder (it receives the stream through the skip), in forward order.

    Args:
        stream_max: block name -> largest |stream| (``BlockRange.max_stream``).
        levels: number of encoder levels of the model.
        margin: safety factor below FP16's maximum.
    """
    hot = {stage_of(b) for b, v in stream_max.items() if v > FP16_MAX / margin}
    hot |= {f"decoders.{levels - 1 - int(s.split('.')[1])}" for s in hot if s.startswith("encoders.")}
    order = [f"encoders.{i}" for i in range(levels)] + ["middle_blks"] + [f"decoders.{j}" for j in range(levels)]
    return [s for s in order if s in hot]


def fp32_convs(stages: list[str], levels: int) -> list[str]:
    """The convs computed in FP32 for ``stages``: those writing into or reading from one, in forward order."""
    return [conv for conv, reads, writes in _convs(levels) if reads in stages or writes in stages]


def to_half(model: NAFNet, stages: list[str] | None = None) -> NAFNet:
    """A half copy of ``model`` (FP32 islands from the model code) with the stream of ``stages`` in FP32.

    Args:
        model: the FP32 model (deploy form or not); untouched.
        stages: stage names from :func:`fp32_stream_stages` (None or empty: a plain ``.half()``).
    """
    half = copy.deepcopy(model).half().eval()
    levels = len(model.encoders)
    stages = list(stages or [])
    for stage in stages:
        for block in half.get_submodule(stage):
            if not hasattr(block, "fp32_stream"):
                raise TypeError(f"{stage}: {type(block).__name__} has no FP32 stream form")
            block.fp32_stream = True
    for name, reads, writes in _convs(levels):
        if reads in stages or writes in stages:
            out_dtype = torch.float32 if writes is None or writes in stages else torch.float16
            conv = copy.deepcopy(model.get_submodule(name)).float()
            parent, _, leaf = name.rpartition(".")
            setattr(half.get_submodule(parent) if parent else half, leaf, Fp32Conv(conv, out_dtype))
    return half
