"""``python cli.py serve EXPORT_DIR``: a real Triton Inference Server (NVIDIA's ``tritonserver`` binary,
bundled by ``nvidia-pytriton``) in front of the project's own Runner.

    client --HTTP/gRPC--> tritonserver (dynamic batcher) --> Python backend stub --> this process:
        ImageModel(requests): validate each request -> restore (pad, tiles, blend, crop) -> one answer each

Wire format (the same as the model repository of ``export triton``, so one client talks to both):
``input`` FP32 (N, 3, H, W) in [0, 1] -> ``output`` FP32 (N, 3, H, W), not clamped, plus ``error``
(BYTES, one per image, empty when it went well).

Why an ``error`` output. Triton rejects a wrong dtype, rank or channel count itself (HTTP 400 / gRPC
INVALID_ARGUMENT, before batching), but it has no limit on the size of ``-1`` dims, so the pixel limit and
the finite-values check live here. PyTriton turns an exception raised by the callable into a 500 carrying
a Python traceback with server paths, for every request of the dynamic batch (measured: one poisoned
request among 8 concurrent ones failed all 8). So the callable never raises: it checks each request on
its own and answers a bad one with its reason in ``error`` (and a 1x1 NaN ``output``), while the requests
batched with it get their images.

Process hygiene, measured with nvidia-pytriton 0.7.0 on a CPU-only Debian machine:
- the Python-backend stub links ``libpython`` through the loader path and, under pyenv, found the system's
  libpython of another patch release (model load then fails in ``multiprocessing``); the interpreter's
  ``LIBDIR`` goes first on ``LD_LIBRARY_PATH`` before the server starts (:func:`library_path_fix`).
- PyTriton stops cleanly on SIGINT only; SIGTERM killed the parent at once and left ``tritonserver``, the
  stub, two helper processes, ``/dev/shm/pytrtion*`` segments and a workspace. Here SIGINT and SIGTERM
  both set an event; the main thread then stops the server (about 4-6 s) and everything goes.
- a port in use made the new ``tritonserver`` fail while PyTriton talked to the *other* server on that
  port (a misleading 403), so every port is test-bound first (:func:`check_ports`).
- open client connections make the stop wait for ``exit_timeout_secs`` (30 s by default): it is 3 s here.
- the main process exits only after every process it started has ended and been waited for
  (:class:`OwnProcesses`): measured before, the group still held a child when the main process had exited
  (``[python] <defunct>``: this process's ``multiprocessing`` resource tracker, which ends only when the
  process that started it has gone, and the stub's, orphaned and left to PID 1), so a supervisor that reaps
  the main process and starts the next server saw the old one half-finished. The main process is a child
  subreaper while it serves (orphaned descendants come back to it), stops its resource tracker, and waits
  for and reaps its descendants (:data:`DESCENDANTS_WAIT_S` at most, then kills what is left).
- SIGKILL cannot be caught: the children die with the process group (run it as a service that kills the
  group) and the next start removes shared-memory segments whose owner process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nafnet_core.errors import UserError, first_line

from .restore import choose_tiling, pad_multiple
from .runners import Runner
from .tiling import restore_tensor

LOGGER = logging.getLogger(__name__)
INSTALL_HINT = 'pip install -e ".[serve]" (nvidia-pytriton; it needs numpy<2, so use a virtual environment)'
#: Largest image (pixels) a request may carry by default: 4K UHD. Float32 in and out, a 3840x2160 image is
#: 100 MB each way; raise it with ``--max-pixels`` on a server with the memory.
SERVE_MAX_PIXELS = 3840 * 2160
INPUT, OUTPUT, ERROR = "input", "output", "error"
#: Seconds tritonserver waits for open connections and requests in flight when it stops.
EXIT_TIMEOUT_S = 3


class ServeError(UserError):
    """The server cannot start (a busy port, PyTriton missing, the model not loading); one line says why."""


@dataclass
class ServeOptions:
    """How the server listens and what it accepts.

    Args:
        host: address to bind (127.0.0.1: this machine only; 0.0.0.0: every interface).
        http_port / grpc_port / metrics_port: ports of the three endpoints.
        model_name: the model's name in URLs (``/v2/models/NAME/infer``).
        max_batch: Triton's ``max_batch_size`` (images per batch the dynamic batcher forms).
        delay_us: the batcher's longest wait for more requests of the same shape (microseconds).
        max_pixels: largest image a request may carry (H x W).
        tile / overlap: tiling of large images, as ``infer`` (``auto``: whole up to ~1280x720, tiles above).
        log_file: tritonserver's log (default: a temporary file, shown if the start fails).
    """

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_name: str = "nafnet"
    max_batch: int = 8
    delay_us: int = 2000
    max_pixels: int = SERVE_MAX_PIXELS
    tile: str | int | tuple[int, int] = "auto"
    overlap: int | None = None
    log_file: Path | None = None

    def ports(self) -> dict[str, int]:
        return {"--http-port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port}


# --------------------------------------------------------------------------------------------- requests

def check_request(x: np.ndarray, max_pixels: int) -> str:
    """Why one request's ``input`` cannot be restored, or "" when it can. Triton has already checked the
    dtype (FP32), the rank and the channel count against the model's config; this checks what it cannot."""
    if x.ndim != 4 or x.shape[1] != 3:
        return f"input must be (N, 3, H, W) float32 in [0, 1], got shape {list(x.shape)}"
    h, w = int(x.shape[2]), int(x.shape[3])
    if h < 1 or w < 1:
        return f"empty image ({h}x{w})"
    if h * w > max_pixels:
        return (f"image {h}x{w} has {h * w:,} pixels, over this server's limit of {max_pixels:,} "
                "(--max-pixels); send it in tiles or ask for a larger limit")
    if not np.isfinite(x).all():
        return "input holds NaN or infinite values; send pixel values in [0, 1]"
    return ""


