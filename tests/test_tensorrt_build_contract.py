"""The thin TensorRT layer's calls, against a stand-in ``tensorrt`` module that records them.

TensorRT cannot run here (no GPU, not installable). This does not test TensorRT: it pins down what
``build_engine`` asks of it, per the TensorRT 10.12+/11 Python API — a strongly typed network, no
precision builder flags (removed in 11), TF32 cleared so the FP32 islands stay FP32, the workspace
limit, the optimisation profile, the timing cache read and written back — and that the engine and cache
files are written atomically from what the builder returns.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from export.shapes import Profile
from export.trt_plan import TrtOptions


def fake_tensorrt(calls: list, parse_ok: bool = True, plan: bytes | None = b"PLAN", foreign_cache: bool = False,
                  no_cache_after_build: bool = False) -> types.ModuleType:
    """A recording stand-in. Timing caches: bytes starting with ``CACHE`` parse, anything else raises like a
    corrupt file; ``foreign_cache`` makes ``set_timing_cache`` reject a non-empty cache (another GPU);
    ``no_cache_after_build`` makes ``get_timing_cache`` return None."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "11.0.0-fake"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32")  # FP16/INT8/... do not exist in TensorRT 11
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

    class Cache:
        def __init__(self, data=b""):
            self.data = data

        def serialize(self):
            return b"CACHE"

    class Config:
        builder_optimization_level = 3

        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", pool, size))

        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def clear_flag(self, flag):
            calls.append(("clear_flag", flag))

        def create_timing_cache(self, data):
            calls.append(("timing_cache_in", bytes(data)))
            if data and not bytes(data).startswith(b"CACHE"):
                raise RuntimeError("Failed to deserialize the timing cache")
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            ok = not (foreign_cache and cache.data)
            calls.append(("set_timing_cache", ignore_mismatch, ok))
            return ok

        def get_timing_cache(self):
            return None if no_cache_after_build else Cache()

        def add_optimization_profile(self, profile):
            calls.extend(("profile", shapes) for shapes in profile.shapes)

    class OptProfile:
        def __init__(self):
            self.shapes = []

        def set_shape(self, name, lo, opt, hi):
            self.shapes.append((name, lo, opt, hi))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("network_flags", flags))
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return OptProfile()

        def build_serialized_network(self, network, config):
            calls.append(("opt_level", config.builder_optimization_level))
            return plan

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parse", path))
            return parse_ok

        def get_error(self, i):
            return "Unsupported operator FancyOp"

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt


@pytest.fixture
def build(monkeypatch, tmp_path):
    def run(**kw):
        calls: list = []
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls, **kw))
        from export.tensorrt_build import build_engine

        profile = Profile((1, 3, 64, 64), (1, 3, 720, 1280), (1, 3, 1088, 1920))
        options = TrtOptions(workspace_gib=2, opt_level=4, timing_cache=tmp_path / "cache.bin")
        record = build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", profile, "input", options)
        return calls, record

    return run


def test_build_asks_for_a_strongly_typed_fp32_exact_engine(build, tmp_path):
    calls, record = build()
    assert ("network_flags", 1 << 1) in calls  # STRONGLY_TYPED
    assert ("clear_flag", "TF32") in calls and not [c for c in calls if c[0] == "set_flag"]
    assert ("workspace", "WORKSPACE", 2 * 2**30) in calls and ("opt_level", 4) in calls
    assert ("profile", ("input", (1, 3, 64, 64), (1, 3, 720, 1280), (1, 3, 1088, 1920))) in calls
    assert ("timing_cache_in", b"") in calls and ("set_timing_cache", False, True) in calls
    assert (tmp_path / "m.engine").read_bytes() == b"PLAN" and (tmp_path / "cache.bin").read_bytes() == b"CACHE"
    assert record["strongly_typed"] is True and record["tf32"] is False and record["timing_cache_reused"] is False
    assert record["version"] == "11.0.0-fake" and record["profile"]["opt"] == [1, 3, 720, 1280]
    calls, record = build()  # the second build reads the cache the first wrote
    assert ("timing_cache_in", b"CACHE") in calls and record["timing_cache_reused"] is True


def test_parser_errors_and_failed_builds_write_nothing(build, tmp_path):
    with pytest.raises(RuntimeError, match="ONNX parser failed: Unsupported operator FancyOp"):
        build(parse_ok=False)
    with pytest.raises(RuntimeError, match="could not build an engine"):
        build(plan=None)
    assert not (tmp_path / "m.engine").exists() and not list(Path(tmp_path).glob(".*.part"))


def _cache_warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "timing cache" in line]


@pytest.mark.parametrize("kind", ["foreign", "corrupt", "unreadable"])
def test_rejected_timing_cache_falls_back_to_an_empty_one(build, tmp_path, capsys, monkeypatch, kind):
    cache = tmp_path / "cache.bin"
    cache.write_bytes({"foreign": b"CACHE from another GPU", "corrupt": b"\x00garbage", "unreadable": b"CACHE"}[kind])
    if kind == "unreadable":  # root reads any mode, so deny this one path
        real = Path.read_bytes

        def read_bytes(self):
            if self == cache:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    calls, record = build(foreign_cache=(kind == "foreign"))
    ins = [c for c in calls if c[0] == "timing_cache_in"]
    assert ins[-1] == ("timing_cache_in", b"") and calls[-1] == ("opt_level", 4)  # built, with an empty cache
    assert [c for c in calls if c[0] == "set_timing_cache"][-1] == ("set_timing_cache", False, True)
    assert record["timing_cache_reused"] is False and (tmp_path / "m.engine").read_bytes() == b"PLAN"
    warnings = _cache_warnings(capsys.readouterr().err)
    why = {"foreign": "another GPU", "corrupt": "corrupt", "unreadable": "unreadable"}[kind]
    assert len(warnings) == 1 and why in warnings[0] and str(cache) in warnings[0]
    monkeypatch.undo()
    assert cache.read_bytes() == b"CACHE"  # replaced by the fresh cache after the build


def test_cache_lost_after_the_build_never_fails_it(build, tmp_path, capsys):
    calls, record = build(no_cache_after_build=True)
    assert (tmp_path / "m.engine").read_bytes() == b"PLAN" and record["build_seconds"] >= 0
    assert not (tmp_path / "cache.bin").exists() and not list(tmp_path.glob(".*.part"))
    [warning] = _cache_warnings(capsys.readouterr().err)
    assert "not saved" in warning and "engine is fine" in warning
