"""Model cost: GFLOP of one forward pass, counted on the meta device (no memory, no compute)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import ModelConfig
from .dft import matrix_form
from .model import NAFNet


def model_gflops(config: ModelConfig, height: int, width: int) -> float:
    """GFLOP (2 x multiply-adds of the convolutions and matrix products) of one forward at ``height`` x ``width``,
    batch 1. The matrix products are the DFTs of ``input_fft='fs'`` in their exported (matrix) form.

    Element-wise ops and the TLC pooling are not counted (they are memory-bound, and the usual
    NAFNet figures, 32 GFLOP at 256x256 for width 32, leave them out too).
    """
    with torch.device("meta"), matrix_form():
        model = NAFNet(config)
        x = torch.empty(1, config.img_channel, height, width)
        with FlopCounterMode(display=False) as counter:
            model(x)
    return counter.get_total_flops() / 1e9