def _failure(n: int, reason: str) -> dict[str, np.ndarray]:
    return {OUTPUT: np.full((n, 3, 1, 1), np.nan, np.float32), ERROR: np.array([[reason.encode()]] * n, dtype=object)}


def _success(y: np.ndarray) -> dict[str, np.ndarray]:
    return {OUTPUT: y, ERROR: np.array([[b""]] * y.shape[0], dtype=object)}


class ImageModel:
    """The PyTriton inference callable: a list of requests in, one answer per request out, never raising.

    Requests of the same image size that run whole go through the Runner as one batch; images that need
    tiles run one by one through the same tiling path as ``infer``.

    Args:
        runner: an activated Runner.
        max_pixels / tile / overlap: see :class:`ServeOptions`.
    """

    def __init__(self, runner: Runner, max_pixels: int = SERVE_MAX_PIXELS, tile: str | int | tuple[int, int] = "auto",
                 overlap: int | None = None):
        self.runner = runner
        self.max_pixels = max_pixels
        self.tile = tile
        self.overlap = overlap
        self.batches: list[int] = []  # requests per call, for tests and the benchmark

    def __call__(self, requests: list) -> list[dict[str, np.ndarray]]:
        self.batches.append(len(requests))
        answers: list[dict[str, np.ndarray] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, request in enumerate(requests):
            x = np.asarray(request[INPUT])
            reason = check_request(x, self.max_pixels)
            if reason:
                answers[i] = _failure(x.shape[0] if x.ndim else 1, reason)
            else:
                groups.setdefault(tuple(x.shape[1:]), []).append(i)
        for shape, members in groups.items():
            xs = [np.asarray(requests[i][INPUT], dtype=np.float32) for i in members]
            try:
                ys = self._restore(xs, shape[-2], shape[-1])
            except Exception as e:  # noqa: BLE001 - the server boundary: answer, log the traceback, keep serving
                LOGGER.exception("inference failed for %d request(s) of shape %s", len(members), shape)
                reason = f"inference failed: {type(e).__name__}: {first_line(str(e))}"
                for i, x in zip(members, xs):
                    answers[i] = _failure(x.shape[0], reason)
                continue
            for i, y in zip(members, ys):
                answers[i] = _success(y)
        return answers

    def _restore(self, xs: list[np.ndarray], h: int, w: int) -> list[np.ndarray]:
        spec = choose_tiling(self.runner, h, w, self.tile, self.overlap)
        batch = torch.from_numpy(np.concatenate(xs) if len(xs) > 1 else xs[0])
        if spec is None:  # whole images: the batch in one call
            y = restore_tensor(self.runner.infer, batch, None, multiple=pad_multiple(self.runner))
        else:  # tiles: one image at a time (the tiled path bounds memory by the tile)
            y = torch.cat([restore_tensor(self.runner.infer, batch[j:j + 1], spec) for j in range(batch.shape[0])])
        out = np.ascontiguousarray(y.numpy(), dtype=np.float32)
        sizes = np.cumsum([x.shape[0] for x in xs])[:-1]
        return np.split(out, sizes)


# --------------------------------------------------------------------------------------------- process

#: Seconds the main process waits, once the server has stopped, for the processes it started to end
#: (resource trackers leave within milliseconds of their pipe closing); then it kills those left.
DESCENDANTS_WAIT_S = 10.0
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37  # linux/prctl.h


def process_table(proc: Path = Path("/proc")) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process ``/proc`` lists (empty where there is no /proc)."""
    table = {}
    with contextlib.suppress(OSError):
        for stat in proc.glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
                table[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return table


def descendants(pid: int, table: dict[int, tuple[int, str]], exclude: set[int] = frozenset()) -> list[int]:
    """Every process below ``pid`` in ``table`` (children, their children, ...), skipping the subtrees of
    the children in ``exclude``."""
    children: dict[int, list[int]] = {}
    for p, (parent, _) in table.items():
        children.setdefault(parent, []).append(p)
    found, stack = [], [c for c in children.get(pid, []) if c not in exclude]
    while stack:
        p = stack.pop()
        found.append(p)
        stack.extend(children.get(p, []))
    return sorted(found)


def _prctl(option: int, value: int = 0) -> int | None:
    """``prctl(option, value)`` (Linux), or None where it is unavailable or fails."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    if option == PR_GET_CHILD_SUBREAPER:
        flag = ctypes.c_int(0)
        return int(flag.value) if libc.prctl(option, ctypes.byref(flag), 0, 0, 0) == 0 else None
    return 0 if libc.prctl(option, value, 0, 0, 0) == 0 else None


class OwnProcesses:
    """Every process started inside the ``with`` block has ended, and been waited for, when it exits.

    On entry this process becomes a child subreaper (Linux): a process it started whose parent ends (the
    Python-backend stub's helpers when tritonserver stops) becomes its child, not PID 1's, so it can be
    waited for. On exit it stops the ``multiprocessing`` resource tracker if one was started in the block
    (it would end only after this process), then reaps its exited children and waits until no process
    started in the block is left, for ``wait_s`` at most; what is still running then is killed and reaped.
    Children that existed before the block are neither waited for nor killed. The subreaper setting is
    restored.

    Attributes:
        killed: ``"pid command"`` of each process that had to be killed.
    """

    def __init__(self, wait_s: float = DESCENDANTS_WAIT_S, poll_s: float = 0.02):
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.killed: list[str] = []
        self._before: set[int] = set()
        self._previous: int | None = None

    def __enter__(self) -> OwnProcesses:
        self._previous = _prctl(PR_GET_CHILD_SUBREAPER)
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        self._before = set(descendants(os.getpid(), process_table()))
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._stop_resource_tracker()
            self.wait()
        finally:
            if self._previous is not None:
                _prctl(PR_SET_CHILD_SUBREAPER, self._previous)

    def left(self) -> list[int]:
        """Processes started in the block that still exist (running, or exited and not yet waited for)."""
        return descendants(os.getpid(), process_table(), exclude=self._before)

    def wait(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while True:
            left = self._reap()
            if not left:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(self.poll_s)
        for pid in left:
            cmd = _command(pid)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                self.killed.append(f"{pid} {cmd}")
                LOGGER.warning("killed process %d (%s): still running %.0f s after the server stopped", pid, cmd,
                               self.wait_s)
        deadline = time.monotonic() + 5.0  # SIGKILL'ed processes go within milliseconds; their parents reap them
        while self._reap() and time.monotonic() < deadline:
            time.sleep(self.poll_s)

    def _reap(self) -> list[int]:
        """Waits for this process's exited children among ``left()``; returns what is left after."""
        me, table = os.getpid(), process_table()
        left = descendants(me, table, exclude=self._before)
        for pid in left:
            if table[pid][0] == me:  # a child: collect its exit status if it has one (never blocks)
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)
        return self.left() if left else []

    def _stop_resource_tracker(self) -> None:
        from multiprocessing import resource_tracker

        tracker = getattr(resource_tracker, "_resource_tracker", None)
        pid = getattr(tracker, "_pid", None)
        if pid is not None and pid not in self._before and hasattr(tracker, "_stop"):
            with contextlib.suppress(Exception):  # it cleans up what was registered and ends; nothing to report
                tracker._stop()


def _command(pid: int) -> str:
    with contextlib.suppress(OSError):
        return (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                or "?")[:120]
    return "?"


def library_path_fix(env: dict | None = None) -> str:
    """Puts the interpreter's LIBDIR first on LD_LIBRARY_PATH (in ``env``, default os.environ): the
    Python-backend stub then loads this interpreter's libpython, not another one the loader finds first."""
    env = os.environ if env is None else env
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    current = env.get("LD_LIBRARY_PATH", "")
    if libdir and current.split(":")[0] != libdir:
        env["LD_LIBRARY_PATH"] = libdir + (":" + current if current else "")
    return env.get("LD_LIBRARY_PATH", "")


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Raises ServeError naming the first port that is repeated or cannot be bound on ``host``."""
    seen: dict[int, str] = {}
    for option, port in ports.items():
        if port in seen:
            raise ServeError(f"{option} {port} is the same port as {seen[port]}; give each endpoint its own port")
        seen[port] = option
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
            try:
                s.bind((host, port))
            except OSError as e:
                why = "already in use" if e.errno in (98, 48) else (e.strerror or str(e))
                raise ServeError(f"port {port} ({option}) on {host}: {why}; stop what uses it or pass "
                                 f"{option} with a free port") from None


def remove_stale_shared_memory(folder: Path = Path("/dev/shm")) -> list[Path]:
    """Removes PyTriton's shared-memory segments (``pytrtion<pid>-*``) whose owner process is gone (a server
    killed with SIGKILL); segments of running servers are kept. Returns what it removed."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            name = entry.name
            if not name.startswith("pytrtion"):
                continue
            pid = name[len("pytrtion"):].split("-")[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry)
    return removed


