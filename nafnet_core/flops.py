"""Model cost: GFLOP of one forward pass, counted on the meta device (no memory, no compute)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import ModelConfig
from .dft import matrix_form
from .family import build_model


def model_gflops(config: ModelConfig, height: int, width: int, depth: int | None = None) -> float:
    """GFLOP (2 x multiply-adds of the convolutions and matrix products) of one forward at ``height`` x ``width``,
    batch 1. The matrix products are the DFTs in their exported (matrix) form, FNAFNet's FFT branches (DFT
    products and the complex linears on the spectra) and the input FFT of ``input_fft='fs'``.

    Element-wise ops and the TLC pooling are not counted (they are memory-bound, and the usual
    NAFNet figures, 32 GFLOP at 256x256 for width 32, leave them out too).

    AdaRevD (``decoder="adarevd"``): every tile at ``depth`` (default: all K sub-decoders), plus the exit
    classifier on every tile when the model has one; the sub-decoders' FFTs count as their DFT matrices.
    """
    with torch.device("meta"), matrix_form():
        model = build_model(config)
        x = torch.empty(1, config.img_channel, height, width)
        with FlopCounterMode(display=False) as counter:
            if config.decoder == "adarevd":
                model(x, depth=config.sub_decoders if depth is None else depth)
                if model.ape is not None:
                    model.exit_logits(model.tiles(model.encode(model.pad_input(x)))[0][3])
            else:
                model(x)
    return counter.get_total_flops() / 1e9
