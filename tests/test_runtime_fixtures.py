"""Shared fixtures of the runtime tests: a non-trivial tiny TLC model, its checkpoint and ONNX graphs.

Import the fixtures by name into a test module (``from tests.test_runtime_fixtures import ...``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import nafnet_core as nc
from tests.conftest import make_nontrivial

TRAIN_SIZE = 64  # TLC windows of 96/48/24/12/6 px: TLC matters on the small test images
TILE = 64
#: tiny with one block at level 0 (encoder and decoder) and one in the middle: TLC still acts at the
#: finest and coarsest level, and the dynamic-shape ONNX export takes ~15 s instead of ~60 s
#: (torch.export's symbolic reasoning grows with every TLC block).
MINI = dict(enc_blk_nums=(1, 0, 0, 0), middle_blk_num=1, dec_blk_nums=(0, 0, 0, 1))


@pytest.fixture(scope="session")
def tiny_tlc():
    """(plain model, TLC model): ``tiny`` with MINI blocks, random beta/gamma and strong SCA."""
    torch.manual_seed(0)
    model = make_nontrivial(nc.create_model("tiny", **MINI))
    return model, nc.convert_to_tlc(model, TRAIN_SIZE)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tlc):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    nc.save_checkpoint(path, tiny_tlc[0], train_size=TRAIN_SIZE)
    return path


def _export(model, path, dynamic):
    x = torch.rand(1, 3, TILE, TILE)
    shapes = {"inp": {2: torch.export.Dim("h", min=16, max=4096), 3: torch.export.Dim("w", min=16, max=4096)}} \
        if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=shapes, input_names=["input"],
                          output_names=["output"], verbose=False)
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_tlc):
    """{"dynamic": path, "tile": path} ONNX graphs of the TLC model (tile: fixed TILE x TILE)."""
    d = tmp_path_factory.mktemp("onnx")
    return {"dynamic": _export(tiny_tlc[1], d / "dynamic.onnx", True), "tile": _export(tiny_tlc[1], d / "tile.onnx", False)}
