"""Export: onnxruntime vs PyTorch (dynamic and tile graphs, TLC on/off), FP16 placement, folding, manifest.

Exports are shared per session (the dynamo exporter takes tens of seconds per dynamic graph). The model
is a non-trivial 2-level width-4 NAFNet with TLC kernels from train_size 16 (24 / 12 / 6 px), so the
test images (37x53, 30x70) are larger than the level-0 window and TLC differs from global pooling.
"""

from __future__ import annotations

import copy
import json

import onnx
import onnxruntime as ort
import pytest
import torch

import nafnet_core as nc
from export import ManifestError, export_model, fold, fold_for_deploy, graph, is_folded, load_manifest, verify
from export.api import prepare_model
from export.onnx_export import read_metadata
from nafnet_core.fileio import sha256_file
from tests.helpers import has_trt_gpu, make_nontrivial, photo, small_model

TRAIN = 16
TILE = (48, 64)


@pytest.fixture(scope="session")
def model():
    return small_model(seed=0)


@pytest.fixture(scope="session")
def tlc_export(model, tmp_path_factory):
    """fp32, TLC, folded: dynamic + one tile."""
    return export_model(model, tmp_path_factory.mktemp("tlc"), tiles=[TILE], dynamic=True, train_size=TRAIN)


@pytest.fixture(scope="session")
def plain_tile_export(model, tmp_path_factory):
    """fp32, no TLC, not folded: one tile."""
    return export_model(model, tmp_path_factory.mktemp("plain"), tiles=[TILE], dynamic=False, tlc=False, fold=False,
                        train_size=TRAIN, check=False)


@pytest.fixture(scope="session")
def plain_dynamic_export(model, tmp_path_factory):
    """fp32, no TLC, not folded: dynamic."""
    return export_model(model, tmp_path_factory.mktemp("plain_dynamic"), tiles=None, dynamic=True, tlc=False,
                        fold=False, train_size=TRAIN, check=False)


@pytest.fixture(scope="session")
def fp16_export(model, tmp_path_factory):
    """fp32 + fp16, TLC, folded: one tile."""
    return export_model(model, tmp_path_factory.mktemp("fp16"), tiles=[TILE], dynamic=False, fp16=True,
                        train_size=TRAIN)


def run_ort(path, x: torch.Tensor) -> torch.Tensor:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(["output"], {"input": x.numpy()})[0])


def torch_ref(model, x, tlc=True):
    ref = nc.convert_to_tlc(model, train_size=TRAIN) if tlc else model
    with torch.no_grad():
        return ref(x)


def batch_of_photos(n, h, w):
    return torch.cat([photo(h, w, index=i) for i in range(n)])


# --- fp32 parity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 37, 53), (2, 30, 70), (1, 20, 70), (1, 64, 64), (1, 9, 5)])
def test_dynamic_tlc_graph_matches_torch(model, tlc_export, shape):
    n, h, w = shape
    x = batch_of_photos(n, h, w)
    out = run_ort(tlc_export.path("onnx-fp32-dynamic"), x)
    assert out.shape == x.shape
    assert (out - torch_ref(model, x)).abs().max().item() <= 1e-4


def test_tlc_effect_is_large_enough_to_detect(model):
    # The parity tolerance (1e-4) must be far below the difference TLC makes, or a broken TLC would pass.
    x = photo(37, 53)
    assert (torch_ref(model, x, tlc=True) - torch_ref(model, x, tlc=False)).abs().max().item() > 1e-2


def test_tile_tlc_graph_matches_torch_and_is_static(model, tlc_export):
    x = photo(*TILE)
    path = tlc_export.path(f"onnx-fp32-{TILE[0]}x{TILE[1]}")
    assert (run_ort(path, x) - torch_ref(model, x)).abs().max().item() <= 1e-4
    assert graph.shape_arithmetic(onnx.load(str(path))) == []
    # ... while the dynamic graph does compute shapes (the check can fail).
    assert graph.shape_arithmetic(onnx.load(str(tlc_export.path("onnx-fp32-dynamic"))))


@pytest.mark.parametrize("shape", [(1, 37, 53), (1, 30, 70)])
def test_dynamic_graph_without_tlc_matches_torch(model, plain_dynamic_export, shape):
    x = batch_of_photos(*shape)
    out = run_ort(plain_dynamic_export.path("onnx-fp32-dynamic"), x)
    assert (out - torch_ref(model, x, tlc=False)).abs().max().item() <= 1e-4


