"""The real server: `python cli.py serve` (tritonserver via NVIDIA PyTriton) under load and faults.

Every server runs in its own process group on free loopback ports; teardown kills the group and removes
what a killed server leaves (workspace, model copy, shared memory). Loops are bounded in count and time.
Needs the serve extra (pip install -e ".[serve]"); skipped with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("pytriton", reason='serve needs NVIDIA PyTriton: pip install -e ".[serve]" (it pins numpy<2)')
pytest.importorskip("tritonclient.grpc", reason='the client needs tritonclient: pip install -e ".[serve]"')

from cli import main  # noqa: E402
from nafnet_core.images import read_image, to_uint8  # noqa: E402
from nafnet_core.metrics import psnr  # noqa: E402
from runtime.infer import infer_path  # noqa: E402
from runtime.models import open_runner  # noqa: E402
from runtime.remote import RemoteError, RemoteRunner  # noqa: E402
from runtime.restore import restore  # noqa: E402
from runtime.serve import remove_stale_shared_memory  # noqa: E402
from tests.helpers import photo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_PIXELS = 20_000  # the test server refuses images above ~141x141
SHM = Path("/dev/shm")

#: Every test here starts a real server or talks to one: the full suite runs them, the fast lane leaves them out.
pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def group_members(pgid: int, zombies: bool = False) -> list[tuple[int, str, str]]:
    """(pid, state, command line) of the processes in process group ``pgid``: the live ones, and with
    ``zombies`` also those that exited and were never waited for (state Z, shown as ``[name] <defunct>``)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            fields = text.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and (zombies or fields[0] != "Z"):
                cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append((int(stat.parent.name), fields[0], cmd or f"[{text.split('(', 1)[1].rsplit(')', 1)[0]}]"))
    return found


class ServerProcess:
    """`python cli.py serve EXPORT` in its own session (process group) on free loopback ports."""

    def __init__(self, export_dir: Path, log: Path, *extra: str):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log = log
        cmd = [sys.executable, str(ROOT / "cli.py"), "serve", str(export_dir), "--backend", "onnxrt", "--threads", "1",
               "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
               "--log-file", str(log.with_suffix(".triton.log")), *extra]
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.leftovers: list[Path] = []

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.http_url}/v2/models/nafnet/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.2)
        pytest.fail(f"server not ready after {timeout:.0f} s:\n{self.output()}")

    def note_leftovers(self) -> None:
        """Remembers the workspace and model copy of this server's processes (a SIGKILL leaves them)."""
        for _, _, cmd in group_members(self.proc.pid):
            for m in re.finditer(r"(/\S*/pytriton/workspace_[^/\s]+)|(/tmp/folder[^/\s]+)", cmd):
                self.leftovers.append(Path(m.group(0)))

    def close(self) -> None:
        self.note_leftovers()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        for path in set(self.leftovers):
            shutil.rmtree(path, ignore_errors=True)
        remove_stale_shared_memory()
        self._log_file.close()


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    """One server for the module: dynamic batching with a 20 ms window, small pixel limit."""
    s = ServerProcess(tiny_export, tmp_path_factory.mktemp("serve") / "server.log",
                      "--max-pixels", str(MAX_PIXELS), "--delay-us", "20000", "--max-batch", "8")
    try:
        s.wait_ready()
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def local(tiny_export):
    """The same export run here: what every server answer must equal."""
    with open_runner(tiny_export, "onnxrt", threads=1) as r:
        yield r


def metric(server: ServerProcess, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and 'model="nafnet"' in line)


def assert_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.shape == ref.shape
    assert (y - ref).abs().max().item() <= 1e-5
    assert psnr(y.clamp(0, 1), ref.clamp(0, 1), data_range=1.0).min().item() >= 60


