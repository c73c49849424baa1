"""One Runner interface over PyTorch, onnxruntime, OpenVINO and TensorRT (after Polygraphy's ``BaseRunner``).

    with OnnxRuntimeRunner("export/model_tile512.onnx") as runner:
        y = runner.infer(x)          # x, y: float32 (N, C, H, W) torch tensors on the CPU

Constructors only store arguments; ``activate`` creates the heavy objects (model copies, sessions,
engines) and ``deactivate`` frees them. ``fixed_shape`` is the (H, W) a static graph or engine
accepts, or None when any multiple of 16 works: the inference path tiles by it (runtime.tiling).
"""

from __future__ import annotations

import copy
import ctypes
import os
import time
from pathlib import Path
from xml.etree.ElementTree import ParseError

import numpy as np
import torch
import torch.nn as nn

from nafnet_core.config import DEFAULT_PAD_MULTIPLE
from nafnet_core.errors import first_line
from nafnet_core.model import NAFNet

from .errors import RunnerError  # re-exported: ``from runtime.runners import RunnerError`` keeps working

ET_ERRORS = (ParseError, OSError, UnicodeDecodeError)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Runner:
    """Base class: ``activate`` / ``infer`` / ``deactivate`` and a context manager.

    Attributes:
        backend: ``torch``, ``onnxrt``, ``openvino`` or ``trt``.
        precision: ``fp32``, ``fp16`` or ``bf16`` (what the arithmetic runs in).
        fixed_shape: (H, W) the model requires, or None for any multiple of ``pad_multiple``.
        pad_multiple: the model's padding multiple (2 ** encoder levels): the runtime pads every image to it.
        fixed_batch: the batch a fixed-batch graph/engine requires, or None for any batch. ``infer``
            takes any batch either way: it runs a fixed-batch model in chunks, the last one padded.
        name: a readable label for tables and logs.
        whole_image_input: the model transforms its whole input (``input_fft='fs'``: the spectrum of what it
            is given), so a tile's output is not the whole image's; ``runtime.restore.choose_tiling`` runs such
            models whole where it can and warns where it cannot.
    """

    backend = "base"
    #: What the arithmetic can run in (the first: the default); empty: anything.
    precisions: tuple[str, ...] = ()

    def __init__(self, precision: str = "fp32", name: str | None = None):
        if self.precisions and precision not in self.precisions:
            raise RunnerError(f"backend {self.backend} cannot run {precision}; choose one of "
                              f"{', '.join(self.precisions)}")
        self.precision = precision
        self.name = name or f"{self.backend}-{precision}"
        self.fixed_shape: tuple[int, int] | None = None
        self.fixed_batch: int | None = None
        self.whole_image_input = False
        self.pad_multiple = DEFAULT_PAD_MULTIPLE
        self.auto_note = ""  # why ``--backend auto`` chose this runner (runtime.models.auto_order)
        self.is_active = False
        self.last_ms = 0.0

    # --- public interface
    def activate(self) -> Runner:
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def infer(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """float32 NCHW in (tensor or array, any device), float32 NCHW CPU tensor out."""
        if not self.is_active:
            raise RuntimeError(f"{self.name}: call activate() (or use `with runner:`) before infer()")
        x = torch.as_tensor(x)
        if x.dim() != 4:
            raise ValueError(f"{self.name}: expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
        if self.fixed_shape is not None and tuple(x.shape[-2:]) != self.fixed_shape:
            raise ValueError(f"{self.name}: this model takes {self.fixed_shape[0]}x{self.fixed_shape[1]} inputs "
                             f"only, got {x.shape[-2]}x{x.shape[-1]}; run it through runtime.tiling")
        start = time.perf_counter()
        x = x.float().contiguous()
        b = self.fixed_batch
        if b is None or x.shape[0] == b:
            y = self._infer(x)
        else:  # chunks of the graph's batch; the last one padded by repeating its last image, then cut
            chunks = []
            for i in range(0, x.shape[0], b):
                part = x[i:i + b]
                n = part.shape[0]
                if n < b:
                    part = torch.cat([part, part[-1:].expand(b - n, *part.shape[1:])]).contiguous()
                chunks.append(self._infer(part)[:n])
            y = torch.cat(chunks)
        self.last_ms = (time.perf_counter() - start) * 1e3
        return y

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def __repr__(self) -> str:
        shape = "dynamic" if self.fixed_shape is None else f"{self.fixed_shape[0]}x{self.fixed_shape[1]}"
        return f"{type(self).__name__}({self.name}, {shape})"

    # --- what backends implement
    def _activate(self) -> None:
        raise NotImplementedError

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _deactivate(self) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------- torch

class TorchRunner(Runner):
    """A PyTorch module in fp32, fp16 or bf16 on CPU or CUDA.

    Args:
        model: the NAFNet (TLC applied or not, as wanted); it is copied on activate, never changed.
        precision: ``fp32``, ``fp16`` or ``bf16``.
        device: ``cpu``, ``cuda`` or ``auto`` (CUDA when available).
        reuse_memory: on CPU, keep freed memory in the process for the next tensors
            (:func:`nafnet_core.process.keep_freed_memory`). It changes the allocator of the whole process, so a
            library user opts in; the command line (infer, parity, bench, serve, demo) does, where it was
            measured to pay: a width32 720x1280 frame took 10.2-14.7 s with it vs 21.9-22.6 s without, at
            2.5-2.9 GB vs 1.9 GB peak (BENCHMARKS.md, "PyTorch eager on CPU: heap reuse").
    """

    backend = "torch"
    precisions = ("fp32", "fp16", "bf16")

    def __init__(self, model: nn.Module, precision: str = "fp32", device: str = "auto", name: str | None = None,
                 reuse_memory: bool = False):
        super().__init__(precision, name)
        self.model = model
        self.device = device
        self.reuse_memory = reuse_memory
        config = getattr(model, "config", None)
        self.whole_image_input = getattr(config, "input_fft", "none") == "fs"
        self.pad_multiple = getattr(config, "pad_multiple", DEFAULT_PAD_MULTIPLE)
        self._module: nn.Module | None = None

    def _activate(self) -> None:
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RunnerError("torch: CUDA requested but torch.cuda.is_available() is False; use --device cpu")
        self._device = torch.device(device)
        self._dtype = TORCH_DTYPES[self.precision]
        if self.reuse_memory and self._device.type == "cpu":
            from nafnet_core.process import keep_freed_memory

            keep_freed_memory()
        if self.precision == "fp16" and isinstance(self.model, NAFNet):
            # As the FP16 export: stages whose residual stream would overflow FP16 on sample photos keep it
            # in FP32 (a plain .half() of such a checkpoint gives inf/NaN).
            from export.fp16_stream import to_half
            from export.ranges import plan

            self._module = to_half(self.model, plan(self.model)["fp32_stream"]).to(self._device)
        else:
            self._module = copy.deepcopy(self.model).to(self._device, self._dtype).eval()

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            y = self._module(x.to(self._device, self._dtype))
        return y.float().cpu()

    def _deactivate(self) -> None:
        self._module = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- onnxruntime

def default_threads() -> int:
    """Threads of an onnxruntime or OpenVINO session when the caller gives none: ``OMP_NUM_THREADS`` where it is
    set (the usual cap on a process's threads, which PyTorch honours too; the test suite's parallel workers set
    it to their share of the cores), else every core."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else (os.cpu_count() or 1)


def cuda_device_count() -> int:
    """Number of CUDA GPUs the driver reports (0 without a driver), asked without loading torch.cuda or ORT EPs."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


#: The CUDA EP computes FP32 MatMul/Conv in TF32 by default on Ampere and newer (10-bit mantissa inputs);
#: the graphs' FP32 islands (LayerNorm channel means, TLC band means) must be real FP32.
CUDA_EP_OPTIONS = {"use_tf32": "0"}


def ort_providers(device: str = "auto") -> list:
    """onnxruntime providers to ask for: the CUDA EP only when it is built in AND a GPU exists.

    onnxruntime-gpu lists CUDAExecutionProvider even on machines without a GPU, and asking for it there
    logs a load error before falling back; this picks providers so that never happens.
    """
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers() and cuda_device_count() > 0
    if device == "cuda" and not has_cuda:
        raise RunnerError("onnxrt: CUDA requested but no CUDA GPU / CUDA execution provider here; use --device cpu")
    if has_cuda:
        return [("CUDAExecutionProvider", CUDA_EP_OPTIONS), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_input_info(path: str | Path) -> tuple[tuple[int, int] | None, str, int | None]:
    """((H, W) if the graph's input is fixed else None, input element type, batch if fixed else None),
    read from the graph header."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, ValueError, DecodeError) as e:
        raise RunnerError(f"{path}: not a readable ONNX file (corrupt, truncated or another format): "
                          f"{first_line(e)}") from None
    if not model.graph.input or not model.graph.node:
        raise RunnerError(f"{path}: not an ONNX graph (no input or no nodes: empty file or another format)")
    inp = model.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    hw = [d.dim_value if d.HasField("dim_value") else None for d in dims[-2:]]
    fixed = (hw[0], hw[1]) if len(hw) == 2 and None not in hw else None
    batch = dims[0].dim_value if len(dims) == 4 and dims[0].HasField("dim_value") else None
    return fixed, onnx.TensorProto.DataType.Name(inp.type.tensor_type.elem_type), batch


class OnnxRuntimeRunner(Runner):
    """An ONNX graph (dynamic or fixed-tile, fp32 or FP16 inside) on onnxruntime.

    Args:
        path: the ``.onnx`` file (its external ``.onnx.data`` beside it).
        precision: what the graph computes in (``fp16`` for the mixed FP16 graph; informational on CPU,
            where onnxruntime computes FP16 nodes in FP32; ``int8`` for a Q/DQ graph: integer convs where
            onnxruntime fuses them, fake quantization elsewhere).
        device: ``cpu``, ``cuda`` or ``auto``.
        threads: intra-op threads (default: all cores).
        opt_level: graph optimisation level: ``disable``, ``basic``, ``extended``, ``all``.
        profile: write an onnxruntime profile (JSON) next to the model; its path is ``profile_file`` after
            deactivate.
        spin: let idle worker threads spin-wait. Off by default: on a CPU shared with other work, spinning
            threads steal cores (measured: 8.3 s vs 11.3 s per 368x640 frame under load, BENCHMARKS.md).
        arena: onnxruntime's CPU memory arena. Off by default: it keeps freed blocks, and a width32
            512x512 tile peaked at 1555 MB with it vs 871 MB without, at no measurable speed cost.
        conv_matmul: on the CPU provider, run the wide 1x1 convs as MatMul (:mod:`runtime.ort_rewrite`, in
            memory; the file is untouched). Default: on when the session is CPU-only.
    """

    backend = "onnxrt"
    precisions = ("fp32", "fp16", "int8")

    def __init__(self, path: str | Path, precision: str = "fp32", device: str = "auto", threads: int | None = None,
                 opt_level: str = "all", profile: bool = False, spin: bool = False, arena: bool = False,
                 conv_matmul: bool | None = None, name: str | None = None):
        super().__init__(precision, name)
        self.path = Path(path)
        self.conv_matmul = conv_matmul
        self.rewritten_convs = 0
        self.device = device
        self.threads = threads
        self.opt_level = opt_level
        self.profile = profile
        self.spin = spin
        self.arena = arena
        self.profile_file: str | None = None
        self._session = None
        if not self.path.is_file():
            raise RunnerError(f"{self.path}: no such ONNX file")
        self.fixed_shape, self._input_type, self.fixed_batch = onnx_input_info(self.path)

    def _graph_for(self, providers: list) -> str | bytes:
        """The file's path, or the bytes of its in-memory rewrite for the CPU provider (``conv_matmul``)."""
        cpu_only = all(p == "CPUExecutionProvider" for p in providers)
        if not (cpu_only if self.conv_matmul is None else self.conv_matmul):
            return str(self.path)
        import onnx

        from .ort_rewrite import conv1x1_as_matmul

        try:
            model, self.rewritten_convs = conv1x1_as_matmul(onnx.load(str(self.path)))
        except Exception:  # an unreadable graph: onnxruntime's own load gives the clearer message
            return str(self.path)
        return model.SerializeToString() if self.rewritten_convs else str(self.path)

    def _activate(self) -> None:
        import onnxruntime as ort

        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        opts = ort.SessionOptions()
        opts.graph_optimization_level = levels[self.opt_level]
        opts.intra_op_num_threads = self.threads or default_threads()
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        opts.enable_cpu_mem_arena = self.arena
        if self.profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(self.path.with_suffix("")) + "_ort_profile"
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        # onnxruntime's Fail / InvalidGraph / InvalidProtobuf / NoSuchFile... derive from Exception directly.
        load_errors = tuple(v for v in vars(ort_errors).values() if isinstance(v, type) and issubclass(v, Exception))
        providers = ort_providers(self.device)
        try:
            self._session = ort.InferenceSession(self._graph_for(providers), opts, providers=providers)
        except (RuntimeError, ValueError, *load_errors) as e:
            raise RunnerError(f"{self.path}: onnxruntime cannot load this graph: {first_line(e, 300)}") from None
        self._in = self._session.get_inputs()[0].name
        self._out = self._session.get_outputs()[0].name
        self._np_dtype = np.float16 if self._input_type == "FLOAT16" else np.float32

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        (y,) = self._session.run([self._out], {self._in: x.cpu().numpy().astype(self._np_dtype, copy=False)})
        return torch.from_numpy(np.asarray(y, dtype=np.float32))

    def _deactivate(self) -> None:
        if self.profile and self._session is not None:
            self.profile_file = self._session.end_profiling()
        self._session = None


# --------------------------------------------------------------------------------------------- OpenVINO

class OpenVINORunner(Runner):
    """An ONNX graph or OpenVINO IR (``.xml`` + ``.bin``) on OpenVINO's CPU plugin, fp32 or bf16.

    bf16 is OpenVINO's inference-precision hint with the FP32 islands of export/openvino_ir.py kept in FP32
    (LayerNorm and TLC statistics, the global residual); activate refuses it, with the reason, on a CPU
    whose OpenVINO has no BF16 (it would run FP32 under a bf16 label). A dynamic graph is compiled once
    per input shape (static shapes let the CPU plugin pick its kernels), the last few kept.

    Args:
        path: the ``.onnx`` or ``.xml`` file.
        precision: ``fp32`` or ``bf16``.
        threads: inference threads (default: all cores).
        shapes_kept: compiled shapes of a dynamic graph kept at once.
    """

    backend = "openvino"
    precisions = ("fp32", "bf16")  # bf16: a compile-time hint with FP32 islands (export/openvino_ir.py)

    def __init__(self, path: str | Path, precision: str = "fp32", threads: int | None = None, shapes_kept: int = 2,
                 name: str | None = None):
        super().__init__(precision, name)
        self.path = Path(path)
        self.threads = threads
        self.shapes_kept = shapes_kept
        self._core = self._model = None
        self._compiled: dict[tuple[int, ...], object] = {}
        if not self.path.is_file():
            raise RunnerError(f"{self.path}: no such ONNX or OpenVINO IR file")
        if self.path.suffix.lower() == ".xml" and not self.path.with_suffix(".bin").is_file():
            raise RunnerError(f"{self.path}: its weights {self.path.with_suffix('.bin').name} are missing beside it; "
                              "re-run `python cli.py export ... --openvino`")
        if self.path.suffix.lower() == ".onnx":
            self.fixed_shape, _, self.fixed_batch = onnx_input_info(self.path)

    def _activate(self) -> None:
        from export import openvino_ir as ovh

        ov = ovh.import_openvino()
        if self.precision == "bf16":
            ok, why = ovh.bf16_support()
            if not ok:
                raise RunnerError(f"openvino bf16: {why}")
        self._core = ov.Core()
        try:
            self._model = (ovh.read_marked(self._core, self.path) if self.precision == "bf16"
                           else self._core.read_model(str(self.path)))
        except (RuntimeError, *ET_ERRORS) as e:
            raise RunnerError(f"{self.path}: OpenVINO cannot read this model (corrupt, truncated or another format): "
                              f"{first_line(e)}") from None
        shape = self._model.inputs[0].get_partial_shape()
        if shape.rank.is_static and shape.rank.get_length() == 4:
            hw = [shape[i].get_length() if shape[i].is_static else None for i in (2, 3)]
            self.fixed_shape = (hw[0], hw[1]) if None not in hw else None
            self.fixed_batch = shape[0].get_length() if shape[0].is_static else None
        self._config = {"INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
                        "INFERENCE_NUM_THREADS": self.threads or default_threads(),
                        "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        if self.fixed_shape is not None:
            self._compile(None)

    def _compile(self, shape: tuple[int, ...] | None):
        """The compiled model for ``shape`` (None: the model as it is)."""
        if shape in self._compiled:
            self._compiled[shape] = self._compiled.pop(shape)  # most recent last
            return self._compiled[shape]
        model = self._model
        if shape is not None:
            model = self._model.clone()
            model.reshape({model.inputs[0]: list(shape)})
        try:
            compiled = self._core.compile_model(model, "CPU", self._config)
        except RuntimeError as e:
            raise RunnerError(f"{self.path}: OpenVINO cannot compile this model: {first_line(e, 300)}") \
                from None
        got = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        want = "bf16" if self.precision == "bf16" else "f32"
        if want not in got.lower().replace("float32", "f32").replace("bfloat16", "bf16"):
            raise RunnerError(f"openvino {self.precision}: the CPU plugin compiled {got} instead; "
                              "this CPU cannot run the asked precision")
        while len(self._compiled) >= max(1, self.shapes_kept):
            self._compiled.pop(next(iter(self._compiled)))
        self._compiled[shape] = compiled
        return compiled

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        compiled = self._compile(None if self.fixed_shape is not None else tuple(x.shape))
        y = compiled(x.cpu().numpy())[compiled.outputs[0]]
        return torch.from_numpy(np.array(y, dtype=np.float32))

    def _deactivate(self) -> None:
        self._compiled.clear()
        self._core = self._model = None


# --------------------------------------------------------------------------------------------- TensorRT

class TensorRTRunner(Runner):
    """A serialized TensorRT engine (FP16 inside, FP32 I/O), run with ``execute_async_v3``.

    Buffers are torch CUDA tensors; TensorRT is imported lazily in activate (runtime/trt.py).

    Args:
        path: the engine file.
        fixed_shape: (H, W) of a static engine, when known from the manifest; None for dynamic profiles.
        built_for: the manifest's ``tensorrt`` record of the engine (TensorRT version, GPU, compute
            capability). When given, activate refuses an engine built for another setup, with the reason.
        verify: False skips that check (``--no-verify``).
    """

    backend = "trt"
    precisions = ("fp16", "int8")

    def __init__(self, path: str | Path, precision: str = "fp16", fixed_shape: tuple[int, int] | None = None,
                 name: str | None = None, built_for: dict | None = None, verify: bool = True):
        super().__init__(precision, name)
        self.path = Path(path)
        self.fixed_shape = fixed_shape
        self.built_for = built_for
        self.verify = verify
        self._engine = None

    def _activate(self) -> None:
        from export.manifest import engine_mismatch

        from . import trt

        if self.verify and self.built_for is not None:
            why = engine_mismatch(self.built_for, trt.current_env())
            if why:
                raise RunnerError(f"{self.path}: {why}")
        self._engine = trt.EngineSession(self.path)
        self.fixed_shape = self._engine.fixed_shape or self.fixed_shape
        self.fixed_batch = self._engine.fixed_batch

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        return self._engine.run(x)

    def _deactivate(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._engine = None
