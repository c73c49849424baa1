"""Benchmark of ``serve`` against local inference on the same machine, in the same run.

    python -m benchmarks.serve EXPORT_DIR [--sizes 256x256,720x1280] [--clients 1,4,8] [--rounds 2]

Starts ``python cli.py serve EXPORT_DIR`` in its own process group on free loopback ports and reports:
the start time (process spawn to model ready, and the server's own Triton-start figure), the resident
memory of the server's processes, and per image size: local inference latency (the same export and
backend in this process, one image at a time) against the server's with 1, 4 and 8 concurrent clients
(p50/p95 latency per request, images/s), and the overhead ratios. Local and server blocks alternate
(A, B, A, B ...) and medians over the rounds are reported, so load from other work hits both alike.
Requests go over gRPC (``--scheme http`` for HTTP). Every loop is bounded; the server is stopped with
SIGTERM at the end and its process group killed if it does not go.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

from nafnet_core.cli_common import parse_size

from .common import interleaved, machine_line

ROOT = Path(__file__).resolve().parents[1]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def group_rss_mib(pgid: int) -> dict[str, float]:
    """Proportional set size (MiB) of each live process in process group ``pgid``, by a short name: resident
    memory with shared pages (PyTriton's shared-memory tensors, mapped by three processes) split between
    the processes that map them, so the total is not double-counted."""
    out: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid or fields[0] == "Z":
                continue
            cmd = (stat.parent / "cmdline").read_bytes().split(b"\0")
            rss = next(int(line.split()[1]) for line in (stat.parent / "smaps_rollup").read_text().splitlines()
                       if line.startswith("Pss:"))
        except (OSError, StopIteration, IndexError, ValueError):
            continue
        exe = Path(cmd[0].decode(errors="replace")).name
        name = "serve (python)" if b"serve" in cmd and exe.startswith("python") else exe
        if b"multiprocessing" in b" ".join(cmd):
            name = "python helper"
        out[name] = out.get(name, 0.0) + rss / 1024
    return out


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def _server_block(runner, x: torch.Tensor, clients: int, per_client: int, latencies: list[list[float]]):
    """A block of ``clients`` threads sending ``per_client`` requests each; appends the requests' latencies."""
    lock = threading.Lock()

    def one_block() -> None:
        block: list[float] = []

        def client() -> None:
            for _ in range(per_client):
                t = time.perf_counter()
                runner.infer(x)
                with lock:
                    block.append(time.perf_counter() - t)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=1800)
        latencies.append(block)

    return one_block


def _local_block(local, x: torch.Tensor, n: int, latencies: list[list[float]]):
    """A block of ``n`` local inferences, one at a time; appends their latencies."""
    from runtime.restore import restore

    def one_block() -> None:
        block = []
        for _ in range(n):
            t = time.perf_counter()
            restore(local, x)
            block.append(time.perf_counter() - t)
        latencies.append(block)

    return one_block


def run(export_dir: Path, sizes: list[tuple[int, int]], clients: list[int], rounds: int, scheme: str,
        threads: int | None) -> None:
    from runtime.models import open_runner
    from runtime.remote import RemoteRunner

    print(machine_line(), flush=True)
    http, grpc, metrics = _free_ports(3)
    log = Path(tempfile.mkstemp(prefix="serve-bench-", suffix=".log")[1])
    cmd = [sys.executable, str(ROOT / "cli.py"), "serve", str(export_dir), "--backend", "onnxrt", "--http-port",
           str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)] + \
        (["--threads", str(threads)] if threads else [])
    spawn = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/nafnet/ready", timeout=2):
                    break
            except OSError:
                time.sleep(0.1)
        ready_s = time.perf_counter() - spawn
        own = None
        while own is None and time.monotonic() < deadline:  # the server prints its line once run() returns
            own = re.search(r"after ([0-9.]+) s", log.read_text())
            time.sleep(0.05)
        print(f"server start: {ready_s:.1f} s from spawn to model ready (Triton start to ready: "
              f"{own.group(1) if own else '?'} s; the rest is the interpreter importing torch/onnxruntime)")
        rss = group_rss_mib(proc.pid)
        print("server memory (PSS) after load: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(rss.items())) +
              f" MiB; total {sum(rss.values()):.0f} MiB")
        url = f"grpc://127.0.0.1:{grpc}" if scheme == "grpc" else f"http://127.0.0.1:{http}"
        remote = RemoteRunner(url).activate()
        print(f"{'size':<10} {'mode':<12} {'p50 ms':>9} {'p95 ms':>9} {'img/s':>7} {'p50 / local':>12} "
              f"{'img/s / local':>14}")
        with open_runner(export_dir, "onnxrt", threads=threads) as local:
            for h, w in sizes:
                x = torch.rand(1, 3, h, w)
                small = h * w <= 256 * 256
                n_local, per_client = (16, 8) if small else (4, 2)
                requests = {"local": n_local} | {f"server x{c}": c * per_client for c in clients}
                lat: dict[str, list[list[float]]] = {mode: [] for mode in requests}
                _local_block(local, x, 1, [])()  # warm-up: one request each
                _server_block(remote, x, 1, 1, [])()
                blocks = {"local": _local_block(local, x, n_local, lat["local"])} | \
                    {f"server x{c}": _server_block(remote, x, c, per_client, lat[f"server x{c}"]) for c in clients}
                timings = interleaved(blocks, rounds, warmup=0)  # images/s: requests / the block's seconds
                base_p50 = statistics.median(statistics.median(block) for block in lat["local"])
                base_rate = requests["local"] / timings.median("local")
                for mode, blocks_lat in lat.items():
                    every = [v for block in blocks_lat for v in block]
                    p50 = statistics.median(statistics.median(block) for block in blocks_lat)
                    rate = requests[mode] / timings.median(mode)
                    print(f"{h}x{w:<6} {mode:<12} {p50 * 1e3:>9.1f} {_percentile(every, 95) * 1e3:>9.1f} {rate:>7.2f} "
                          f"{p50 / base_p50:>12.2f} {rate / base_rate:>14.2f}")
        remote.deactivate()
        rss = group_rss_mib(proc.pid)
        print("server memory (PSS) after the runs: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(rss.items())) +
              f" MiB; total {sum(rss.values()):.0f} MiB")
        start = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        print(f"SIGTERM: exit {code} after {time.perf_counter() - start:.1f} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve",
                                 description=__doc__.split("\n\n")[0],
                                 epilog="example: python -m benchmarks.serve runs/demo/export --clients 1,4,8")
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--sizes", default="256x256,720x1280", help="comma list of HxW")
    ap.add_argument("--clients", default="1,4,8", help="comma list of concurrent clients")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved local/server rounds (medians reported)")
    ap.add_argument("--scheme", choices=("grpc", "http"), default="grpc")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads, server and local alike")
    a = ap.parse_args(argv)
    run(a.export_dir, [parse_size(s) for s in a.sizes.split(",")], [int(c) for c in a.clients.split(",")],
        a.rounds, a.scheme, a.threads)


if __name__ == "__main__":
    main()