def test_eight_clients_twenty_requests_each_match_local_inference(server, local):
    inputs = [photo(48, 64, i) for i in range(8)]
    refs = [restore(local, x) for x in inputs]
    runners = {s: RemoteRunner(url).activate() for s, url in (("http", server.http_url), ("grpc", server.grpc_url))}
    count0, exec0 = metric(server, "nv_inference_count"), metric(server, "nv_inference_exec_count")
    failures, mismatches = [], []

    def client(i: int) -> None:
        runner = runners["grpc" if i % 2 else "http"]
        for _ in range(20):
            try:
                y = runner.infer(inputs[i])
                assert_close(y, refs[i])
            except RemoteError as e:
                failures.append(str(e))
            except AssertionError as e:
                mismatches.append(str(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for r in runners.values():
        r.deactivate()
    assert not any(t.is_alive() for t in threads)
    assert failures == [] and mismatches == []
    served = metric(server, "nv_inference_count") - count0
    executions = metric(server, "nv_inference_exec_count") - exec0
    assert served == 160 and executions < served  # the dynamic batcher grouped requests


def test_a_poisoned_request_in_a_concurrent_burst_fails_alone(server, local):
    inputs = [photo(48, 64, i) for i in range(8)]
    refs = [restore(local, x) for x in inputs]
    poisoned = inputs[3].clone()
    poisoned[0, 1, 10, 10] = float("nan")
    runner = RemoteRunner(server.grpc_url).activate()
    for _ in range(3):
        count0, exec0 = metric(server, "nv_inference_count"), metric(server, "nv_inference_exec_count")
        barrier, results = threading.Barrier(8), {}

        def client(i: int, barrier: threading.Barrier = barrier, results: dict = results) -> None:
            barrier.wait(timeout=60)
            try:
                results[i] = runner.infer(poisoned if i == 3 else inputs[i])
            except RemoteError as e:
                results[i] = e

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert isinstance(results[3], RemoteError) and "NaN or infinite" in str(results[3])
        for i in (0, 1, 2, 4, 5, 6, 7):
            assert not isinstance(results[i], Exception), results[i]
            assert_close(results[i], refs[i])
        assert metric(server, "nv_inference_exec_count") - exec0 < metric(server, "nv_inference_count") - count0
    runner.deactivate()


def _raw_post(server: ServerProcess, body: bytes, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(f"{server.http_url}/v2/models/nafnet/infer", data=body, method="POST",
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def test_bad_requests_are_named_without_tracebacks_and_the_server_keeps_serving(server, local):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    good = photo(32, 48, 1)
    ok = RemoteRunner(server.http_url).activate()
    client = th.InferenceServerClient(f"127.0.0.1:{server.http}")

    def send(array: np.ndarray, dtype: str) -> str:
        inp = th.InferInput("input", list(array.shape), dtype)
        inp.set_data_from_numpy(array, binary_data=True)
        with pytest.raises(InferenceServerException) as e:
            client.infer("nafnet", [inp])
        return e.value.message()

    cases = {
        "wrong dtype": (send(good.numpy().astype(np.float64), "FP64"), "expects 'FP32'"),
        "wrong rank": (send(good.numpy()[0], "FP32"), "unexpected shape"),
        "four channels": (send(np.zeros((1, 4, 32, 48), np.float32), "FP32"), "unexpected shape"),
    }
    with pytest.raises(RemoteError) as big:
        ok.infer(photo(160, 160))  # 25,600 px > 20,000
    cases["over --max-pixels"] = (str(big.value), "160x160 has 25,600 pixels, over this server's limit of 20,000")
    status, body = _raw_post(server, os.urandom(2000))
    cases["garbage bytes"] = (f"{status} {body}", "")
    assert status in (400, 500)
    status, body = _raw_post(server, b'{"inputs": []}' + os.urandom(64), {"Inference-Header-Content-Length": "14"})
    cases["binary body with no tensor"] = (f"{status} {body}", "")
    assert status == 400
    for what, (message, fragment) in cases.items():
        assert fragment in message, (what, message)
        assert "Traceback" not in message and "site-packages" not in message and ".py" not in message, (what, message)
        assert_close(ok.infer(good), restore(local, good))  # still serving after each
    client.close()
    ok.deactivate()


def _folder(root: Path, n: int, size: tuple[int, int]) -> Path:
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(to_uint8(photo(*size, i))).save(root / ("sub" if i % 3 == 0 else ".") / f"im{i:03d}.png")
    return root


def test_infer_over_grpc_and_http_matches_local_infer(server, tiny_export, tmp_path):
    src = _folder(tmp_path / "in", 4, (40, 56))
    gray = (to_uint8(photo(36, 52, 4))[:, :, 0])
    Image.fromarray(gray, "L").save(src / "gray.tif")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    runs = {"local": ["-m", str(tiny_export), "--backend", "onnxrt"],
            "grpc": ["--server", server.grpc_url, "--concurrency", "3"],
            "http": ["--server", server.http_url, "--concurrency", "2"]}
    for name, args in runs.items():
        res = CliRunner().invoke(main, ["infer", str(src), "--out", str(tmp_path / name), "-q", *args])
        assert res.exit_code == 1 and "wrote 5" in res.output and "broken.png" in res.output, res.output
    files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert len(files) == 5
    for name in ("grpc", "http"):
        assert sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*") if p.is_file()) == files
        for rel in files:
            a, b = read_image(tmp_path / "local" / rel).rgb, read_image(tmp_path / name / rel).rgb
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # uint8 rounding of equal floats
    res = CliRunner().invoke(main, ["infer", str(src), "--server", "grpc://127.0.0.1:1", "-q"])
    assert res.exit_code == 1 and "server unreachable" in res.output and "Traceback" not in res.output


def test_kill9_of_the_server_mid_folder_then_rerun_completes(server, tiny_export, tmp_path):
    doomed = ServerProcess(tiny_export, tmp_path / "doomed.log")
    try:
        doomed.wait_ready()
        src = _folder(tmp_path / "in", 40, (96, 128))
        out = tmp_path / "out"
        report = {}
        runner = RemoteRunner(doomed.grpc_url).activate()
        worker = threading.Thread(target=lambda: report.update(r=infer_path(runner, src, out, progress=False,
                                                                             workers=2)))
        worker.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(out.rglob("*.png"))) < 2:
            time.sleep(0.01)
        doomed.note_leftovers()
        segments = [p for p in SHM.glob(f"pytrtion{doomed.proc.pid}-*")]
        os.killpg(doomed.proc.pid, signal.SIGKILL)
        doomed.proc.wait(timeout=30)
        worker.join(timeout=300)
        runner.deactivate()
        assert not worker.is_alive()
        r = report["r"]
        assert r.failed and len(r.written) + len(r.failed) == 40
        assert all("server" in why and "Traceback" not in why for why in r.failed.values())
        assert not list(out.rglob("*.part")) and not list(out.rglob(".*"))
        for p in out.rglob("*.png"):
            assert read_image(p).size == (96, 128)  # every file present is complete
        # SIGKILL leaves the shared memory behind; the next start removes it (its owner is gone)
        assert segments and all(p.exists() for p in segments)
        remove_stale_shared_memory()
        assert not any(p.exists() for p in segments)

        res = CliRunner().invoke(main, ["infer", str(src), "--out", str(out), "--server", server.grpc_url, "-q"])
        assert res.exit_code == 0, res.output
        assert f"wrote {len(r.failed)}, skipped {len(r.written)}" in res.output
        assert len(list(out.rglob("*.png"))) == 40
    finally:
        doomed.close()


def test_sigterm_stops_cleanly_with_nothing_left(tiny_export, tmp_path):
    workspaces = Path.home() / ".cache" / "pytriton"
    before = set(workspaces.glob("workspace_*")) if workspaces.exists() else set()
    s = ServerProcess(tiny_export, tmp_path / "term.log")
    try:
        s.wait_ready()
        with RemoteRunner(s.http_url) as r:
            r.infer(photo(32, 32))
        pid = s.proc.pid
        assert any("tritonserver" in cmd for _, _, cmd in group_members(pid))
        start = time.monotonic()
        os.kill(pid, signal.SIGTERM)  # what a supervisor sends (systemd, docker stop, kubernetes)
        code = s.proc.wait(timeout=20)  # docker stop waits 10 s before SIGKILL; 20 bounds the test on a loaded machine
        took = time.monotonic() - start
        assert code == 0, s.output()
        assert "SIGTERM received, stopping" in s.output()
        # multiprocessing's resource tracker leaves on its own once its parent has gone: allow it a moment
        deadline, left = time.monotonic() + 10, group_members(pid)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = group_members(pid)
        assert left == [], f"left {took:.1f} s after SIGTERM: {left}"
        assert not list(SHM.glob(f"pytrtion{pid}-*"))
        assert (set(workspaces.glob("workspace_*")) if workspaces.exists() else set()) <= before
    finally:
        s.close()


@pytest.mark.slow
def test_sigterm_exit_comes_after_every_process_of_the_group_is_gone(tiny_export, tmp_path):
    """A supervisor that sees the main process exit may start the next server at once: by then no process
    of the group may be left, running or exited-but-not-waited-for (checked at that moment, no grace time)."""
    s = ServerProcess(tiny_export, tmp_path / "exit.log")
    try:
        s.wait_ready()
        with RemoteRunner(s.grpc_url) as r:
            r.infer(photo(32, 32))
        pgid = s.proc.pid
        assert len(group_members(pgid)) >= 3  # this process, tritonserver, its stub (and helpers)
        os.kill(pgid, signal.SIGTERM)
        code = s.proc.wait(timeout=30)
        left = group_members(pgid, zombies=True)  # at once: the supervisor's view the moment it reaps
        try:
            os.killpg(pgid, 0)
            group_gone = False
        except ProcessLookupError:
            group_gone = True
        assert code == 0, s.output()
        assert left == [] and group_gone, f"process group {pgid} still holds {left} when the main process exited"
    finally:
        s.close()


def test_a_busy_port_is_one_line_naming_it(server, tiny_export):
    _, grpc, metrics = free_ports(3)
    res = subprocess.run([sys.executable, str(ROOT / "cli.py"), "serve", str(tiny_export), "--http-port",
                          str(server.http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [f"Error: port {server.http} (--http-port) on 127.0.0.1: already in "
                                               "use; stop what uses it or pass --http-port with a free port"]