def import_pytriton():
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise ServeError(f"serve needs NVIDIA PyTriton: {INSTALL_HINT}") from None
    return Triton, TritonConfig, ModelConfig, DynamicBatcher, Tensor


@dataclass
class Server:
    """A running server: ``stop()`` ends it; ``urls`` says where it listens."""

    triton: object
    model: ImageModel
    options: ServeOptions
    log_file: Path
    started_s: float
    urls: dict[str, str] = field(default_factory=dict)

    def alive(self) -> bool:
        return bool(self.triton.is_alive())

    def stop(self) -> None:
        self.triton.stop()


def start_server(runner: Runner, options: ServeOptions) -> Server:
    """Starts tritonserver with ``runner`` behind model ``options.model_name``; returns once it is ready.

    Args:
        runner: an activated Runner.
        options: ports, names, batching and limits.
    """
    Triton, TritonConfig, ModelConfig, DynamicBatcher, Tensor = import_pytriton()
    check_ports(options.host, options.ports())
    remove_stale_shared_memory()
    library_path_fix()
    log_file = options.log_file or Path(tempfile.mkstemp(prefix="nafnet-serve-", suffix=".log")[1])
    config = TritonConfig(http_address=options.host, http_port=options.http_port, grpc_address=options.host,
                          grpc_port=options.grpc_port, metrics_address=options.host,
                          metrics_port=options.metrics_port, allow_gpu_metrics=False, log_file=log_file,
                          exit_timeout_secs=EXIT_TIMEOUT_S)
    model = ImageModel(runner, options.max_pixels, options.tile, options.overlap)
    start = time.perf_counter()
    triton = Triton(config=config)
    try:
        triton.bind(model_name=options.model_name, infer_func=model,
                    inputs=[Tensor(name=INPUT, dtype=np.float32, shape=(3, -1, -1))],
                    outputs=[Tensor(name=OUTPUT, dtype=np.float32, shape=(3, -1, -1)),
                             Tensor(name=ERROR, dtype=bytes, shape=(1,))],
                    config=ModelConfig(max_batch_size=options.max_batch,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=options.delay_us)),
                    strict=False)
        triton.run()
    except Exception as e:  # noqa: BLE001 - PyTriton raises several types; the log has the detail
        with contextlib.suppress(Exception):
            triton.stop()
        raise ServeError(f"the server did not start: {type(e).__name__}: {first_line(str(e))} "
                         f"(server log: {log_file})") from None
    host = f"[{options.host}]" if ":" in options.host else options.host
    urls = {"http": f"http://{host}:{options.http_port}", "grpc": f"grpc://{host}:{options.grpc_port}",
            "metrics": f"http://{host}:{options.metrics_port}/metrics"}
    return Server(triton, model, options, log_file, time.perf_counter() - start, urls)


