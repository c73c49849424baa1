"""`export triton`: every config.pbtxt parses with Triton's own ModelConfig schema (shipped in tritonclient)
and agrees with the ONNX graph it serves: names, dims, types, batching, instance groups, accelerator."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from click.testing import CliRunner

from cli import main
from export.manifest import file_record, load_manifest, write_manifest
from export.triton_repo import RepoOptions, RepositoryError, write_repository

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                         reason='Triton\'s model-config schema comes with tritonclient: pip install -e ".[client]"')
text_format = pytest.importorskip("google.protobuf.text_format")

ONNX_TYPES = {onnx.TensorProto.FLOAT: mc.TYPE_FP32, onnx.TensorProto.FLOAT16: mc.TYPE_FP16}


def parse(path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())  # raises on any field Triton does not know


def check_against_graph(config, onnx_path) -> None:
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    for declared, actual in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in declared] == [v.name for v in actual]
        for t, v in zip(declared, actual):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            if config.max_batch_size > 0:
                assert dims[0] == -1, "a batched model needs a dynamic first dimension"
                dims = dims[1:]
            assert list(t.dims) == dims
            assert t.data_type == ONNX_TYPES[v.type.tensor_type.elem_type]


@pytest.fixture
def export_with_engine(tmp_path, tiny_export):
    """A copy of the tiny export plus an engine record (no TensorRT here: the bytes stand in for a plan)."""
    d = tmp_path / "export"
    shutil.copytree(tiny_export, d)
    data = load_manifest(d).data
    engine = d / "model-fp16-dynamic.engine"
    engine.write_bytes(b"stand-in for a serialized TensorRT plan")
    data["artifacts"]["trt-fp16-dynamic"] = {
        **file_record(engine), "format": "trt-fp16", "precision": "fp16", "runtime": "tensorrt",
        "shape": {"kind": "dynamic"}, "built_from": "onnx-fp16-dynamic",
        "tensorrt": {"version": "10.13.0", "gpu": "NVIDIA L4", "compute_capability": "8.9",
                     "profile": {"min": [1, 3, 64, 64], "opt": [1, 3, 720, 1280], "max": [4, 3, 1088, 1920]}}}
    write_manifest(d, data)
    return d


def test_repository_from_an_export_with_an_engine(tmp_path, export_with_engine):
    repo = tmp_path / "repo"
    configs = write_repository(export_with_engine, repo, RepoOptions(max_batch=8, instances=2, delay_us=500))
    assert [c.relative_to(repo).as_posix() for c in configs] == ["nafnet/config.pbtxt", "nafnet_trt/config.pbtxt"]
    manifest = load_manifest(export_with_engine)

    ort = parse(repo / "nafnet" / "config.pbtxt")
    assert (ort.name, ort.platform, ort.max_batch_size) == ("nafnet", "onnxruntime_onnx", 8)
    check_against_graph(ort, repo / "nafnet" / "1" / "model.onnx")
    assert (repo / "nafnet" / "1" / "model.onnx").read_bytes() == manifest.path("onnx-fp32-dynamic").read_bytes()
    assert ort.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.kind, g.count) for g in ort.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 2)]
    (acc,) = ort.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
    assert acc.parameters["trt_profile_min_shapes"] == "input:1x3x64x64"
    assert acc.parameters["trt_profile_opt_shapes"] == "input:1x3x720x1280"
    assert acc.parameters["trt_profile_max_shapes"] == "input:8x3x1088x1920"
    (warm,) = ort.model_warmup
    assert list(warm.inputs["input"].dims) == [3, 720, 1280] and warm.inputs["input"].zero_data

    plan = parse(repo / "nafnet_trt" / "config.pbtxt")
    assert (plan.name, plan.platform) == ("nafnet_trt", "tensorrt_plan")
    assert plan.max_batch_size == 4  # the engine's profile allows no more than 4
    check_against_graph(plan, manifest.path("onnx-fp16-dynamic"))  # the graph the engine was built from
    assert (repo / "nafnet_trt" / "1" / "model.plan").read_bytes() == b"stand-in for a serialized TensorRT plan"
    assert not list(repo.rglob("*.part"))


def test_cpu_instances_and_fixed_tile_graphs(tmp_path, tiny_tile_export):
    """KIND_CPU gets no GPU accelerator; an export with only a fixed tile gives fixed dims."""
    d = tmp_path / "export"
    shutil.copytree(tiny_tile_export, d)
    data = load_manifest(d).data
    data["artifacts"] = {k: v for k, v in data["artifacts"].items() if v["shape"]["kind"] == "tile"}
    write_manifest(d, data)
    (cfg,) = write_repository(d, tmp_path / "repo", RepoOptions(kind="cpu", name="deblur"))
    config = parse(cfg)
    assert config.name == "deblur" and config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator
    check_against_graph(config, cfg.parent / "1" / "model.onnx")
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, 3, 64, 64]
    assert not config.HasField("dynamic_batching")  # Triton refuses a batcher without a batch dimension


def test_cli_writes_refuses_to_clobber_and_checks_the_export(tmp_path, tiny_export):
    repo = tmp_path / "repo"
    args = ["export", "triton", str(tiny_export), "--out", str(repo), "--accelerator", "trt-fp32"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "docker run" in res.output and "--model-repository=/models" in res.output
    acc = parse(repo / "nafnet" / "config.pbtxt").optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert acc.parameters["precision_mode"] == "FP32"
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "nafnet exist; pass --overwrite" in res.output
    assert CliRunner().invoke(main, args + ["--overwrite"]).exit_code == 0

    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_export, tampered)
    onnx_file = load_manifest(tampered).path("onnx-fp32-dynamic")
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10])
    res = CliRunner().invoke(main, ["export", "triton", str(tampered), "--out", str(tmp_path / "r2")])
    assert res.exit_code == 1 and "modified since export" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r2" / "nafnet" / "config.pbtxt").exists()


def test_bad_names_and_exports_without_fp32_graphs_are_one_line(tmp_path, tiny_tile_export):
    with pytest.raises(RepositoryError, match="model name 'a/b'"):
        RepoOptions(name="a/b")
    d = tmp_path / "export"
    shutil.copytree(tiny_tile_export, d)
    data = json.loads((d / "manifest.json").read_text())
    data["artifacts"] = {k: v for k, v in data["artifacts"].items() if v["precision"] != "fp32"}
    write_manifest(d, data)
    with pytest.raises(RepositoryError, match="no FP32 ONNX graph"):
        write_repository(d, tmp_path / "repo")


def test_export_with_triton_flag_writes_the_repository_after_the_export(tmp_path, tiny_export, tiny_checkpoint,
                                                                         monkeypatch):
    """`export CKPT --triton REPO` = export, then `export triton` on the result (the export itself is stubbed
    by a copy of the shared tiny export: what is tested here is the hand-over)."""
    import export.api

    def fake_export(checkpoint, out_dir, **kwargs):
        shutil.copytree(tiny_export, out_dir, dirs_exist_ok=True)
        return load_manifest(out_dir)

    monkeypatch.setattr(export.api, "export_model", fake_export)
    out, repo = tmp_path / "exp", tmp_path / "repo"
    res = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "--out", str(out), "--triton", str(repo),
                                    "--profile", "32x32:256x256:512x512"])
    assert res.exit_code == 0, res.output
    config = parse(repo / "nafnet" / "config.pbtxt")
    acc = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert acc.parameters["trt_profile_max_shapes"] == "input:8x3x512x512"
    check_against_graph(config, repo / "nafnet" / "1" / "model.onnx")
