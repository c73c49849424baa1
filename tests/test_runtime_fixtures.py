"""Shared fixtures of the runtime tests: a non-trivial tiny TLC model, its checkpoint and ONNX graphs.

Registered once as a plugin by tests/conftest.py, so session fixtures are built once per run.
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


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_checkpoint):
    """An export directory (export package) of the TLC model: ONNX fp32 + FP16, dynamic and TILE x TILE."""
    from export import export_model

    d = tmp_path_factory.mktemp("export")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(tiny_checkpoint, d, tiles=[(TILE, TILE)], dynamic=True, fp16=True, check=False)
    return d


@pytest.fixture(scope="session")
def tiny_onnx(tiny_export):
    """{"dynamic": path, "tile": path}: the fp32 ONNX graphs of the export."""
    from export import load_manifest

    m = load_manifest(tiny_export)
    return {"dynamic": m.path("onnx-fp32-dynamic"), "tile": m.path(f"onnx-fp32-{TILE}x{TILE}")}


@pytest.fixture(scope="session")
def synth_root():
    """The embedded synthetic data set (train package; generated once into its cache)."""
    from nafnet_core.synth import ensure_synthetic

    return ensure_synthetic(progress=False)
