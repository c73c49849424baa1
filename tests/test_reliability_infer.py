"""Reliability of ``infer``: the bad-input table, unwritable and escaping outputs, tampered models,
engines from another setup, and kill -9 mid-folder.

Already covered in tests/test_infer.py (not repeated): formats/depth/alpha kept, a re-run skips existing
outputs, a broken file is listed while the others are written.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from nafnet_core.images import read_image
from tests.helpers import TILE
from tests.reliability_cases import (
    CASES,
    SIZE,
    deny_read,
    one_line_naming,
    pixels,
    tamper_weights,
    unreadable_paths,
    write_case,
)

ROOT = Path(__file__).resolve().parents[1]


def _infer(*args: str):
    return CliRunner().invoke(main, ["infer", *map(str, args), "-q"])


@pytest.fixture(scope="module")
def table(tmp_path_factory, tiny_checkpoint):
    tmp = tmp_path_factory.mktemp("infer")
    src = tmp / "in"
    for case in CASES:
        write_case(src, case)
    Image.fromarray(pixels()).save(src / "a_good.png")
    os.symlink("..", src / "loop")  # a folder containing a symlink loop
    out = tmp / "out"
    with deny_read(unreadable_paths(src)):
        res = _infer(src, "--model", tiny_checkpoint, "--backend", "torch", "--out", out)
    return src, out, res


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_case(table, case):
    src, out, res = table
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    dst = out / case.file_name
    if case.outcome == "ok":
        restored = read_image(dst)  # written, decodes, same size as its input
        assert restored.size == (1, 1) if case.name == "one_by_one" else restored.size[0] in (1, SIZE[0])
        assert str(src / case.file_name) not in res.stderr
    else:
        assert not dst.exists()
        assert one_line_naming(res.stderr, src / case.file_name, case.message), res.stderr


def test_table_summary(table):
    src, out, res = table
    ok, bad = sum(c.outcome == "ok" for c in CASES) + 1, sum(c.outcome == "error" for c in CASES)
    assert f"wrote {ok}, skipped 0 existing, failed {bad}" in res.stdout
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == ok and not [p for p in files if p.name.endswith(".part")]  # the loop added nothing


def test_decompression_bomb_limit_is_configurable(tmp_path, tiny_checkpoint):
    Image.fromarray(pixels()).save(tmp_path / "a.png")
    res = _infer(tmp_path / "a.png", "--model", tiny_checkpoint, "--backend", "torch", "--out", tmp_path / "o",
                 "--max-pixels", 1000)
    assert res.exit_code == 1
    assert one_line_naming(res.stderr, tmp_path / "a.png",
                           f"{SIZE[1]}x{SIZE[0]} = 1,920 pixels exceeds the limit of 1,000 (possible decompression "
                           "bomb); if the image is genuine raise the limit with --max-pixels")
    res = _infer(tmp_path / "a.png", "--model", tiny_checkpoint, "--backend", "torch", "--out", tmp_path / "o",
                 "--max-pixels", 1920)
    assert res.exit_code == 0 and (tmp_path / "o" / "a.png").is_file()


# ----------------------------------------------------------------------------------------------- outputs

@pytest.mark.parametrize("where", ["out_is_a_file", "parent_is_a_file"])
def test_unwritable_out_is_one_line(tmp_path, tiny_checkpoint, where):
    Image.fromarray(pixels()).save(tmp_path / "a.png")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker if where == "out_is_a_file" else blocker / "sub"
    res = _infer(tmp_path / "a.png", "--model", tiny_checkpoint, "--backend", "torch", "--out", out)
    assert res.exit_code in (1, 2) and "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if "Error" in line]
    assert len(errors) == 1 and (str(out) in errors[0] or str(blocker) in errors[0]), res.output
    assert blocker.read_text() == "x"


def test_outputs_never_escape_out(tmp_path, tiny_checkpoint):
    """A symlinked folder planted in --out is refused; names with '..' and absolute inputs stay inside."""
    src, out, elsewhere = tmp_path / "in", tmp_path / "out", tmp_path / "elsewhere"
    (src / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    Image.fromarray(pixels()).save(src / "sub" / "x.png")
    Image.fromarray(pixels()).save(src / "a..dots..png")
    out.mkdir()
    os.symlink(elsewhere, out / "sub")
    res = _infer(src, "--model", tiny_checkpoint, "--backend", "torch", "--out", out)
    assert res.exit_code == 1
    assert one_line_naming(res.stderr, out / "sub" / "x.png", "refusing to write outside the output folder")
    assert not list(elsewhere.iterdir())
    assert (out / "a..dots..png").is_file()
    # One file named through '..' and an absolute path: the output is OUT/<its name>, nowhere else.
    single = (src / "sub" / ".." / "a..dots..png").absolute()
    res = _infer(single, "--model", tiny_checkpoint, "--backend", "torch", "--out", tmp_path / "o2")
    assert res.exit_code == 0 and [p.name for p in (tmp_path / "o2").iterdir()] == ["a..dots..png"]


# ----------------------------------------------------------------------------------------- tamper, trust

def test_modified_export_is_refused_unless_no_verify(tmp_path, tiny_tile_export):
    d = tmp_path / "exp"
    shutil.copytree(tiny_tile_export, d)
    Image.fromarray(pixels()).save(tmp_path / "a.png")
    onnx = d / f"model-fp32-{TILE}x{TILE}.onnx"
    tamper_weights(onnx)
    for model in (d, onnx):
        res = _infer(tmp_path / "a.png", "--model", model, "--backend", "onnxrt", "--out", tmp_path / "o")
        assert res.exit_code == 1 and "Traceback" not in res.output
        assert f"Error: {onnx}: modified since export" in res.output and "--no-verify" in res.output
        assert not (tmp_path / "o" / "a.png").exists()
    res = _infer(tmp_path / "a.png", "--model", onnx, "--backend", "onnxrt", "--out", tmp_path / "o", "--no-verify")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "a.png").is_file()


def test_engine_from_another_setup_is_refused_by_the_runner(monkeypatch, tmp_path):
    """The runner that loads engines compares the manifest's record with this machine before loading."""
    from runtime import trt
    from runtime.runners import RunnerError, TensorRTRunner

    loaded = []

    class FakeSession:
        fixed_shape = None
        fixed_batch = None  # like a real EngineSession of a dynamic-batch engine

        def __init__(self, path):
            loaded.append(path)

        def close(self):
            pass

    monkeypatch.setattr(trt, "current_env", lambda: {"version": "10.13.0", "gpu": "NVIDIA L4",
                                                     "compute_capability": "8.9"})
    monkeypatch.setattr(trt, "EngineSession", FakeSession)
    record = {"version": "10.12.0", "gpu": "Tesla T4", "compute_capability": "7.5"}
    engine = tmp_path / "model.engine"
    runner = TensorRTRunner(engine, built_for=record)
    with pytest.raises(RunnerError, match=r"model.engine: engine built for another setup \(TensorRT 10.12.0 at build "
                                          r"time, 10.13.0 here; compute capability 7.5 .*GPU Tesla T4"):
        runner.activate()
    assert not loaded  # refused before TensorRT saw the file
    TensorRTRunner(engine, built_for=record, verify=False).activate()  # --no-verify
    TensorRTRunner(engine, built_for={"version": "10.13.0", "gpu": "NVIDIA L4", "compute_capability": "8.9"}).activate()
    assert loaded == [engine, engine]