def test_tile_graph_without_tlc_matches_torch(model, plain_tile_export):
    x = photo(*TILE)
    path = plain_tile_export.path(f"onnx-fp32-{TILE[0]}x{TILE[1]}")
    assert (run_ort(path, x) - torch_ref(model, x, tlc=False)).abs().max().item() <= 1e-4
    assert graph.op_counts(onnx.load(str(path)))["CumSum"] == 0
    assert plain_tile_export.data["tlc"]["enabled"] is False and plain_tile_export.data["folded"] is False


def test_export_check_is_recorded(tlc_export):
    for name, rec in tlc_export.artifacts.items():
        assert rec["check"]["max_abs_diff"] <= 1e-4, name


# --- fp16 ---------------------------------------------------------------------------------------------


def test_fp16_graph_node_types(fp16_export):
    m = onnx.load(str(fp16_export.path(f"onnx-fp16-{TILE[0]}x{TILE[1]}")))
    prec = graph.node_precisions(m)
    assert set(prec["Conv"]) == {"fp16"} and prec["Conv"]["fp16"] == graph.op_counts(m)["Conv"]
    # Folded: channel norms and (on this small tile) TLC window means are MatMuls; all must stay FP32.
    assert {"MatMul", "Sqrt"} <= prec.keys()
    for op in graph.FP32_OPS & prec.keys():
        assert set(prec[op]) == {"fp32"}, op
    for vi in list(m.graph.input) + list(m.graph.output):
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.fp16_placement_problems(m) == []
    assert graph.shape_arithmetic(m) == []
    # The same check flags the FP32 graph (every Conv in FP32), so it can fail.
    fp32 = onnx.load(str(fp16_export.path(f"onnx-fp32-{TILE[0]}x{TILE[1]}")))
    assert any("Conv" in p for p in graph.fp16_placement_problems(fp32))


def test_fp16_graph_matches_torch_half(model, fp16_export):
    x = photo(*TILE)
    out = run_ort(fp16_export.path(f"onnx-fp16-{TILE[0]}x{TILE[1]}"), x)
    deploy = prepare_model(model, train_size=TRAIN)
    with torch.no_grad():
        ref32 = deploy(x)
    assert out.dtype == torch.float32
    assert nc.psnr(out.clamp(0, 1), ref32.clamp(0, 1), data_range=1.0).item() > 45
    assert fp16_export.artifacts[f"onnx-fp16-{TILE[0]}x{TILE[1]}"]["check"]["psnr_db"] > 45


def test_half_model_takes_fp32_input_with_fp32_residual(model):
    half = nc.convert_to_tlc(model, train_size=TRAIN).half()
    x = photo(20, 28)
    with torch.no_grad():
        y = half(x)
    assert y.dtype == torch.float32
    # An FP32 skip path keeps the input's full precision: identity blocks give back x to ~1e-3.
    assert (y - torch_ref(model, x)).abs().max().item() < 5e-2


