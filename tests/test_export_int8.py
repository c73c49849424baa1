"""INT8 export: Q/DQ graphs calibrated on train crops, the budget search, the lint's Q/DQ rules, an outlier layer."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

import nafnet_core as nc
from export import export_model, graph, load_manifest, verify
from export.int8 import Int8BudgetError, Int8Options, calibration_inputs, fit, search, val_inputs
from export.lint import lint_onnx, lint_path
from tests.helpers import MINI, TILE, TRAIN_SIZE, make_nontrivial

pytestmark = pytest.mark.usefixtures("one_thread")

#: Cheap settings: four train crops, the four val images of the synthetic set.
CHEAP = dict(crops=4, val_images=4)


def _int8_export(checkpoint, out, **options):
    return export_model(checkpoint, out, tiles=[(TILE, TILE)], dynamic=False, int8=True,
                        int8_options=Int8Options(**{**CHEAP, **options}))


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory, tiny_checkpoint, synth_root):
    """The tiny TLC checkpoint exported at TILE x TILE with both INT8 forms (the cpu form written regardless of
    speed)."""
    out = tmp_path_factory.mktemp("int8")
    _int8_export(tiny_checkpoint, out, cpu_form="always")
    return out


# --------------------------------------------------------------------------------------------- pure parts


def test_search_finds_the_smallest_passing_k():
    calls = []

    def measure(k):  # monotone: each conv back in float removes 0.05 dB
        calls.append(k)
        return -0.5 + 0.05 * k

    k, trials = search(40, measure, 0.1)
    assert k == 8 and abs(dict(trials)[8]) <= 0.1 and abs(dict(trials)[7]) > 0.1
    assert len(calls) == len(set(calls)) < 12  # doubling then bisection, nothing measured twice
    assert search(40, lambda k: 0.01, 0.1) == (0, [(0, 0.01)])


def test_search_gives_up_without_a_quantized_conv():
    k, trials = search(5, lambda k: 1.0, 0.1)
    assert k is None and max(kk for kk, _ in trials) == 4  # k = 5 (every conv float) is never an INT8 graph


def test_calibration_crops_come_from_the_train_split(synth_root):
    from nafnet_core.data import load_pairs
    from nafnet_core.images import read_image, to_tensor

    crops = calibration_inputs(synth_root, (64, 96), 5, seed=0)
    assert [c.shape for c in crops] == [(1, 3, 64, 96)] * 5 and all(c.dtype == np.float32 for c in crops)
    assert all(np.array_equal(a, b) for a, b in zip(crops, calibration_inputs(synth_root, (64, 96), 5, seed=0)))
    first_train = to_tensor(read_image(load_pairs(synth_root)["train"][0].blur)).numpy()
    h, w = first_train.shape[-2:]
    windows = [first_train[..., i:i + 64, j:j + 96] for i in range(h - 63) for j in range(w - 95)]
    assert any(np.array_equal(crops[0], win) for win in windows)  # a crop of the first train image
    whole = calibration_inputs(synth_root, None, 2)
    assert whole[0].shape == first_train.shape  # the dynamic graph calibrates on whole images


def test_fit_mirrors_small_images_out_to_the_tile():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    (y,) = fit([x], (10, 12), None)
    assert y.shape == (2, 3, 10, 12)
    assert torch.equal(y[..., :4, :5], x) and torch.equal(y[..., 4:8, :5], x.flip(-2))  # the image, then mirrored
    blur, sharp = fit([x, x + 1], (3, 3), np.random.default_rng(0))
    assert torch.equal(sharp, blur + 1)  # the same crop of both


def test_val_inputs_are_the_val_split(synth_root):
    from nafnet_core.data import load_pairs

    val = val_inputs(synth_root, None, 8)
    assert len(val) == len(load_pairs(synth_root)["val"]) == 4


def test_bad_options_are_one_line():
    for bad in (dict(calibration="kl"), dict(budget_db=0), dict(crops=0), dict(cpu_form="fast")):
        with pytest.raises(nc.UserError):
            Int8Options(**bad)


# --------------------------------------------------------------------------------------------- the export


@pytest.mark.slow
def test_int8_export_meets_its_budget_and_says_so(int8_dir):
    m = verify(int8_dir)
    q = m.data["int8"]
    assert q["budget_db"] == 0.10 and q["calibration"] == "minmax" and q["calibration_split"] == "train"
    assert q["quantized_ops"] == ["Conv"] and q["float_parts"] == {"qdq": "fp16-fp32-islands", "cpu": "fp32"}
    for name, form, base in ((f"onnx-int8-{TILE}x{TILE}", "qdq", "fp16"),
                             (f"onnx-int8-cpu-{TILE}x{TILE}", "cpu", "fp32")):
        rec = m.artifacts[name]
        assert rec["precision"] == "int8" and rec["runtime"] == "onnxruntime"
        assert rec["built_from"] == f"onnx-{base}-{TILE}x{TILE}" and rec["calibrated_on"] == f"onnx-fp32-{TILE}x{TILE}"
        r = rec["int8"]
        assert r["form"] == form and abs(r["val_delta_psnr_db"]) <= 0.10 and r["float_parts"] == q["float_parts"][form]
        assert r["quantized_convs"] >= 1 and q["graphs"][name]["written"]
        assert [t["float_convs"] for t in r["search"]][0] == 0  # everything quantized was tried first
        model = onnx.load(str(m.path(name)))
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["nafnet.precision"] == "int8" and meta["nafnet.int8_form"] == form
        assert json.loads(meta["nafnet.int8_float_convs"]) == [c["conv"] for c in r["float_convs"]]
        assert meta["nafnet.int8_float_parts"] == r["float_parts"]
        assert meta["nafnet.opset"] == str(graph.opset_of(model)) == str(19 if form == "qdq" else m.data["opset"])
        # the graph really is quantized: it differs from fp32 a little, not a lot
        assert 0 < rec["check"]["max_abs_diff"] and rec["check"]["psnr_db"] > 30
        trials = {t["float_convs"]: t["val_delta_psnr_db"] for t in r["search"]}
        assert trials[len(r["float_convs"])] == r["val_delta_psnr_db"]  # the search measured the graph written
    qdq = m.artifacts[f"onnx-int8-{TILE}x{TILE}"]["int8"]
    assert abs(qdq["val_delta_psnr_db_fp32_parts"]) <= 1  # the same convs and scales with FP32 parts, for comparison
    assert "val_delta_psnr_db_fp32_parts" not in m.artifacts[f"onnx-int8-cpu-{TILE}x{TILE}"]["int8"]


@pytest.mark.slow
def test_lint_passes_the_int8_graphs(int8_dir):
    findings = lint_path(int8_dir)
    assert all(f.ok for f in findings), [f for f in findings if not f.ok]
    checks = {(f.file, f.check) for f in findings}
    for file, parts in ((f"model-int8-{TILE}x{TILE}.onnx", "INT8 float parts (FP16, FP32 islands)"),
                        (f"model-int8cpu-{TILE}x{TILE}.onnx", "INT8 float parts (FP32 islands)")):
        assert (file, "INT8 Q/DQ rules") in checks and (file, parts) in checks


@pytest.mark.slow
def test_the_tensorrt_form_computes_as_the_fp16_graph(int8_dir):
    """The qdq form is the FP16 graph with Q/DQ around its convs: INT8 convs on FP16 activations and weights with
    FP16 scales, LayerNorm/pooling/TLC ops in FP32, the same float ops as onnx-fp16, FP32 I/O, opset 19."""
    fp16 = onnx.load(str(int8_dir / f"model-fp16-{TILE}x{TILE}.onnx"))
    model = onnx.load(str(int8_dir / f"model-int8-{TILE}x{TILE}.onnx"))
    assert graph.opset_of(model) == 19 and graph.precision_of(model) == "int8"
    counts = graph.op_counts(model)
    qdq_ops = Counter({op: counts[op] for op in ("QuantizeLinear", "DequantizeLinear")})
    assert counts - qdq_ops == graph.op_counts(fp16)  # the same float graph
    prec = graph.node_precisions(model)
    assert prec["Conv"] == Counter({"fp16": counts["Conv"]}) and prec["Conv"] == graph.node_precisions(fp16)["Conv"]
    for op in graph.FP32_OPS & set(counts):
        assert set(prec[op]) == {"fp32"}, op
    assert graph.fp16_placement_problems(model) == []
    inits = {t.name: t for t in model.graph.initializer}
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert {t.data_type for t in scales} == {TensorProto.FLOAT16}
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert sum(n.op_type == "Conv" and n.input[1] in dq for n in model.graph.node) \
        == load_manifest(int8_dir).artifacts[f"onnx-int8-{TILE}x{TILE}"]["int8"]["quantized_convs"]


def _zero_point_of(model, op="QuantizeLinear"):
    node = next(n for n in model.graph.node if n.op_type == op)
    return next(t for t in model.graph.initializer if t.name == node.input[2])


@pytest.mark.slow
@pytest.mark.parametrize("breakage, expected", [
    ("nonzero zero point", "zero point not 0"),
    ("uint8 zero point", "expected INT8"),
    ("float16 scale in the cpu form", "scale"),
    ("float32 scale for an fp16 conv", "scale fp32 but its consumer Conv"),
    ("fp16 scales at opset 18", "need opset >= 19"),
    ("output Q in the qdq form", "quantizes conv inputs only"),
    ("quantized residual add", "only Conv is quantized"),
])
def test_lint_names_each_broken_qdq_rule(int8_dir, tmp_path, breakage, expected):
    stem = "int8cpu" if "cpu form" in breakage else "int8"
    model = onnx.load(str(int8_dir / f"model-{stem}-{TILE}x{TILE}.onnx"))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    if breakage == "nonzero zero point":
        _zero_point_of(model).CopyFrom(numpy_helper.from_array(np.array(3, np.int8), _zero_point_of(model).name))
    elif breakage == "uint8 zero point":
        _zero_point_of(model).CopyFrom(numpy_helper.from_array(np.array(0, np.uint8), _zero_point_of(model).name))
    elif breakage in ("float16 scale in the cpu form", "float32 scale for an fp16 conv"):
        op, dtype = ("QuantizeLinear", np.float16) if "cpu" in breakage else ("DequantizeLinear", np.float32)
        node = next(n for n in g.node if n.op_type == op and n.input[0] in inits) if op == "DequantizeLinear" \
            else next(n for n in g.node if n.op_type == op)
        t = inits[node.input[1]]
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
    elif breakage == "fp16 scales at opset 18":
        next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = 18
    else:  # a Q/DQ pair whose output a non-conv node reads
        conv = next(n for n in g.node if n.op_type == "Conv" and n.name != g.node[0].name)
        reader = next(n for n in g.node if n.op_type in ("Add", "Mul") and any(i for i in n.input))
        source = conv.output[0] if breakage == "output Q in the qdq form" else reader.output[0]
        dtype = np.float16 if graph.tensor_types(model)[source] == TensorProto.FLOAT16 else np.float32
        scale = numpy_helper.from_array(np.array(0.1, dtype), "extra_scale")
        zp = numpy_helper.from_array(np.array(0, np.int8), "extra_zp")
        g.initializer.extend([scale, zp])
        g.node.append(onnx.helper.make_node("QuantizeLinear", [source, "extra_scale", "extra_zp"], ["extra_q"],
                                            name="extra_Q"))
        g.node.append(onnx.helper.make_node("DequantizeLinear", ["extra_q", "extra_scale", "extra_zp"], ["extra_dq"],
                                            name="extra_DQ"))
        g.node.append(onnx.helper.make_node("Add", ["extra_dq", "extra_dq"], ["extra_sum"], name="extra_add"))
        g.output.append(onnx.helper.make_tensor_value_info("extra_sum", TensorProto.FLOAT, None))
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    rules = next(f for f in lint_onnx(path, run=False) if f.check == "INT8 Q/DQ rules")
    assert not rules.ok and expected in rules.detail, rules.detail


@pytest.mark.slow
def test_lint_finds_an_fp16_layernorm_in_the_tensorrt_form(int8_dir, tmp_path):
    """The TensorRT form's float parts follow the FP16 rules: a LayerNorm whose Sqrt computes in FP16 (a valid graph:
    cast to FP16 and back around it) fails them, and the graph as exported passes."""
    path = int8_dir / f"model-int8-{TILE}x{TILE}.onnx"
    check = "INT8 float parts (FP16, FP32 islands)"
    assert next(f for f in lint_onnx(path, run=False) if f.check == check).ok
    model = onnx.load(str(path))
    g = model.graph
    sqrt = next(n for n in g.node if n.op_type == "Sqrt")
    src, out = sqrt.input[0], sqrt.output[0]
    sqrt.input[0], sqrt.output[0] = "half_var", "half_std"
    at = list(g.node).index(sqrt)
    g.node.insert(at, onnx.helper.make_node("Cast", [src], ["half_var"], to=TensorProto.FLOAT16, name="to_half"))
    g.node.insert(at + 2, onnx.helper.make_node("Cast", ["half_std"], [out], to=TensorProto.FLOAT, name="to_float"))
    broken = tmp_path / "fp16-layernorm.onnx"
    onnx.save(model, str(broken))
    onnx.checker.check_model(str(broken), full_check=True)  # a valid graph, only placed wrong
    finding = next(f for f in lint_onnx(broken, run=False) if f.check == check)
    assert not finding.ok and f"Sqrt {sqrt.name} computes in ['fp16'], expected fp32" in finding.detail


@pytest.mark.slow
def test_lint_checks_the_float_convs_against_the_metadata(int8_dir, tmp_path):
    model = onnx.load(str(int8_dir / f"model-int8-{TILE}x{TILE}.onnx"))
    meta = next(p for p in model.metadata_props if p.key == "nafnet.int8_float_convs")
    meta.value = json.dumps(["intro"])  # claims a conv is float that is INT8
    path = tmp_path / "claims.onnx"
    onnx.save(model, str(path))
    rules = next(f for f in lint_onnx(path, run=False) if f.check == "INT8 Q/DQ rules")
    assert not rules.ok and "listed but INT8: intro" in rules.detail


@pytest.mark.slow
def test_unmeetable_budget_writes_no_int8_file(tiny_checkpoint, tmp_path, monkeypatch, synth_root):
    from export import int8

    monkeypatch.setattr(int8.Validator, "delta_db", lambda self, path: -1.0)  # no k ever meets the budget
    with pytest.raises(Int8BudgetError, match="cannot meet --int8-budget 0.1 dB with any conv quantized"):
        _int8_export(tiny_checkpoint, tmp_path)
    m = verify(tmp_path)  # everything else is written and hashed
    assert f"onnx-fp32-{TILE}x{TILE}" in m.artifacts and not list(tmp_path.glob("model-int8*"))
    rec = m.data["int8"]["graphs"][f"onnx-int8-{TILE}x{TILE}"]
    assert rec["written"] is False and "cannot meet" in rec["why"]
    assert not any(p.name.startswith(".int8-") for p in tmp_path.iterdir())  # no work files left


# --------------------------------------------------------------------------------------------- an outlier layer


def _with_outlier_channel(model: nc.NAFNet, scale: float) -> str:
    """Makes conv5 of the first block (full resolution) read a long-tailed input: channel 0 of its gate product
    is ``scale`` times larger (conv4's second half, channel 0, scaled up; conv5's input channel 0 scaled down by
    the same factor), the same function to FP32 rounding. Returns the deploy key of that conv."""
    block = model.encoders[0][0]
    c = block.conv5.in_channels
    with torch.no_grad():
        block.conv4.weight[c] *= scale
        block.conv4.bias[c] *= scale
        block.conv5.weight[:, 0] /= scale
    return "encoders.0.0.conv5"


@pytest.mark.slow
def test_an_outlier_layer_goes_back_to_float_and_the_budget_holds(tmp_path, synth_root):
    torch.manual_seed(0)
    model = make_nontrivial(nc.create_model("tiny", **MINI))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    key = _with_outlier_channel(model, 3000.0)
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-4)  # the same model
    ckpt = tmp_path / "outlier.pt"
    nc.save_checkpoint(ckpt, model, train_size=TRAIN_SIZE)
    _int8_export(ckpt, tmp_path / "out", cpu_form="never")
    rec = load_manifest(tmp_path / "out").artifacts[f"onnx-int8-{TILE}x{TILE}"]["int8"]
    floats = [c["conv"] for c in rec["float_convs"]]
    assert key in floats and floats[0] == key  # ranked worst, returned to float first
    assert rec["search"][0]["float_convs"] == 0 and abs(rec["search"][0]["val_delta_psnr_db"]) > 0.10  # it mattered
    assert abs(rec["val_delta_psnr_db"]) <= 0.10


@pytest.mark.slow
def test_export_cli_int8_flags(tiny_checkpoint, tmp_path, synth_root):
    from click.testing import CliRunner

    from cli import main

    shutil.copy(tiny_checkpoint, tmp_path / "tiny.pt")
    r = CliRunner().invoke(main, ["export", str(tmp_path / "tiny.pt"), "--tile", f"{TILE}x{TILE}", "--int8",
                                 "--int8-crops", "4", "--int8-calibration", "percentile", "--int8-cpu-form", "never",
                                 "--data", str(synth_root), "--no-check", "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    m = load_manifest(tmp_path / "out")
    assert m.data["int8"]["calibration"] == "percentile" and m.data["int8"]["data"] == str(synth_root)
    assert f"onnx-int8-{TILE}x{TILE}" in m.artifacts and f"onnx-int8-cpu-{TILE}x{TILE}" not in m.artifacts
    assert f"model-int8-{TILE}x{TILE}.onnx" in r.output


def test_cpu_form_is_written_only_where_measured_faster(monkeypatch, tmp_path):
    from export import api, int8

    fp32, cpu = tmp_path / "fp32.onnx", tmp_path / "cpu.onnx"
    x = np.zeros((1, 3, 48, 64), np.float32)
    for ms, expect_written in (({fp32: 10.0, cpu: 6.0}, True), ({fp32: 10.0, cpu: 14.0}, False)):
        monkeypatch.setattr(int8, "onnx_latency_ms", lambda path, x, rounds=3, ms=ms: ms[path])
        record: dict = {}
        why = api._cpu_form_slower(record, fp32, cpu, x)
        assert (why == "") == expect_written
        assert record["latency_ms_here"] == {"fp32": ms[fp32], "int8-cpu": ms[cpu]}
        if not expect_written:
            assert "not faster than fp32" in why and "14.0 vs 10.0 ms at 48x64" in why and "always" in why
