"""The thin TensorRT layer: build a strongly typed engine from an FP16 or INT8 Q/DQ ONNX file, and run one.

Imports ``tensorrt`` lazily (this module is imported only by ``--trt``). Written against the
TensorRT 10.12+/11 Python API: strongly typed network (the flag exists up to 10.x and is ignored in
11, where every network is strongly typed), no ``BuilderFlag.FP16`` or ``INT8`` (the precisions come from
the ONNX casts and Q/DQ nodes: explicit quantization, the only INT8 route in TensorRT 11), TF32 cleared
(the FP32 islands stay FP32), workspace via ``set_memory_pool_limit``,
``builder_optimization_level``, and a timing cache created from the previous cache's bytes (an empty one,
with one warning line, when TensorRT rejects the file) and serialised after the build on a best-effort basis.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from nafnet_core.fileio import atomic_write_bytes

from .shapes import Profile
from .trt_plan import TensorRTUnavailable, TrtOptions, default_timing_cache, missing_message


def import_tensorrt(out_dir: str | Path | None = None):
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional heavy dependency
    except ImportError:
        raise TensorRTUnavailable(missing_message("TensorRT (the tensorrt Python package)", out_dir)) from None
    return trt


def gpu_info() -> tuple[str, str]:
    """(GPU name, compute capability "8.9") of CUDA device 0, via torch; ("unknown", "0.0") without CUDA torch."""
    import torch

    if not torch.cuda.is_available():
        return "unknown", "0.0"
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


def build_engine(onnx_path: str | Path, engine_path: str | Path, profile: Profile | dict[str, Profile],
                 input_name: str, options: TrtOptions, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Builds ``engine_path`` from ``onnx_path`` as written (strongly typed); returns the manifest's
    ``tensorrt`` record. ``profile``: the optimisation profile of input ``input_name``, or one per input name
    (graphs with several inputs, e.g. AdaRevD's sub-decoder steps)."""
    profiles = profile if isinstance(profile, dict) else {input_name: profile}
    trt = import_tensorrt(out_dir)
    gpu, cc = gpu_info()
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except (RuntimeError, TypeError) as e:
        raise TensorRTUnavailable(missing_message(f"a CUDA GPU ({e})", out_dir)) from None
    if builder is None:
        raise TensorRTUnavailable(missing_message("a CUDA GPU (TensorRT could not create a builder)", out_dir))
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    config.builder_optimization_level = options.opt_level
    # TF32 is on by default for FP32 tensors: on Ampere and newer it would round the FP32 islands' MatMul
    # inputs (LayerNorm channel means, TLC band means) to 10-bit mantissas; they must be real FP32.
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    cache_path = Path(options.timing_cache or default_timing_cache(trt.__version__, gpu, cc))
    cache_reused = _use_timing_cache(config, cache_path)
    trt_profile = builder.create_optimization_profile()
    for name, p in profiles.items():
        trt_profile.set_shape(name, p.min, p.opt, p.max)
    config.add_optimization_profile(trt_profile)

    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    atomic_write_bytes(engine_path, bytes(plan))
    _save_timing_cache(config, cache_path)  # best effort: the engine is written, nothing may fail now
    shapes = profile.to_dict() if isinstance(profile, Profile) else {n: p.to_dict() for n, p in profiles.items()}
    return {"version": trt.__version__, "gpu": gpu, "compute_capability": cc, "profile": shapes,
            "workspace_bytes": options.workspace_bytes, "builder_optimization_level": options.opt_level,
            "strongly_typed": True, "tf32": False, "timing_cache": str(cache_path),
            "timing_cache_reused": cache_reused, "build_seconds": round(seconds, 2)}


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _use_timing_cache(config: Any, cache_path: Path) -> bool:
    """Gives the builder the timing cache at ``cache_path``; returns whether its contents were used.

    A cache TensorRT rejects — written on another GPU or TensorRT version (``set_timing_cache`` returns False
    with ``ignore_mismatch=False``), or corrupt/unreadable (``create_timing_cache`` raises) — is replaced by an
    empty cache with one warning line; the build goes on and the file is rewritten after it.
    """
    try:
        data = cache_path.read_bytes() if cache_path.is_file() else b""
    except OSError as e:
        data, why = b"", f"unreadable ({e.strerror or e})"
    else:
        why = ""
    if data:
        try:
            cache = config.create_timing_cache(data)
        except Exception as e:  # noqa: BLE001 - TensorRT raises RuntimeError/TypeError variants on bad bytes
            cache, why = None, f"corrupt ({type(e).__name__})"
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return True
        why = why or "written on another GPU or TensorRT version"
    if why:
        _warn(f"{cache_path}: timing cache {why}; building with an empty cache (the file is replaced after the "
              "build)")
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return False


def _save_timing_cache(config: Any, cache_path: Path) -> None:
    """Writes the builder's updated timing cache atomically; a failure is one warning line, never an error."""
    try:
        cache = config.get_timing_cache()
        if cache is None:
            raise RuntimeError("the builder returned no timing cache")
        atomic_write_bytes(cache_path, bytes(cache.serialize()))
    except Exception as e:  # noqa: BLE001 - the engine is already written; a cache is only a speed-up
        _warn(f"{cache_path}: timing cache not saved ({type(e).__name__}: {e}); the engine is fine, the next "
              "build will time its layers again")


def run_engine(engine_path: str | Path, x: np.ndarray, input_name: str = "input",
               output_name: str = "output") -> np.ndarray:
    """Runs a built engine once on NCHW float32 ``x`` (CUDA via torch); returns float32 NCHW. For tests and checks."""
    import torch

    trt = import_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    context = engine.create_execution_context()
    inp = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).cuda()
    context.set_input_shape(input_name, tuple(inp.shape))
    out = torch.empty(tuple(context.get_tensor_shape(output_name)), dtype=torch.float32, device="cuda")
    context.set_tensor_address(input_name, inp.data_ptr())
    context.set_tensor_address(output_name, out.data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError(f"{engine_path}: TensorRT execution failed")
    stream.synchronize()
    return out.cpu().numpy()
