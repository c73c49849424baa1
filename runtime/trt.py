"""The thin part that calls TensorRT (10.12+ / 11 name-based API). Imported only when an engine runs.

Everything that needs no GPU (tiling, shapes, manifests) lives elsewhere and is tested on CPU.
Buffers are torch CUDA tensors, so no pycuda / cuda-python is needed:

    engine = runtime.deserialize_cuda_engine(bytes)
    context.set_input_shape(name, shape); context.set_tensor_address(name, tensor.data_ptr())
    context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import RunnerError

INSTALL_HINT = ("TensorRT is not installed: on a machine with an NVIDIA GPU run `pip install -e \".[trt]\"` "
                "(tensorrt>=10.12); use --backend onnxrt or torch here")


def import_tensorrt():
    """The ``tensorrt`` module, or a RunnerError saying how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise RunnerError(INSTALL_HINT) from None
    return tensorrt


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) when TensorRT imports and a CUDA GPU is visible to torch, else (False, why)."""
    try:
        trt = import_tensorrt()
    except RunnerError as e:
        return False, str(e)
    if not torch.cuda.is_available():
        return False, "TensorRT is installed but torch sees no CUDA GPU (torch.cuda.is_available() is False)"
    return True, trt.__version__


def current_env() -> dict[str, str]:
    """TensorRT version, GPU name and compute capability here, in the manifest's ``tensorrt`` record terms."""
    from export.tensorrt_build import gpu_info

    trt = import_tensorrt()
    gpu, cc = gpu_info()
    return {"version": trt.__version__, "gpu": gpu, "compute_capability": cc}


class EngineSession:
    """A deserialized engine and one execution context; one input, one output, batch 1 tiles."""

    def __init__(self, path: Path):
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise RunnerError(f"{path}: a TensorRT engine needs a CUDA GPU; torch sees none")
        if not path.is_file():
            raise RunnerError(f"{path}: no such engine file")
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RunnerError(f"{path}: TensorRT could not deserialize the engine (built with another TensorRT "
                              "version or GPU?); rebuild it with `python cli.py export ... --trt` on this machine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise RunnerError(f"{path}: expected one input and one output, got {inputs} / {outputs}")
        self.input, self.output = inputs[0], outputs[0]
        shape = tuple(self.engine.get_tensor_shape(self.input))
        self.fixed_shape = None if -1 in shape[-2:] else (int(shape[-2]), int(shape[-1]))
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in (self.input, self.output)}
        self.stream = torch.cuda.Stream()

    def run(self, x: torch.Tensor) -> torch.Tensor:
        xin = x.to("cuda", self._dtypes[self.input]).contiguous()
        if not self.context.set_input_shape(self.input, tuple(xin.shape)):
            raise RunnerError(f"TensorRT engine rejects input shape {tuple(xin.shape)} (outside its profile)")
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self._dtypes[self.output],
                          device="cuda")
        self.context.set_tensor_address(self.input, xin.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        self.stream.synchronize()
        return out.float().cpu()

    def close(self) -> None:
        self.context = None
        self.engine = None
        self._runtime = None


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if dtype not in table:
        raise RunnerError(f"TensorRT engine I/O type {dtype} is not supported (expected float32 or float16)")
    return table[dtype]
