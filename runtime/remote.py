"""A Runner whose ``infer`` is a request to a Triton Inference Server (``python cli.py serve``, or NVIDIA's
container serving the repository of ``export triton``): ``infer --server URL`` runs the local inference
path (decode, pad, tiles, blend, crop, atomic write, resume, failure list) with this Runner plugged in.

    with RemoteRunner("grpc://127.0.0.1:8001") as runner:     # or http://127.0.0.1:8000
        y = runner.infer(x)                                   # (N, 3, H, W) float32, like any Runner

The wire format is the exported graphs' own: ``input`` FP32 (N, 3, H, W) in [0, 1] -> ``output`` FP32,
not clamped. A server of this project also answers ``error`` (BYTES, one per image): a bad request
gets its reason there instead of failing the requests batched with it; NVIDIA's server has no such
output and reports errors as HTTP/gRPC errors. Either way the caller gets a :class:`RemoteError`.

Each thread gets its own client connection (``tritonclient`` clients are not shared between threads), so
``infer_path(..., workers=N)`` keeps N requests in flight.
"""

from __future__ import annotations

import threading
from urllib.parse import urlsplit

import numpy as np
import torch

from nafnet_core.errors import first_line

from .runners import Runner, RunnerError

SCHEMES = ("http", "grpc")
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
INSTALL_HINT = 'pip install "tritonclient[http,grpc]" (or: pip install -e ".[serve]")'


class RemoteError(RunnerError):
    """A request the server refused or could not answer; the message says which server and why."""


def parse_server_url(url: str) -> tuple[str, str]:
    """``grpc://host:8001`` -> ("grpc", "host:8001"); ``host:8000`` and ``http://host`` -> HTTP (port 8000).

    Raises RemoteError for another scheme or a URL with a path.
    """
    text = url if "://" in url else f"http://{url}"
    parts = urlsplit(text)
    if parts.scheme not in SCHEMES:
        raise RemoteError(f"--server {url}: scheme {parts.scheme!r} is not supported; use http://HOST:PORT or "
                          "grpc://HOST:PORT")
    if parts.path not in ("", "/") or parts.query or not parts.hostname:
        raise RemoteError(f"--server {url}: expected http://HOST:PORT or grpc://HOST:PORT (no path)")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise RemoteError(f"--server {url}: the port is not a number") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return parts.scheme, f"{host}:{port}"


def _client_modules(scheme: str):
    try:
        if scheme == "grpc":
            import tritonclient.grpc as client
        else:
            import tritonclient.http as client
        from tritonclient.utils import InferenceServerException
    except ImportError:
        raise RunnerError(f"--server needs the Triton client: {INSTALL_HINT}") from None
    return client, InferenceServerException


def _first_line(text: str, limit: int = 300) -> str:
    return first_line(text, limit)


class RemoteRunner(Runner):
    """Inference through a Triton server over HTTP or gRPC.

    Args:
        url: ``http://HOST:PORT`` or ``grpc://HOST:PORT``.
        model_name: the model on the server.
        timeout: seconds to wait for one answer (a 4K image tiled on a CPU server takes a while).
    """

    backend = "server"

    def __init__(self, url: str, model_name: str = "nafnet", timeout: float = 600.0, name: str | None = None):
        self.scheme, self.address = parse_server_url(url)
        super().__init__("fp32", name or f"server-{self.scheme}://{self.address}/{model_name}")
        self.url = url
        self.model_name = model_name
        self.timeout = timeout
        self._local = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()

    # --- connections
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            mod, _ = _client_modules(self.scheme)
            if self.scheme == "grpc":
                client = mod.InferenceServerClient(self.address)
            else:
                client = mod.InferenceServerClient(self.address, connection_timeout=10.0,
                                                   network_timeout=self.timeout)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _call(self, what: str, fn, *args, **kwargs):
        """Runs one client call; every failure becomes a RemoteError naming the server."""
        _, server_error = _client_modules(self.scheme)
        try:
            return fn(*args, **kwargs)
        except server_error as e:
            raise RemoteError(self._explain(what, e.message() or str(e), e.status())) from None
        except Exception as e:  # noqa: BLE001 - the network boundary: refused, reset, timed out, cut mid-answer
            raise RemoteError(f"server {self.address}: {what} failed, server unreachable or gone "
                              f"({type(e).__name__}: {_first_line(str(e)) or 'no answer'})") from None

    def _explain(self, what: str, message: str, status: str | None) -> str:
        text = _first_line(message)
        if status in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED") or "failed to connect" in text.lower():
            return f"server {self.address}: {what} failed, server unreachable ({text})"
        return f"server {self.address}: {what} refused: {text}"

    # --- Runner interface
    def _activate(self) -> None:
        client = self._client()
        if not self._call("health check", client.is_server_ready):
            raise RemoteError(f"server {self.address} is not ready; wait for it or check its log")
        if not self._call("model check", client.is_model_ready, self.model_name):
            raise RemoteError(f"server {self.address} has no ready model {self.model_name!r}; pass --model-name")
        meta = self._call("model metadata", client.get_model_metadata, self.model_name)
        if self.scheme == "grpc":
            inputs = [(t.name, list(t.shape), t.datatype) for t in meta.inputs]
            outputs = [t.name for t in meta.outputs]
        else:
            inputs = [(t["name"], list(t["shape"]), t["datatype"]) for t in meta["inputs"]]
            outputs = [t["name"] for t in meta["outputs"]]
        if len(inputs) != 1 or inputs[0][2] != "FP32" or len(inputs[0][1]) not in (3, 4):
            raise RemoteError(f"server {self.address}: model {self.model_name!r} takes {inputs}, not one FP32 "
                              "image tensor (N, 3, H, W)")
        self._input = inputs[0][0]
        dims = inputs[0][1][-2:]
        self.fixed_shape = (int(dims[0]), int(dims[1])) if min(dims) > 0 else None
        self._output = "output" if "output" in outputs else outputs[0]
        self._has_error = "error" in outputs

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        mod, _ = _client_modules(self.scheme)
        client = self._client()
        array = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)
        tensor = mod.InferInput(self._input, list(array.shape), "FP32")
        if self.scheme == "grpc":
            tensor.set_data_from_numpy(array)
            wanted = [mod.InferRequestedOutput(n) for n in [self._output] + (["error"] if self._has_error else [])]
            result = self._call("inference", client.infer, self.model_name, [tensor], outputs=wanted,
                                client_timeout=self.timeout)
        else:
            tensor.set_data_from_numpy(array, binary_data=True)
            wanted = [mod.InferRequestedOutput(n, binary_data=True)
                      for n in [self._output] + (["error"] if self._has_error else [])]
            result = self._call("inference", client.infer, self.model_name, [tensor], outputs=wanted)
        if self._has_error:
            errors = [e.decode("utf-8", "replace") if isinstance(e, bytes) else str(e)
                      for e in np.asarray(result.as_numpy("error")).reshape(-1)]
            errors = [e for e in errors if e]
            if errors:
                raise RemoteError(f"server {self.address} refused the image: {errors[0]}")
        y = result.as_numpy(self._output)
        if y is None or tuple(y.shape) != tuple(array.shape):
            raise RemoteError(f"server {self.address}: answer of shape {None if y is None else tuple(y.shape)} "
                              f"for an input of {tuple(array.shape)}")
        return torch.from_numpy(np.array(y, dtype=np.float32))

    def _deactivate(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a dead connection must not mask the real outcome
                pass
        self._local = threading.local()


__all__ = ["RemoteRunner", "RemoteError", "parse_server_url"]