def test_malicious_checkpoint_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "m.pt", "wb") as f:
        pickle.dump({"params": Evil()}, f, protocol=2)
    Image.fromarray(pixels()).save(tmp_path / "a.png")
    res = _infer(tmp_path / "a.png", "--model", tmp_path / "m.pt", "--backend", "torch")
    assert res.exit_code == 1 and "refused to load" in res.output and not marker.exists()


# ----------------------------------------------------------------------------------------------- kill -9

@pytest.mark.slow
def test_kill9_mid_folder_then_rerun(tmp_path, tiny_checkpoint):
    """While infer runs, and after kill -9 at a seeded-random moment, every file under a final name in the
    output folder decodes; the re-run skips those and writes the rest."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    n = 40
    for i in range(n):
        Image.fromarray(pixels(160, 160, seed=i)).save(src / f"img{i:03d}.png")
    args = [sys.executable, str(ROOT / "cli.py"), "infer", str(src), "--model", str(tiny_checkpoint), "--backend",
            "torch", "--out", str(out), "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    checked: set[str] = set()

    def finals_decode() -> int:
        finals = [p for p in out.glob("*") if not p.name.startswith(".")] if out.exists() else []
        for p in finals:
            assert read_image(p).size == (160, 160), p  # never a partial file under a final name
            checked.add(p.name)
        return len(finals)

    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    t0 = time.time()
    while finals_decode() == 0:
        assert p.poll() is None, p.communicate()[1][-2000:]
        assert time.time() - t0 < 120
        time.sleep(0.02)
    deadline = time.time() + random.Random(3).uniform(0.0, 0.5)
    while time.time() < deadline:
        finals_decode()
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    done = finals_decode()
    assert 0 < done < n, f"{done} of {n} written before the kill; make the folder larger"
    r = subprocess.run(args, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"wrote {n - done}, skipped {done} existing, failed 0" in r.stdout
    assert finals_decode() == n
    assert not list(out.glob(".*.part"))  # a temporary file the kill left (if any) is gone after the re-run


def test_rerun_removes_temporary_files_of_a_killed_run_only(tmp_path, tiny_checkpoint):
    """Stale atomic-write temporaries go; user files that merely look similar stay; while another run holds
    the output folder (its temporaries may be live) nothing is removed."""
    import fcntl

    Image.fromarray(pixels()).save(tmp_path / "a.png")
    out = tmp_path / "o"
    (out / "sub").mkdir(parents=True)
    stale = [out / ".a.png.k3x_9q1z.png.part", out / ".a.png.abcdefgh.png.part"]
    # Not temporaries of this run's output a.png: user files, another file's (a checkpoint being written, an
    # output of a nested run), temporaries in subfolders this run does not write.
    keep = [out / ".notes.part", out / "x.png.part", out / ".a.png.part", out / ".hidden",
            out / ".b.png.abcdefgh.png.part", out / ".last.pth.1pv0rmpv.pth.part",
            out / "sub" / ".a.png.abcdefgh.png.part", out / ".a.png.toolongxx.png.part"]
    for f in stale + keep:
        f.write_bytes(b"partial")
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # another run writing here
        res = _infer(tmp_path / "a.png", "--model", tiny_checkpoint, "--backend", "torch", "--out", out)
        assert res.exit_code == 0 and "removed" not in res.stdout
        assert all(f.exists() for f in stale + keep)
    finally:
        os.close(fd)
    res = _infer(tmp_path / "a.png", "--model", tiny_checkpoint, "--backend", "torch", "--out", out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert f"removed 2 temporary file(s) an interrupted run left in {out}" in res.stdout
    assert not any(f.exists() for f in stale) and all(f.exists() for f in keep)


def test_overwrite_replaces_a_bad_existing_output(tmp_path, tiny_checkpoint):
    """An existing output is skipped (resume); --overwrite replaces it atomically with a good one."""
    Image.fromarray(pixels()).save(tmp_path / "a.png")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "a.png").write_bytes(b"partial")
    res = _infer(tmp_path / "a.png", "--model", tiny_checkpoint, "--backend", "torch", "--out", tmp_path / "o")
    assert res.exit_code == 0 and "skipped 1 existing" in res.stdout
    res = _infer(tmp_path / "a.png", "--model", tiny_checkpoint, "--backend", "torch", "--out", tmp_path / "o",
                 "--overwrite")
    assert res.exit_code == 0 and read_image(tmp_path / "o" / "a.png").size == SIZE


def test_onnx_external_data_outside_its_folder_is_refused(tmp_path):
    """A lone .onnx whose weights point at a file outside its folder (../) is refused by onnxruntime."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    (tmp_path / "sub").mkdir()
    np.ones(3, np.float32).tofile(tmp_path / "outside.bin")
    w = numpy_helper.from_array(np.ones((1, 3, 1, 1), np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    entry = w.external_data.add()
    entry.key, entry.value = "location", "../outside.bin"
    graph = helper.make_graph([helper.make_node("Mul", ["input", "w"], ["output"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 16, 16])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx_path = tmp_path / "sub" / "m.onnx"
    onnx_path.write_bytes(model.SerializeToString())
    Image.fromarray(pixels(16, 16)).save(tmp_path / "a.png")
    res = _infer(tmp_path / "a.png", "--model", onnx_path, "--backend", "onnxrt", "--out", tmp_path / "o")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert f"Error: {onnx_path}: onnxruntime cannot load this graph" in res.output
    assert "escapes model directory" in res.output
    assert not (tmp_path / "o" / "a.png").exists()


@pytest.mark.parametrize("kind", ["zero_byte", "text", "truncated"])
def test_bad_onnx_file_is_one_line(tmp_path, tiny_tile_onnx, kind):
    onnx_path = tmp_path / "m.onnx"
    data = tiny_tile_onnx.read_bytes()
    onnx_path.write_bytes({"zero_byte": b"", "text": b"not a graph\n", "truncated": data[: len(data) // 2]}[kind])
    Image.fromarray(pixels(16, 16)).save(tmp_path / "a.png")
    res = _infer(tmp_path / "a.png", "--model", onnx_path, "--backend", "onnxrt", "--out", tmp_path / "o")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {onnx_path}: "), res.output
    assert not (tmp_path / "o" / "a.png").exists()


@pytest.mark.parametrize("value", ["2e8", "abc", "0", "-5", "²"])
def test_bad_pixel_limit_env_is_one_error_before_any_image(tmp_path, tiny_checkpoint, monkeypatch, value):
    """A bad NAFNET_MAX_PIXELS is one clear error naming the variable, not a crash at import or a failure per file."""
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(pixels()).save(src / "a.png")
    monkeypatch.setenv("NAFNET_MAX_PIXELS", value)
    res = _infer(src, "--model", tiny_checkpoint, "--backend", "torch", "--out", tmp_path / "out")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == [f"Error: NAFNET_MAX_PIXELS={value!r} is not a positive whole number "
                                               "of pixels; unset it or set e.g. NAFNET_MAX_PIXELS=400000000"]
    assert not (tmp_path / "out" / "a.png").exists()
    monkeypatch.setenv("NAFNET_MAX_PIXELS", "100")  # a valid value is the limit for infer too
    res = _infer(src, "--model", tiny_checkpoint, "--backend", "torch", "--out", tmp_path / "out")
    assert res.exit_code == 1 and "exceeds the limit of 100" in res.output
