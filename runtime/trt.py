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
    """A deserialized engine and one execution context: :meth:`run` for one input and one output (fixed or
    dynamic batch), :meth:`run_named` for any inputs and outputs by name (AdaRevD's step graphs)."""

    def __init__(self, path: Path):
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise RunnerError(f"{path}: a TensorRT engine needs a CUDA GPU; torch sees none")
        if not path.is_file():
            raise RunnerError(f"{path}: no such engine file")
        self.path = path
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RunnerError(f"{path}: TensorRT could not deserialize the engine (built with another TensorRT "
                              "version or GPU?); rebuild it with `python cli.py export ... --trt` on this machine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        single = len(self.inputs) == 1 and len(self.outputs) == 1
        self.input, self.output = (self.inputs[0], self.outputs[0]) if single else (None, None)
        shape = tuple(self.engine.get_tensor_shape(self.inputs[0]))
        self.fixed_shape = None if -1 in shape[-2:] else (int(shape[-2]), int(shape[-1]))
        self.fixed_batch = None if shape[0] == -1 else int(shape[0])
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in self.inputs + self.outputs}
        self.stream = torch.cuda.Stream()

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.input is None:
            raise RunnerError(f"{self.path}: expected one input and one output, got {self.inputs} / {self.outputs}")
        return self.run_named({self.input: x})[self.output]

    def run_named(self, feed: dict) -> dict[str, torch.Tensor]:
        """Every output (float32 CPU tensors, by name) for ``feed``: input name -> tensor or array."""
        held = {}
        for name in self.inputs:
            held[name] = torch.as_tensor(feed[name]).to("cuda", self._dtypes[name]).contiguous()
            if not self.context.set_input_shape(name, tuple(held[name].shape)):
                raise RunnerError(f"TensorRT engine rejects input {name} of shape {tuple(held[name].shape)} "
                                  "(outside its profile)")
            self.context.set_tensor_address(name, held[name].data_ptr())
        outs = {name: torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtypes[name],
                                  device="cuda") for name in self.outputs}
        for name, out in outs.items():
            self.context.set_tensor_address(name, out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        self.stream.synchronize()
        return {name: out.float().cpu() for name, out in outs.items()}

    def close(self) -> None:
        self.context = None
        self.engine = None
        self._runtime = None


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if dtype not in table:
        raise RunnerError(f"TensorRT engine I/O type {dtype} is not supported (expected float32 or float16)")
    return table[dtype]