# --- folding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("band_max_macs", [fold.BAND_MAX_MACS, 0], ids=["band-means", "cumsum-means"])
def test_folding_is_exact_and_leaves_input_untouched(model, band_max_macs, monkeypatch):
    monkeypatch.setattr(fold, "BAND_MAX_MACS", band_max_macs)  # both window-mean forms of the attention
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_for_deploy(model)
    assert is_folded(folded) and not is_folded(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(n.endswith(("beta", "gamma", "norm1.weight")) for n, _ in folded.named_parameters())
    tlc_a = nc.convert_to_tlc(model, train_size=TRAIN)
    tlc_b = fold_for_deploy(tlc_a)
    # Larger than every window (attention on the window grid), smaller than the level-0 window in one
    # direction, and smaller than every window (global means).
    for h, w in [(37, 53), (16, 40), (64, 17), (8, 8)]:
        x = photo(h, w)
        with torch.no_grad():
            a, b, c = tlc_a(x), tlc_b(x), folded(x)
            plain = model(x)
        assert (a - b).abs().max().item() <= 1e-5, (h, w)
        assert (plain - c).abs().max().item() <= 1e-5, (h, w)
        assert (a - x).abs().max().item() > 0.1  # the blocks do something
    with torch.no_grad():  # ... and TLC differs from global pooling at 37x53
        assert (tlc_a(photo(37, 53)) - model(photo(37, 53))).abs().max().item() > 1e-3
    assert fold_for_deploy(folded).state_dict().keys() == folded.state_dict().keys()  # idempotent
    with pytest.raises(ValueError, match="apply TLC first"):
        nc.convert_to_tlc(folded, train_size=TRAIN)
    assert nc.is_tlc(tlc_b) and not nc.is_tlc(folded)  # a folded TLC model still says it has TLC
    with pytest.raises(ValueError, match="without TLC"):
        prepare_model(tlc_b, tlc=False)


@pytest.mark.parametrize("gate,dw_expand,ffn_expand", [("reglu", 2, 2), ("geglu", 1, 2), ("swiglu", 2, 4)])
def test_folding_is_exact_for_every_gate(gate, dw_expand, ffn_expand):
    from nafnet_core import create_model

    torch.manual_seed(1)
    model = make_nontrivial(create_model("tiny", width=4, enc_blk_nums=(1,), dec_blk_nums=(1,), gate=gate,
                                         dw_expand=dw_expand, ffn_expand=ffn_expand))
    tlc = nc.convert_to_tlc(model, train_size=TRAIN)
    deploy = fold_for_deploy(tlc)
    for h, w in [(37, 53), (24, 24), (5, 97)]:
        x = photo(h, w)
        with torch.no_grad():
            a, b = tlc(x), deploy(x)
        assert (a - b).abs().max().item() <= 1e-5, (gate, h, w)
        assert (a - x).abs().max().item() > 0.1


def test_folded_half_model_stays_close_to_fp32(model):
    deploy = fold_for_deploy(nc.convert_to_tlc(model, train_size=TRAIN))
    x = photo(37, 53)
    with torch.no_grad():
        ref, half = deploy(x), copy.deepcopy(deploy).half()(x)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert (half - ref).abs().max().item() < 2e-2


@pytest.mark.parametrize("band_max_macs", [fold.BAND_MAX_MACS, 0], ids=["band-means", "cumsum-means"])
def test_half_deploy_attention_sums_in_fp32(band_max_macs, monkeypatch):
    """Sums over 96x96 windows of 20s reach 184,320, past FP16's 65,504: a half attention must still give
    conv(20) everywhere (cumulative sums in FP16 give inf/NaN here)."""
    monkeypatch.setattr(fold, "BAND_MAX_MACS", band_max_macs)
    conv = torch.nn.Conv2d(4, 4, 1)
    attention = fold.Attention(conv, (96, 96)).half()
    x = torch.full((1, 4, 120, 130), 20.0, dtype=torch.float16)
    with torch.no_grad():
        out = attention(x)
        expected = conv(torch.full((1, 4, 1, 1), 20.0, dtype=torch.float16))
    assert out.shape == x.shape and out.dtype == torch.float16
    torch.testing.assert_close(out.float(), expected.float().expand_as(out), atol=1e-2, rtol=0)


def test_fp16_graph_places_cumulative_sums_in_fp32(model, monkeypatch):
    """The FP16 export of the deploy form when the window means are cumulative sums (large maps, dynamic
    graphs): CumSum, its slices and the transposed grid in FP32, convs in FP16."""
    from export.onnx_export import to_onnx_proto, with_precision
    from export.shapes import ShapeSpec

    monkeypatch.setattr(fold, "BAND_MAX_MACS", 0)
    deploy = with_precision(prepare_model(model, train_size=TRAIN), "fp16")
    m = to_onnx_proto(deploy, ShapeSpec.tile(*TILE, 1))
    prec = graph.node_precisions(m)
    assert set(prec["CumSum"]) == {"fp32"} and prec["CumSum"]["fp32"] >= 2
    assert "fp32" in prec["Transpose"]
    assert graph.fp16_placement_problems(m) == []


def test_folded_graph_has_the_deploy_form(fp16_export, plain_tile_export):
    tag = f"onnx-fp32-{TILE[0]}x{TILE[1]}"  # the fp32 tile graph of the TLC, folded export
    folded = graph.op_counts(onnx.load(str(fp16_export.path(tag))))
    unfolded = graph.op_counts(onnx.load(str(plain_tile_export.path(tag))))
    blocks = 5  # 2 encoders + middle + 2 decoders
    # norm1/norm2 scale, beta, gamma gone; the variance's square is a Mul instead of a Pow (2 norms per block).
    assert unfolded["Mul"] - folded["Mul"] == 4 * blocks - 2 * blocks
    assert folded["Pow"] == 0 and folded["ReduceMean"] == 0 and unfolded["ReduceMean"] >= 4 * blocks
    # Channel means: 2 MatMuls per norm; TLC window means on this small tile: 2 band MatMuls per block.
    assert folded["MatMul"] == 4 * blocks + 2 * blocks and folded["CumSum"] == 0
    assert unfolded["Split"] >= 2 * blocks and folded["Split"] == 0  # gates split into conv pairs
    assert folded["Conv"] - unfolded["Conv"] == 3 * blocks  # conv1, conv2, conv4 in halves


# --- manifest -----------------------------------------------------------------------------------------


def test_manifest_hashes_and_metadata(tlc_export, model):
    data = json.loads((tlc_export.directory / "manifest.json").read_text())
    assert data["tlc"]["kernels"] == [list(k) for k in nc.tlc_kernels(model.config, TRAIN)]
    for rec in data["artifacts"].values():
        path = tlc_export.directory / rec["file"]
        assert sha256_file(path) == rec["sha256"] and path.stat().st_size == rec["bytes"]
        meta = read_metadata(path)
        assert json.loads(meta["nafnet.shape"]) == rec["shape"]
        assert meta["nafnet.precision"] == rec["precision"] == "fp32"
        assert json.loads(meta["nafnet.tlc"])["kernels"] == data["tlc"]["kernels"]
        assert meta["nafnet.opset"] == str(data["opset"])
    assert verify(tlc_export.directory).artifacts.keys() == data["artifacts"].keys()


def test_verify_names_a_modified_file(tmp_path, fp16_export):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(fp16_export.directory, d)
    name = f"model-fp32-{TILE[0]}x{TILE[1]}.onnx"
    with open(d / name, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ManifestError, match=name):
        verify(d)
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(tmp_path)


def test_interrupted_export_leaves_no_manifest(model, tmp_path, monkeypatch):
    import export.api as api

    (tmp_path / "manifest.json").write_text("{}")  # an older export's manifest must not survive
    calls = []

    def failing_save(proto, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(proto, path)

    real_save = api.save_onnx
    monkeypatch.setattr(api, "save_onnx", failing_save)
    with pytest.raises(KeyboardInterrupt):
        export_model(model, tmp_path, tiles=[(16, 16), (32, 32)], dynamic=False, train_size=TRAIN, check=False)
    assert not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.glob("*.part"))


# --- TensorRT -----------------------------------------------------------------------------------------


def test_missing_tensorrt_gives_one_sentence_after_writing_onnx(model, tmp_path, monkeypatch):
    import sys

    from export import TensorRTUnavailable

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(TensorRTUnavailable) as err:
        export_model(model, tmp_path, tiles=[(16, 16)], dynamic=False, trt=True, train_size=TRAIN, check=False)
    msg = str(err.value)
    assert "TensorRT" in msg and "pip install" in msg and "\n" not in msg
    manifest = verify(tmp_path)
    assert set(manifest.artifacts) == {"onnx-fp32-16x16", "onnx-fp16-16x16"}


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(not has_trt_gpu(), reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_engine_builds_and_matches(model, fp16_export, tmp_path):
    from export.shapes import ShapeSpec, make_profile
    from export.tensorrt_build import build_engine, run_engine
    from export.trt_plan import TrtOptions

    spec = ShapeSpec.tile(*TILE)
    options = TrtOptions(workspace_gib=1, timing_cache=tmp_path / "timing.cache")
    rec = build_engine(fp16_export.path(f"onnx-fp16-{TILE[0]}x{TILE[1]}"), tmp_path / "m.engine", make_profile(spec),
                       "input", options)
    assert (tmp_path / "timing.cache").stat().st_size > 0 and rec["strongly_typed"]
    x = photo(*TILE)
    out = torch.from_numpy(run_engine(tmp_path / "m.engine", x.numpy()))
    with torch.no_grad():
        ref = prepare_model(model, train_size=TRAIN)(x)
    assert nc.psnr(out.clamp(0, 1), ref.clamp(0, 1), data_range=1.0).item() > 45
    rec2 = build_engine(fp16_export.path(f"onnx-fp16-{TILE[0]}x{TILE[1]}"), tmp_path / "m2.engine",
                        make_profile(spec), "input", options)
    assert rec2["timing_cache_reused"]


