"""FP32 activation ranges as the FP16 graph would hold them, and the FP16 plan an export records.

:func:`fp16_range_report` runs FP32 hooks over sample photos (and, optionally, the half model on a crop):
per block the largest residual-stream and gate values and the headroom to FP16's limits. ``export lint
--checkpoint`` prints it; :func:`plan` turns it into the manifest's ``fp16`` record (the stages whose stream
stays FP32, :mod:`export.fp16_stream`), and :func:`summary` into one line for the user.

FP32 forward hooks on sample photos record, per residual block (every block kind: NAFBlock, its deploy form,
CascadedGaze's block...), the largest |value| of the residual stream, of the gate products and of any layer
output against the FP16 maximum 65504, and the fraction of values below FP16's smallest normal (6.1e-5); then
a PyTorch half run (the same FP32 islands as the FP16 graph, and the same FP32 stream stages) is compared with
FP32 by PSNR. ORT on CPU cannot reveal FP16 overflow (it computes FP16 nodes in FP32), PyTorch half can. (The
LayerNorm sums are no column: they are computed in FP32.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nafnet_core.layers import Gate, NAFBlock
from nafnet_core.metrics import psnr
from nafnet_core.model import NAFNet

from .fold import DeployBlock, GatedConv
from .fp16_stream import FP16_MAX, SAMPLE_HW, STREAM_MARGIN, fp32_convs, fp32_stream_stages, to_half

#: Smallest normal FP16 value (2**-14); smaller magnitudes lose precision (subnormal) or flush to zero.
FP16_MIN_NORMAL = 2.0**-14


@dataclass
class BlockRange:
    """FP32 activation ranges of one block, as the FP16 graph would hold them.

    Args:
        block: module name (``encoders.0.0``).
        max_stream: largest |value| of the residual stream: the block's input, the sum after the first add
            and its output (FP16 tensors in the FP16 graph unless the stage is kept in FP32).
        max_gate: largest |value| of the gate products ``act(a) * b`` and the attention product ``x * sca(x)``.
        max_abs: largest |output| of any layer in the block (convs included).
        subnormal: fraction of the non-zero layer outputs below FP16's smallest normal (6.1e-5), which FP16
            stores with fewer bits or flushes to zero.
    """

    block: str
    max_stream: float = 0.0
    max_gate: float = 0.0
    max_abs: float = 0.0
    subnormal: float = 0.0
    _tiny: int = 0
    _nonzero: int = 0

    @property
    def headroom(self) -> float:
        """FP16 max / the largest of the three maxima (< 1 means FP16 would overflow there)."""
        worst = max(self.max_stream, self.max_gate, self.max_abs)
        return FP16_MAX / worst if worst else float("inf")


@dataclass
class RangeReport:
    blocks: list[BlockRange] = field(default_factory=list)
    half_psnr_db: float | None = None
    half_size: tuple[int, int] | None = None
    images: int = 0
    fp32_stream: list[str] = field(default_factory=list)

    @property
    def overflows(self) -> list[str]:
        return [b.block for b in self.blocks if b.headroom < 1]


def fp16_range_report(model: NAFNet, images: list[torch.Tensor], half_size: tuple[int, int] | None = (128, 128),
                      fp32_stream: list[str] | None = None) -> RangeReport:
    """FP32 activation ranges per block over ``images``, and PSNR of PyTorch half vs FP32 at ``half_size``.

    Args:
        model: the FP32 model as deployed (TLC and folding applied or not, as exported).
        images: (1, 3, H, W) float32 tensors in [0, 1].
        half_size: (h, w) centre crop for the half-vs-fp32 run (half precision is slow on CPU); None skips it.
        fp32_stream: stages whose residual stream the half model keeps in FP32 (as the export does; see
            :mod:`export.fp16_stream`).
    """

    model = model.eval()
    report = RangeReport(images=len(images), fp32_stream=list(fp32_stream or []))
    handles = []

    def hook(module, fn, pre=False):
        handles.append(module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn))

    for name, block in model.named_modules():
        if not _is_block(block):
            continue
        row = BlockRange(name)
        report.blocks.append(row)

        def track(_m, _inp, out, row=row):
            if isinstance(out, torch.Tensor):
                a = out.detach().abs()
                row.max_abs = max(row.max_abs, a.max().item())
                nonzero = a > 0
                row._tiny += int((nonzero & (a < FP16_MIN_NORMAL)).sum())
                row._nonzero += int(nonzero.sum())

        def stream(_m, inp, out=None, row=row):
            for t in (inp[0], out):
                if isinstance(t, torch.Tensor):
                    row.max_stream = max(row.max_stream, t.detach().abs().max().item())

        def gate(_m, inp, out=None, row=row):
            t = inp[0] if out is None else out
            row.max_gate = max(row.max_gate, t.detach().abs().max().item())

        hook(block, stream, pre=True)
        hook(block, stream)
        hook(block.norm2, stream, pre=True)  # norm2 reads the stream after the first add
        hook(block.get_submodule(getattr(block, "sca_reader", "conv3")), gate, pre=True)  # it reads x * sca(x)
        for sub in block.modules():
            # leaves, and the deploy form's gate products (act(a) * b is no leaf's output there)
            # FP32 islands (FNAFNet's FFT branches) never hold their outputs in FP16: not counted
            if sub is not block and not getattr(sub, "fp32_island", False) and \
                    (not list(sub.children()) or isinstance(sub, GatedConv)):
                hook(sub, track)
            if isinstance(sub, (Gate, GatedConv)):
                hook(sub, gate)
    try:
        with torch.no_grad():
            for x in images:
                model(x)
    finally:
        for h in handles:
            h.remove()
    for row in report.blocks:
        row.subnormal = row._tiny / row._nonzero if row._nonzero else 0.0
    if half_size is not None and images:
        x = _center_crop(images[0], *half_size)
        half = to_half(model, report.fp32_stream)
        with torch.no_grad():
            ref, out = model(x), half(x).float()
        report.half_psnr_db = round(float(psnr(out.clamp(0, 1), ref.clamp(0, 1), data_range=1.0).min()), 2)
        report.half_size = tuple(x.shape[-2:])
    return report


def _is_block(module: torch.nn.Module) -> bool:
    """A residual block of the network (any kind, as trained or folded): what has an FP32-stream form."""
    return isinstance(module, (NAFBlock, DeployBlock)) or hasattr(type(module), "fp32_stream")


def _center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    H, W = x.shape[-2:]
    h, w = min(h, H), min(w, W)
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w]


def plan(deploy: NAFNet, images: list[torch.Tensor] | None = None, margin: float = STREAM_MARGIN) -> dict:
    """The manifest's ``fp16`` record: the stream measured on sample photos and the stages kept in FP32.

    Args:
        deploy: the FP32 deploy model about to be exported.
        images: (1, 3, H, W) photos in [0, 1] (default: two bundled photos at :data:`SAMPLE_HW`).
        margin: safety factor below FP16's maximum.
    """
    from .samples import sample_photo

    images = images if images is not None else [sample_photo(*SAMPLE_HW, index=i) for i in range(2)]
    report = fp16_range_report(deploy, images, half_size=None)
    levels = len(deploy.encoders)
    stages = fp32_stream_stages({b.block: b.max_stream for b in report.blocks}, levels, margin)
    return {"fp32_stream": stages, "fp32_convs": fp32_convs(stages, levels), "margin": margin,
            "max_stream": float(f"{max((b.max_stream for b in report.blocks), default=0):.4g}"),
            "max_gate": float(f"{max((b.max_gate for b in report.blocks), default=0):.4g}"),
            "gate_overflow": [b.block for b in report.blocks if b.max_gate > FP16_MAX / margin],
            "measured_on": f"{len(images)} photos, {'x'.join(map(str, images[0].shape[-2:]))}" if images else ""}


def summary(record: dict) -> str | None:
    """One line for the user about an export's ``fp16`` record, or None when the FP16 graph is plain."""
    if not record or not (record["fp32_stream"] or record["gate_overflow"]):
        return None
    parts = []
    if record["fp32_stream"]:
        parts.append(f"FP16 graph keeps the residual stream of {', '.join(record['fp32_stream'])} in FP32 (and "
                     f"{', '.join(record['fp32_convs'])} in FP32): the stream reaches {record['max_stream']:.4g} on "
                     f"{record['measured_on']}, above {FP16_MAX:.0f}/{record['margin']:g}")
    if record["gate_overflow"]:
        parts.append(f"gate products of {', '.join(record['gate_overflow'])} reach {record['max_gate']:.4g}, near or "
                     "above FP16's range: use the FP32 graph or check `export lint --checkpoint`")
    return "; ".join(parts)
