"""Reliability of ``export``: bad checkpoints, unwritable --out, tampered artifacts and manifests,
engines from another TensorRT/GPU, kill -9 mid-export.

Already covered elsewhere (not repeated): tests/test_checkpoint.py (malicious pickle refused and not
executed, truncated/empty/text/dir checkpoints, failed save keeps the previous file), tests/test_export.py
(interrupted export leaves no manifest, a modified artifact is named by verify).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import nafnet_core as nc
from cli import main
from export import ManifestError, engine_mismatch, export_model, load_manifest, verify, verify_artifact, verify_file
from tests.helpers import small_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = small_model()
    return nc.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.pt", model, train_size=16)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    return export_model(checkpoint, tmp_path_factory.mktemp("exp"), tiles=[(16, 16)], dynamic=False, check=False)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _make_checkpoint(kind: str, path: Path, good: Path) -> None:
    if kind == "zero_byte":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "malicious_pickle":
        with open(path, "wb") as f:
            pickle.dump({"params": _Evil(path.parent / "pwned")}, f, protocol=2)
    elif kind == "official_without_preset":
        nc.save_official(path, nc.load_checkpoint(good).model)


# kind -> (exit code, fragment of the one-line error)
BAD_CHECKPOINTS = {
    "zero_byte": (1, "empty file (0 bytes)"),
    "text": (1, "not a readable checkpoint"),
    "truncated": (1, "not a readable checkpoint"),
    "malicious_pickle": (1, "refused to load: it contains pickled Python objects"),
    "official_without_preset": (1, "pass --preset"),
}


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_bad_checkpoint_is_one_line_and_writes_nothing(kind, checkpoint, tmp_path):
    path = tmp_path / f"{kind}_ü.pt"
    _make_checkpoint(kind, path, checkpoint)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["export", str(path), "--out", str(out), "--tile", "16x16", "--no-check"])
    code, fragment = BAD_CHECKPOINTS[kind]
    assert res.exit_code == code and "Traceback" not in res.output, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {path}: ") and fragment in lines[0], res.output
    assert not (out / "manifest.json").exists()
    assert not (tmp_path / "pwned").exists()  # the pickle's payload never ran


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_missing_or_directory_checkpoint_is_a_usage_error(tmp_path, kind):
    path = tmp_path / "m.pt"
    if kind == "directory":
        path.mkdir()
    res = CliRunner().invoke(main, ["export", str(path)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert str(path) in res.output and ("does not exist" in res.output or "is a directory" in res.output)


def test_non_ascii_paths_export(checkpoint, tmp_path):
    src = tmp_path / "modèle_日本.pt"
    shutil.copy(checkpoint, src)
    out = tmp_path / "sortie_ü"
    res = CliRunner().invoke(main, ["export", str(src), "--out", str(out), "--tile", "16x16", "--no-check"])
    assert res.exit_code == 0, res.output
    assert verify(out).data["source"]["checkpoint"] == str(src)


@pytest.mark.parametrize("where", ["out_is_a_file", "parent_is_a_file"])
def test_unwritable_out_is_one_line(checkpoint, tmp_path, where):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker if where == "out_is_a_file" else blocker / "sub"
    res = CliRunner().invoke(main, ["export", str(checkpoint), "--out", str(out), "--tile", "16x16", "--no-check"])
    assert res.exit_code in (1, 2) and "Traceback" not in res.output, res.output
    assert str(out) in res.output or str(blocker) in res.output
    assert blocker.read_text() == "x"


# ------------------------------------------------------------------------------------------------ tamper

def _copy(exported, tmp_path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(exported.directory, d)
    return d


def test_modified_artifact_refused_with_override_hint(exported, tmp_path):
    d = _copy(exported, tmp_path)
    manifest = load_manifest(d)
    name = next(iter(manifest.artifacts))
    path = manifest.path(name)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=f"{path}: modified since export.*--no-verify"):
        verify_artifact(manifest, name)
    with pytest.raises(ManifestError, match="modified since export"):
        verify_file(path)
    path.write_bytes(bytes(data[:100]))  # truncated
    with pytest.raises(ManifestError, match="modified since export"):
        verify_artifact(manifest, name)
    path.unlink()
    with pytest.raises(ManifestError, match="missing"):
        verify(d)


def test_modified_or_outside_build_commands_are_refused(exported, tmp_path):
    d = _copy(exported, tmp_path)
    commands = d / "TENSORRT.md"
    assert "trtexec --onnx=model-fp32-16x16.onnx" in commands.read_text()
    commands.write_text(commands.read_text().replace("--noTF32", "--fp16"))  # hand-edited build commands
    with pytest.raises(ManifestError, match=f"{commands}: modified since export"):
        verify(d)
    data = json.loads((d / "manifest.json").read_text())
    data["files"]["tensorrt-commands"]["file"] = str(Path("..") / "TENSORRT.md")  # outside the folder
    (d / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="points outside its directory"):
        load_manifest(d)


def test_lone_file_without_manifest_has_nothing_to_check(exported, tmp_path):
    d = _copy(exported, tmp_path)
    (d / "manifest.json").unlink()
    onnx = next(d.glob("*.onnx"))
    assert verify_file(onnx) is None
    assert verify_file(exported.path(next(iter(exported.artifacts))))[1] == next(iter(exported.artifacts))


@pytest.mark.parametrize("file", ["../outside.onnx", "/etc/passwd", "sub/model.onnx", "..", ""])
def test_manifest_pointing_outside_its_folder_is_refused(exported, tmp_path, file):
    d = _copy(exported, tmp_path)
    data = json.loads((d / "manifest.json").read_text())
    next(iter(data["artifacts"].values()))["file"] = file
    (d / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="refusing a manifest that points outside its directory"):
        load_manifest(d)


@pytest.mark.parametrize("text", ["", "{not json", '{"format": "other"}', "[]"],
                         ids=["empty", "syntax", "foreign", "list"])
def test_broken_manifest_is_one_clear_error(exported, tmp_path, text):
    d = _copy(exported, tmp_path)
    (d / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match=str(d / "manifest.json")):
        load_manifest(d)


HERE = {"version": "10.13.0", "gpu": "NVIDIA L4", "compute_capability": "8.9"}


@pytest.mark.parametrize("built,reason", [
    (HERE, None),
    ({**HERE, "version": "10.12.0"}, "TensorRT 10.12.0 at build time, 10.13.0 here"),
    ({**HERE, "compute_capability": "7.5", "gpu": "Tesla T4"},
     "compute capability 7.5 at build time, 8.9 here; GPU Tesla T4 at build time, NVIDIA L4 here"),
    ({**HERE, "gpu": "NVIDIA L40S"}, "GPU NVIDIA L40S at build time, NVIDIA L4 here"),
    ({}, "TensorRT ? at build time"),
], ids=["same", "other_tensorrt", "other_gpu_arch", "other_gpu_same_arch", "no_record"])
def test_engine_from_another_setup_is_refused_with_the_reason(built, reason):
    got = engine_mismatch(built, HERE)
    if reason is None:
        assert got is None
    else:
        assert reason in got and "rebuild it on this machine" in got and "--no-verify" in got


# ----------------------------------------------------------------------------------------------- kill -9

@pytest.mark.slow
def test_kill9_mid_export_leaves_no_valid_manifest(checkpoint, tmp_path):
    """kill -9 at a seeded-random moment of an export over an older one: at every moment checked (while it
    runs and after the kill) the folder either has no manifest or one whose every hash matches; a re-run
    completes and removes the dead run's temporary files."""
    out = tmp_path / "out"
    export_model(checkpoint, out, tiles=[(16, 16)], dynamic=False, check=False)  # an older, valid export
    args = [sys.executable, str(ROOT / "cli.py"), "export", str(checkpoint), "--out", str(out), "--tile", "16x16",
            "--tile", "32x32", "--no-check"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def consistent() -> bool:
        try:
            verify(out)
            return True
        except ManifestError as e:
            assert "no manifest" in str(e), e  # never a manifest that vouches for a bad file
            return False

    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    t0 = time.time()
    while consistent():  # the old manifest goes first thing
        assert p.poll() is None and time.time() - t0 < 120
        time.sleep(0.05)
    deadline = time.time() + random.Random(7).uniform(0.5, 4.0)
    while time.time() < deadline and p.poll() is None:
        consistent()
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert not consistent() or p.returncode == 0  # killed: no manifest (unless it had already finished)
    r = subprocess.run(args, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(verify(out).artifacts) == {"onnx-fp32-16x16", "onnx-fp32-32x32"}
    assert not list(out.glob(".*.part"))
