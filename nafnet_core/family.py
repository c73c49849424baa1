"""The model family: which class builds a config (NAFNet's U, or AdaRevD's encoder with sub-decoders)."""

from __future__ import annotations

import torch.nn as nn

from .adarevd import AdaRevD
from .config import ModelConfig
from .model import NAFNet

#: The model classes of the family (what checkpoints save and TLC converts).
MODEL_CLASSES = (NAFNet, AdaRevD)


def build_model(config: ModelConfig) -> nn.Module:
    """The model of ``config``: :class:`~nafnet_core.model.NAFNet`, or :class:`~nafnet_core.adarevd.AdaRevD` for
    ``decoder="adarevd"`` (a NAFNet encoder with AdaRevD's sub-decoders)."""
    return AdaRevD(config) if config.decoder == "adarevd" else NAFNet(config)


def model_classes() -> tuple[type, ...]:
    """:data:`MODEL_CLASSES`."""
    return MODEL_CLASSES
