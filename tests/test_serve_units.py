"""Serving without a server: the request checks, the batched callable, ports, URLs, the concurrent
inference path, and that the core install stays free of the serve extra's numpy<2 pin.

These run everywhere (no PyTriton, no tritonclient needed); tests/test_serve.py runs the real server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nafnet_core.images import read_image, to_uint8
from runtime.infer import infer_path
from runtime.models import open_runner
from runtime.remote import RemoteError, parse_server_url
from runtime.restore import restore
from runtime.serve import (
    ERROR,
    INPUT,
    OUTPUT,
    PR_GET_CHILD_SUBREAPER,
    ImageModel,
    OwnProcesses,
    ServeError,
    _prctl,
    check_ports,
    check_request,
    descendants,
    library_path_fix,
    process_table,
    remove_stale_shared_memory,
)
from tests.helpers import photo


@pytest.fixture(scope="module")
def runner(tiny_export):
    with open_runner(tiny_export, "onnxrt", threads=1) as r:
        yield r


def test_check_request_names_each_problem():
    ok = np.zeros((1, 3, 8, 8), np.float32)
    assert check_request(ok, 100) == ""
    assert "shape [1, 4, 8, 8]" in check_request(np.zeros((1, 4, 8, 8), np.float32), 100)
    assert "shape [3, 8, 8]" in check_request(np.zeros((3, 8, 8), np.float32), 100)
    assert "over this server's limit of 63" in check_request(ok, 63) and "8x8" in check_request(ok, 63)
    bad = ok.copy()
    bad[0, 1, 2, 3] = np.nan
    assert "NaN" in check_request(bad, 100)
    assert "empty image" in check_request(np.zeros((1, 3, 0, 8), np.float32), 100)


def test_a_bad_request_fails_alone_in_its_batch(runner):
    """The callable gets Triton's batch as a list: the poisoned request gets its reason, the others their
    images, equal to the local inference path; nothing raises (a raise would fail the whole batch)."""
    model = ImageModel(runner, max_pixels=48 * 64)
    xs = [photo(48, 64, i).numpy() for i in range(4)]
    poisoned = xs[2].copy()
    poisoned[0, 0, 5, 5] = np.inf
    big = photo(64, 64, 1).numpy()  # 4096 px > 3072
    requests = [{INPUT: xs[0]}, {INPUT: xs[1]}, {INPUT: poisoned}, {INPUT: xs[3]}, {INPUT: big},
                {INPUT: np.concatenate([xs[0], xs[3]])}]  # one request may carry several images
    answers = model(requests)
    assert len(answers) == len(requests) and model.batches == [6]
    for i in (0, 1, 3):
        assert answers[i][ERROR].tolist() == [[b""]]
        np.testing.assert_allclose(answers[i][OUTPUT], restore(runner, torch.from_numpy(xs[i])).numpy(), atol=1e-5)
    assert b"NaN or infinite" in answers[2][ERROR][0, 0] and np.isnan(answers[2][OUTPUT]).all()
    assert b"64x64 has 4,096 pixels" in answers[4][ERROR][0, 0]
    assert answers[5][OUTPUT].shape == (2, 3, 48, 64) and answers[5][ERROR].tolist() == [[b""], [b""]]
    np.testing.assert_allclose(answers[5][OUTPUT][1], answers[3][OUTPUT][0], atol=1e-5)


def test_large_images_are_tiled_like_infer(runner):
    """Above the whole-image limit the server tiles (TLC-exact tiles, blended) exactly as infer does."""
    model = ImageModel(runner, tile=(32, 32), overlap=8)
    x = photo(40, 72, 2).numpy()
    (answer,) = model([{INPUT: x}])
    expect = restore(runner, torch.from_numpy(x), tile=(32, 32), overlap=8).numpy()
    np.testing.assert_allclose(answer[OUTPUT], expect, atol=1e-6)
    assert not np.allclose(expect, restore(runner, torch.from_numpy(x)).numpy(), atol=1e-4)  # tiles did run


def test_a_runner_failure_answers_every_request_of_its_group_without_a_traceback(runner):
    class Broken:
        fixed_shape = None
        name = "broken"

        def infer(self, x):
            raise RuntimeError("boom\n  File /secret/path.py, line 1")

    answers = ImageModel(Broken())([{INPUT: photo(32, 32).numpy()}, {INPUT: np.zeros((1, 3, 8, 8), np.float32)}])
    for a in answers:
        text = a[ERROR][0, 0].decode()
        assert text == "inference failed: RuntimeError: boom" and "/secret" not in text


def test_busy_and_repeated_ports_are_one_line_naming_the_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(ServeError, match=f"port {busy} \\(--grpc-port\\) on 127.0.0.1: already in use"):
            check_ports("127.0.0.1", {"--http-port": 0, "--grpc-port": busy})
    with pytest.raises(ServeError, match="--metrics-port 9 is the same port as --http-port"):
        check_ports("127.0.0.1", {"--http-port": 9, "--metrics-port": 9})


def test_library_path_puts_the_interpreters_libdir_first():
    env = {"LD_LIBRARY_PATH": "/opt/x"}
    libdir = sysconfig.get_config_var("LIBDIR")
    assert library_path_fix(env) == f"{libdir}:/opt/x"
    assert library_path_fix(env) == f"{libdir}:/opt/x"  # idempotent
    assert library_path_fix({}) == libdir


def test_stale_shared_memory_of_dead_servers_only_is_removed(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    for name in (f"pytrtion{dead}-abc", f"pytrtion{os.getpid()}-abc", "other"):
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_shared_memory(tmp_path) == [tmp_path / f"pytrtion{dead}-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", f"pytrtion{os.getpid()}-abc"]


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="child subreapers and /proc are Linux's")


def _orphan(seconds: float) -> int:
    """Starts ``sleep seconds`` through a shell that exits at once (the sleep is orphaned); its pid."""
    return int(subprocess.run(["sh", "-c", f"sleep {seconds} >/dev/null 2>&1 & echo $!"], capture_output=True,
                              text=True, check=True).stdout)


def _gone(pid: int) -> bool:
    """No such process: neither running nor a zombie nobody waited for."""
    return not Path(f"/proc/{pid}").exists()


def test_descendants_walk_the_process_tree():
    table = {1: (0, "S"), 10: (1, "S"), 11: (10, "S"), 12: (11, "Z"), 20: (1, "S"), 21: (20, "S"), 30: (5, "S")}
    assert descendants(1, table) == [10, 11, 12, 20, 21]
    assert descendants(1, table, exclude={20}) == [10, 11, 12]
    assert descendants(12, table) == []
    me = process_table()[os.getpid()]
    assert me[0] == os.getppid() and me[1] in "RS"


@linux_only
def test_own_processes_waits_for_an_orphaned_grandchild_and_reaps_it():
    """An orphan of a process started in the block (as the stub's helpers when tritonserver stops) comes back
    to this process, which waits for it to end and collects it: nothing is left, not even a zombie."""
    subreaper = _prctl(PR_GET_CHILD_SUBREAPER)
    start = time.monotonic()
    with OwnProcesses(wait_s=10) as own:
        pid = _orphan(0.5)
        assert pid in own.left()
    assert time.monotonic() - start >= 0.4 and _gone(pid) and own.killed == []
    assert _prctl(PR_GET_CHILD_SUBREAPER) == subreaper


@linux_only
def test_own_processes_kills_what_outlives_the_wait():
    with OwnProcesses(wait_s=0.3) as own:
        pid = _orphan(60)
    assert _gone(pid)
    assert len(own.killed) == 1 and own.killed[0].startswith(f"{pid} sleep 60")


@linux_only
def test_own_processes_leaves_children_from_before_the_block_alone():
    before = subprocess.Popen(["sleep", "60"])
    try:
        start = time.monotonic()
        with OwnProcesses(wait_s=10) as own:
            pass
        assert time.monotonic() - start < 5 and before.poll() is None and own.killed == []
    finally:
        before.kill()
        before.wait()


@pytest.mark.parametrize("url, expect", [
    ("grpc://127.0.0.1:8001", ("grpc", "127.0.0.1:8001")), ("http://localhost", ("http", "localhost:8000")),
    ("10.0.0.5:9000", ("http", "10.0.0.5:9000")), ("grpc://[::1]", ("grpc", "[::1]:8001"))])
def test_server_urls(url, expect):
    assert parse_server_url(url) == expect


@pytest.mark.parametrize("url, fragment", [("ftp://h:1", "scheme 'ftp'"), ("http://h:1/v2", "no path"),
                                           ("http://h:port", "port is not a number")])
def test_bad_server_urls_say_what_to_pass(url, fragment):
    with pytest.raises(RemoteError, match=fragment):
        parse_server_url(url)


def test_infer_path_with_workers_is_the_same_path(tmp_path, runner):
    """Several images in flight give the same files, the same failure list and resume as one at a time."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(to_uint8(photo(40 + 8 * i, 56, i))).save(src / ("sub" if i % 2 else ".") / f"{i}.png")
    (src / "bad.png").write_bytes(b"not a png")
    one = infer_path(runner, src, tmp_path / "one", progress=False)
    many = infer_path(runner, src, tmp_path / "many", progress=False, workers=3)
    assert [p.relative_to(tmp_path / "one") for p in one.written] == \
        [p.relative_to(tmp_path / "many") for p in many.written]
    assert len(many.written) == 5 and list(many.failed) == [src / "bad.png"]
    for p in one.written:
        rel = p.relative_to(tmp_path / "one")
        np.testing.assert_array_equal(read_image(p).rgb, read_image(tmp_path / "many" / rel).rgb)
    (tmp_path / "many" / "sub" / "1.png").unlink()
    again = infer_path(runner, src, tmp_path / "many", progress=False, workers=3)
    assert [p.name for p in again.written] == ["1.png"] and len(again.skipped) == 4


def test_the_core_install_does_not_pull_the_serve_extra():
    """nvidia-pytriton pins numpy<2; the core must keep working with numpy 2, so the pin may only come in
    through the optional `serve` extra (the test environment installs it; users of the core do not)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    core = [r.lower().replace(" ", "") for r in project["dependencies"]]
    assert not any(r.startswith(("nvidia-pytriton", "tritonclient")) for r in core)
    assert not any(r.startswith("numpy") and "<2" in r for r in core)
    extras = project["optional-dependencies"]
    assert any(r.startswith("nvidia-pytriton") for r in extras["serve"])
    assert any(r.startswith("tritonclient[http,grpc]") for r in extras["client"] + extras["serve"])