def serve_until_signal(server: Server, echo: Callable[[str], None] = print, poll_s: float = 1.0) -> int:
    """Blocks until SIGINT or SIGTERM (then stops the server cleanly) or until the server dies; exit code.

    Installs handlers for both signals in the main thread; PyTriton's own handling covers SIGINT only.
    """
    stop = threading.Event()
    received: list[int] = []

    def handler(signum, _frame):
        received.append(signum)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        while not stop.wait(poll_s):
            if not server.alive():
                echo(f"the server stopped unexpectedly; see its log: {server.log_file}")
                code = 1
                break
    finally:
        if received:
            echo(f"{signal.Signals(received[0]).name} received, stopping")
        start = time.perf_counter()
        server.stop()
        for s, h in previous.items():
            signal.signal(s, h)
        if received:
            echo(f"stopped in {time.perf_counter() - start:.1f} s")
    return code


def serve(runner: Runner, options: ServeOptions, echo: Callable[[str], None] = print) -> int:
    """Starts the server with ``runner`` (activated here), serves until SIGINT/SIGTERM; returns the exit code.

    A SIGTERM or SIGINT that arrives while the server starts stops it as soon as it is up.
    """
    check_ports(options.host, options.ports())  # a busy port: one line before the model loads
    early: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _f: early.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    processes = OwnProcesses()
    try:
        with processes, runner:
            server = start_server(runner, options)
            try:
                echo(f"serving {options.model_name!r} ({runner.name}) after {server.started_s:.1f} s: "
                     f"{server.urls['http']}  {server.urls['grpc']}  metrics {server.urls['metrics']}")
                echo(f"max batch {options.max_batch}, max {options.max_pixels:,} pixels per image; "
                     "Ctrl-C or SIGTERM stops it")
                if early:
                    echo(f"{signal.Signals(early[0]).name} received while starting, stopping")
                    server.stop()
                    return 0
            except BaseException:
                server.stop()
                raise
            for s, h in previous.items():
                signal.signal(s, h)
            code = serve_until_signal(server, echo)
            if code == 0 and options.log_file is None:  # a temporary log of a clean run is of no use
                server.log_file.unlink(missing_ok=True)
            return code
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if processes.killed:
            echo(f"killed {len(processes.killed)} process(es) still running {processes.wait_s:.0f} s after the "
                 f"server stopped: {'; '.join(processes.killed)}")


__all__ = ["ServeOptions", "ServeError", "ImageModel", "check_request", "check_ports", "library_path_fix",
           "remove_stale_shared_memory", "OwnProcesses", "start_server", "serve_until_signal", "serve",
           "SERVE_MAX_PIXELS"]
