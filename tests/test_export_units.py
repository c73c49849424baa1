"""Pure logic of export: shapes, profiles, the format table, TensorRT plan, graph checks, lint, range report."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto, helper

import nafnet_core as nc
from export import FORMATS, ShapeSpec, TrtOptions, graph, make_profile, parse_hw, parse_profile
from export.formats import formats_for
from export.lint import lint_onnx
from export.ranges import fp16_range_report
from export.shapes import ShapeError
from export.trt_plan import default_timing_cache, missing_message
from tests.helpers import make_nontrivial, photo


def test_parse_hw_and_profile():
    assert parse_hw("720x1280") == (720, 1280)
    assert parse_hw("512") == (512, 512)
    assert parse_hw(" 64 X 96 ") == (64, 96)
    for bad in ("0x5", "12x", "axb", "1x2x3", "-4"):
        with pytest.raises(ShapeError, match="HEIGHTxWIDTH"):
            parse_hw(bad)
    assert parse_profile("64x64:720x1280:1088x1920") == ((64, 64), (720, 1280), (1088, 1920))
    with pytest.raises(ShapeError, match="min <= opt <= max"):
        parse_profile("64x64:720x1280:512x512")
    with pytest.raises(ShapeError, match="MIN:OPT:MAX"):
        parse_profile("64x64:720x1280")


def test_shape_spec_tags_and_profiles():
    tile, dyn = ShapeSpec.tile(512, 512), ShapeSpec.dynamic()
    assert tile.tag == "512x512" and ShapeSpec.tile(720, 1280, 4).tag == "b4-720x1280" and dyn.tag == "dynamic"
    assert tile.input_shape() == [1, 3, 512, 512] and dyn.input_shape() == ["batch", 3, "height", "width"]
    assert ShapeSpec.from_dict(tile.to_dict()) == tile and ShapeSpec.from_dict(dyn.to_dict()) == dyn
    p = make_profile(ShapeSpec.tile(720, 1280, 2))
    assert p.min == p.opt == p.max == (2, 3, 720, 1280)
    p = make_profile(dyn, ((64, 64), (720, 1280), (1088, 1920)), max_batch=4)
    assert p.to_dict() == {"min": [1, 3, 64, 64], "opt": [1, 3, 720, 1280], "max": [4, 3, 1088, 1920]}
    with pytest.raises(ShapeError):
        ShapeSpec(height=5)
    with pytest.raises(ShapeError):
        ShapeSpec.tile(0, 4)


def test_format_table_drives_names():
    assert list(FORMATS) == ["onnx-fp32", "onnx-fp16", "trt-fp16", "onnx-int8", "onnx-int8-cpu", "trt-int8",
                            "openvino-fp32"]
    spec = ShapeSpec.tile(512, 512)
    assert FORMATS["onnx-fp16"].artifact_name(spec) == "onnx-fp16-512x512"
    assert FORMATS["trt-fp16"].file_name(spec) == "model-fp16-512x512.engine"
    assert FORMATS["trt-fp16"].built_from == "onnx-fp16"
    assert [f.name for f in formats_for(fp16=False, trt=False)] == ["onnx-fp32"]
    assert [f.name for f in formats_for(fp16=False, trt=True)] == ["onnx-fp32", "onnx-fp16", "trt-fp16"]
    assert [f.name for f in formats_for(fp16=False, trt=False, openvino=True)] == ["onnx-fp32", "openvino-fp32"]
    assert FORMATS["openvino-fp32"].file_name(spec) == "model-fp32-512x512.xml"
    assert FORMATS["openvino-fp32"].built_from == "onnx-fp32"


def test_tensorrt_plan(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = default_timing_cache("10.13.0.35", "NVIDIA GeForce RTX 4090", "8.9")
    assert path == tmp_path / "nafnet-deblurring" / "tensorrt" / "trt-10.13.0.35-nvidia-geforce-rtx-4090-sm89.cache"
    assert TrtOptions(workspace_gib=2).workspace_bytes == 2 * 2**30
    with pytest.raises(ValueError):
        TrtOptions(opt_level=6)
    msg = missing_message("TensorRT", "out")
    assert msg.count(".") >= 1 and "pip install" in msg and "out" in msg


def _tiny_graph(op: str, axes_computed: bool = False, domain: str = "") -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])
    nodes, inits = [], [helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    axes = "axes"
    if axes_computed:
        nodes.append(helper.make_node("Shape", ["x"], ["s"]))
        nodes.append(helper.make_node("Slice", ["s", "axes", "axes"], ["axes2"]))
        axes = "axes2"
    nodes.append(helper.make_node(op, ["x", axes], ["y"], domain=domain))
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 18)])


def test_graph_checks_can_fail():
    ok = _tiny_graph("CumSum")
    assert graph.computed_axes(ok) == [] and graph.unsupported_ops(ok) == [] and graph.shape_arithmetic(ok) == []
    bad = _tiny_graph("CumSum", axes_computed=True)
    assert graph.computed_axes(bad) and graph.shape_arithmetic(bad) == ["Shape "]
    assert graph.unsupported_ops(_tiny_graph("Foo", domain="custom")) == ["custom::Foo"]
    assert graph.unsupported_ops(_tiny_graph("StringNormalizer")) == ["StringNormalizer"]


def test_lint_reports_failures(tmp_path):
    path = tmp_path / "bad.onnx"
    onnx.save(_tiny_graph("CumSum", axes_computed=True), str(path))
    findings = {f.check: f for f in lint_onnx(path)}
    assert not findings["constant axes"].ok and "CumSum" in findings["constant axes"].detail
    assert findings["onnx.checker"].ok


def test_range_report_flags_overflow():
    torch.manual_seed(0)
    model = make_nontrivial(nc.create_model("tiny", width=4, enc_blk_nums=(1,), dec_blk_nums=(1,)))
    imgs = [photo(24, 32)]
    report = fp16_range_report(model, imgs, half_size=(16, 16))
    assert [b.block for b in report.blocks] == ["encoders.0.0", "middle_blks.0", "decoders.0.0"]
    assert all(0 < b.max_abs < 1e3 and 0 < b.max_stream < 1e3 and 0 < b.max_gate < 1e3 for b in report.blocks)
    assert report.overflows == [] and all(0 <= b.subnormal < 0.05 for b in report.blocks)
    assert report.half_psnr_db > 40
    with torch.no_grad():
        model.intro.weight.mul_(1e5)  # a residual stream of ~1e5 in the first block: past 65504
    hot = fp16_range_report(model, imgs, half_size=None)
    assert "encoders.0.0" in hot.overflows and hot.blocks[0].max_stream > 65504


def _manifest_for_commands() -> dict:
    from export.trt_plan import tensorrt_settings

    tile = {"kind": "tile", "batch": 1, "height": 512, "width": 512}
    dyn = ShapeSpec.dynamic().to_dict()
    arts = {f"onnx-{p}-{tag}": {"file": f"model-{p}-{tag}.onnx", "precision": p, "shape": shape}
            for p in ("fp32", "fp16") for tag, shape in (("512x512", tile), ("dynamic", dyn))}
    options = TrtOptions(workspace_gib=2, opt_level=5, profile_hw=((32, 48), (256, 320), (720, 1280)))
    return {"io": {"input": "input"}, "artifacts": arts, "tensorrt_settings": tensorrt_settings(options)}


def test_trtexec_commands_follow_the_manifest():
    from export.trt_plan import build_commands, polygraphy_commands, trtexec_command

    data = _manifest_for_commands()
    settings, arts = data["tensorrt_settings"], data["artifacts"]
    tile10 = trtexec_command("model-fp16-512x512.onnx", arts["onnx-fp16-512x512"], settings, 10)
    assert tile10[:3] == ["trtexec", "--onnx=model-fp16-512x512.onnx", "--saveEngine=model-fp16-512x512.engine"]
    assert "--stronglyTyped" in tile10 and "--noTF32" in tile10 and not any("Shapes" in a for a in tile10)
    assert "--memPoolSize=workspace:2048M" in tile10 and "--builderOptimizationLevel=5" in tile10
    dyn11 = trtexec_command("model-fp16-dynamic.onnx", arts["onnx-fp16-dynamic"], settings, 11)
    assert [a for a in dyn11 if "Shapes" in a] == ["--minShapes=input:1x3x32x48", "--optShapes=input:1x3x256x320",
                                                   "--maxShapes=input:1x3x720x1280"]
    assert "--stronglyTyped" not in dyn11
    for major in (10, 11):
        for argv in [trtexec_command("m.onnx", arts["onnx-fp16-dynamic"], settings, major),
                     *polygraphy_commands("m.onnx", "r.onnx", arts["onnx-fp16-dynamic"], settings, major)]:
            assert not any("fp16" in a.lower() and a.startswith("--") for a in argv)  # precision is the graph's
    ref, trt = polygraphy_commands("model-fp16-dynamic.onnx", "model-fp32-dynamic.onnx", arts["onnx-fp16-dynamic"],
                                   settings, 10)
    assert ref[2] == "model-fp32-dynamic.onnx" and "--onnxrt" in ref and "input:[1,3,256,320]" in ref
    assert "--strongly-typed" in trt and trt[trt.index("--trt-max-shapes") + 1] == "input:[1,3,720,1280]"
    assert trt[trt.index("--atol") + 1] == "0.02"
    text = build_commands(data)
    assert "## TensorRT 10.x" in text and "## TensorRT 11.x" in text
    assert "model-fp16-512x512.onnx" in text and "--onnx=model-fp32-512x512.onnx" not in text  # FP16 graphs only
    with pytest.raises(ValueError, match="10 or 11"):
        trtexec_command("m.onnx", arts["onnx-fp16-dynamic"], settings, 9)


def _graph(nodes, inits=(), opset: int = 18, shape=(1, 4, 4, 4), out_shape=None) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape or shape))
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], list(inits)),
                             opset_imports=[helper.make_opsetid("", opset)])


def _pad(mode: str) -> onnx.ModelProto:
    pads = helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, 1, 1, 0, 0, 1, 1])
    return _graph([helper.make_node("Pad", ["x", "pads"], ["y"], mode=mode)], [pads], opset=19,
                  out_shape=(1, 4, 6, 6))


def test_lint_rules_on_hand_built_graphs(tmp_path):
    for mode in ("constant", "edge"):
        assert graph.pad_mode_problems(_pad(mode)) == []
    for mode, why in (("reflect", "kREFLECT"), ("wrap", "opset-19")):
        [problem] = graph.pad_mode_problems(_pad(mode))
        assert repr(mode) in problem and why in problem

    def d2s(mode):
        return _graph([helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, mode=mode)],
                      out_shape=(1, 1, 8, 8))

    assert graph.depth_to_space_problems(d2s("CRD")) == []
    assert "PixelShuffle" in graph.depth_to_space_problems(d2s("DCR"))[0]

    def sliced(end: int, shape_value: int = 16):
        inits = [helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
                 helper.make_tensor("ends", TensorProto.INT64, [1], [end]),
                 helper.make_tensor("axes", TensorProto.INT64, [1], [2]),
                 helper.make_tensor("shape", TensorProto.INT64, [2], [4, shape_value])]
        nodes = [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["s"]),
                 helper.make_node("Reshape", ["s", "shape"], ["r"]),
                 helper.make_node("Identity", ["x"], ["y"])]
        return _graph(nodes, inits)

    assert graph.int64_beyond_int32(sliced(4)) == ([], [])
    problems, harmless = graph.int64_beyond_int32(sliced(2**63 - 1))
    assert problems == [] and harmless == ["ends = 9223372036854775807 (used by Slice input 2)"]
    problems, harmless = graph.int64_beyond_int32(sliced(4, shape_value=2**40))
    assert problems == ["shape = 1099511627776 (used by Reshape input 1)"] and harmless == []

    identity = [helper.make_node("Identity", ["x"], ["y"])]
    assert graph.opset_problems(_graph(identity, opset=18)) == []
    [problem] = graph.opset_problems(_graph(identity, opset=21))
    assert "opset 21" in problem and "--opset 20" in problem

    path = tmp_path / "reflect.onnx"  # lint_onnx reports each rule as a failed check
    onnx.save(_pad("reflect"), str(path))
    findings = {f.check: f for f in lint_onnx(path, run=False)}
    assert not findings["Pad modes (constant/edge)"].ok and findings["DepthToSpace mode (CRD)"].ok
    assert findings["opset within TensorRT's parser"].ok  # opset 19 is within 9-20
