"""A model repository for NVIDIA Triton Inference Server, written from an export directory.

    REPO/
      nafnet/config.pbtxt         platform onnxruntime_onnx: the dynamic FP32 graph, TensorRT FP16
      nafnet/1/model.onnx         accelerator with a shape profile, dynamic batching, instance group
      nafnet_trt/config.pbtxt     platform tensorrt_plan (only where the export holds an engine)
      nafnet_trt/1/model.plan

The official ``tritonserver`` container (onnxruntime and tensorrt backends) serves it as it is:
``docker run --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 -v $PWD/REPO:/models
nvcr.io/nvidia/tritonserver:24.10-py3 tritonserver --model-repository=/models``.

Both models take the tensor the exported graphs take: ``input`` FP32 (N, 3, H, W) in [0, 1], and answer
``output`` FP32 (N, 3, H, W), not clamped. ``python cli.py serve`` (runtime/serve.py) serves the same
names, so one client (``infer --server``) talks to either.

Facts the configs rely on (Triton's model configuration, onnxruntime backend and batcher docs):
- ``max_batch_size > 0`` means ``dims`` exclude the batch dimension, and the graph's first dimension must
  be dynamic; a graph with a fixed batch gets ``max_batch_size: 0`` and full dims (no dynamic batching).
- the dynamic batcher only groups requests of the same shape, so images of mixed sizes queue apart.
- the onnxruntime backend maps ``precision_mode: FP16`` to the TensorRT EP's ``trt_fp16_enable`` and the
  ``trt_profile_{min,opt,max}_shapes`` keys to its explicit profile (``input:1x3x64x64`` form); TensorRT
  builds its engine when the model loads (``model_warmup`` at the profile's opt shape makes that happen
  before the first request, and the engine cache keeps it across restarts).
- the accelerator lets TensorRT choose FP16 per layer from an FP32 graph (weakly typed). The project's
  own FP16 placement (LayerNorm, pooling means and TLC sums in FP32) is guaranteed by the
  ``tensorrt_plan`` model, built strongly typed from the FP16 graph; ``accelerator="trt-fp32"`` keeps
  the onnxruntime model in FP32.

Configs are written as text here (no Triton package needed to export); the tests parse every one with
Triton's own ``ModelConfig`` protobuf schema (shipped in ``tritonclient``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from nafnet_core.errors import UserError
from nafnet_core.fileio import atomic_path, atomic_write_text, make_dirs

from .manifest import load_manifest, verify_artifact
from .shapes import DEFAULT_PROFILE

DEFAULT_MODEL_NAME = "nafnet"
#: Suffix of the tensorrt_plan model's name (``nafnet_trt``).
TRT_MODEL_SUFFIX = "_trt"
ACCELERATORS = ("trt-fp16", "trt-fp32", "none")
KINDS = ("gpu", "cpu")
_TRITON_TYPES = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "DOUBLE": "TYPE_FP64", "UINT8": "TYPE_UINT8"}


class RepositoryError(UserError):
    """An export that cannot become a Triton model (nothing suitable in it); the message says what to do."""


@dataclass(frozen=True)
class RepoOptions:
    """What the configs say beyond the graph itself.

    Args:
        name: name of the onnxruntime model (the engine's is ``name + "_trt"``).
        max_batch: ``max_batch_size`` of models with a dynamic batch dimension.
        delay_us: the dynamic batcher's ``max_queue_delay_microseconds``.
        instances: model instances per GPU (or on the CPU).
        kind: ``gpu`` (KIND_GPU, every visible GPU) or ``cpu`` (KIND_CPU; no TensorRT accelerator).
        accelerator: ``trt-fp16``, ``trt-fp32`` or ``none`` for the onnxruntime model on GPUs.
        profile_hw: (min, opt, max) (height, width) of the TensorRT shape profile of a dynamic graph.
        trt_cache: engine cache folder inside the container (mount a volume there to keep engines).
    """

    name: str = DEFAULT_MODEL_NAME
    max_batch: int = 8
    delay_us: int = 2000
    instances: int = 1
    kind: str = "gpu"
    accelerator: str = "trt-fp16"
    profile_hw: tuple = DEFAULT_PROFILE
    trt_cache: str = "/tmp/triton-trt-cache"

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-." for c in self.name):
            raise RepositoryError(f"model name {self.name!r}: use letters, digits, '_', '-' or '.'")
        if self.max_batch < 1 or self.instances < 1 or self.delay_us < 0:
            raise RepositoryError("max batch and instances must be >= 1, the queue delay >= 0")
        if self.kind not in KINDS:
            raise RepositoryError(f"instance kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.accelerator not in ACCELERATORS:
            raise RepositoryError(f"accelerator {self.accelerator!r}: choose one of {', '.join(ACCELERATORS)}")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as Triton sees it: name, Triton type, dims (-1 = any) incl. batch."""

    name: str
    data_type: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TritonModel:
    """One model of the repository: its config text and the file that becomes ``1/<model_file>``."""

    name: str
    config: str
    source: Path
    model_file: str
    artifact: str


def graph_io(onnx_path: str | Path) -> tuple[TensorSpec, TensorSpec]:
    """(input, output) of an ONNX graph, read from its header: symbolic dims become -1."""
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except (OSError, ValueError, DecodeError):
        raise RepositoryError(f"{onnx_path}: not a readable ONNX graph; re-run the export") from None

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        t = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        elem = onnx.TensorProto.DataType.Name(t.elem_type)
        if elem not in _TRITON_TYPES:
            raise RepositoryError(f"{onnx_path}: tensor {value.name!r} has type {elem}, not one Triton takes here")
        return TensorSpec(value.name, _TRITON_TYPES[elem], dims)

    return spec(model.graph.input[0]), spec(model.graph.output[0])


def _dims(values) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def _tensor_block(t: TensorSpec, batched: bool) -> str:
    dims = t.shape[1:] if batched else t.shape
    return f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n    dims: {_dims(dims)}\n  }}'


def _shape_text(name: str, nchw) -> str:
    return f"{name}:" + "x".join(str(v) for v in nchw)


def _profile(inp: TensorSpec, profile_hw, max_batch: int) -> tuple[tuple[int, ...], ...]:
    """min / opt / max NCHW of the TensorRT profile: fixed dims stay, dynamic H/W from ``profile_hw``."""
    n, c, h, w = inp.shape
    out = []
    for i, (ph, pw) in enumerate(profile_hw):
        batch = n if n > 0 else (max_batch if i == 2 else 1)
        out.append((batch, c, h if h > 0 else ph, w if w > 0 else pw))
    return tuple(out)


def _config(name: str, platform: str, inp: TensorSpec, out: TensorSpec, opts: RepoOptions, model_file: str,
            max_batch: int, extra: str = "") -> str:
    batched = inp.shape[0] == -1
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch if batched else 0}",
             f'default_model_filename: "{model_file}"',
             "input [\n" + _tensor_block(inp, batched) + "\n]", "output [\n" + _tensor_block(out, batched) + "\n]"]
    if batched:
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {opts.delay_us}\n}}")
    kind = "KIND_GPU" if opts.kind == "gpu" else "KIND_CPU"
    lines.append(f"instance_group [\n  {{\n    kind: {kind}\n    count: {opts.instances}\n  }}\n]")
    return "\n".join(lines) + ("\n" + extra if extra else "") + "\n"


def _warmup(inp: TensorSpec, opt_nchw) -> str:
    """One zero-filled request at the profile's opt shape: TensorRT builds its engine at load time."""
    dims = opt_nchw[1:] if inp.shape[0] == -1 else opt_nchw
    return (f'model_warmup [\n  {{\n    name: "opt_shape"\n    batch_size: 1\n    inputs {{\n      key: "{inp.name}"\n'
            f'      value {{\n        data_type: {inp.data_type}\n        dims: {_dims(dims)}\n'
            '        zero_data: true\n'
            f"      }}\n    }}\n  }}\n]")


def onnx_model(onnx_path: Path, artifact: str, opts: RepoOptions) -> TritonModel:
    """The ``onnxruntime_onnx`` model of a graph, with the TensorRT accelerator on GPU instances."""
    inp, out = graph_io(onnx_path)
    extra = ""
    if opts.kind == "gpu" and opts.accelerator != "none":
        lo, opt, hi = _profile(inp, opts.profile_hw, opts.max_batch)
        params = {"precision_mode": "FP16" if opts.accelerator == "trt-fp16" else "FP32",
                  "max_workspace_size_bytes": str(4 << 30),
                  "trt_engine_cache_enable": "1", "trt_engine_cache_path": f"{opts.trt_cache}/{opts.name}",
                  "trt_profile_min_shapes": _shape_text(inp.name, lo),
                  "trt_profile_opt_shapes": _shape_text(inp.name, opt),
                  "trt_profile_max_shapes": _shape_text(inp.name, hi)}
        body = "\n".join(f'        parameters {{ key: "{k}" value: "{v}" }}' for k, v in params.items())
        extra = ("optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
                 f'        name: "tensorrt"\n{body}\n      }}\n    ]\n  }}\n}}\n' + _warmup(inp, opt))
    return TritonModel(opts.name, _config(opts.name, "onnxruntime_onnx", inp, out, opts, "model.onnx",
                                          opts.max_batch, extra), onnx_path, "model.onnx", artifact)


def engine_model(engine_path: Path, onnx_path: Path, artifact: str, trt_record: dict, opts: RepoOptions) -> TritonModel:
    """The ``tensorrt_plan`` model of an engine; names, types and dims from the ONNX graph it was built from,
    the largest batch from the engine's profile (the engine accepts no more)."""
    inp, out = graph_io(onnx_path)
    profile_max = (trt_record.get("profile") or {}).get("max") or [1]
    name = opts.name + TRT_MODEL_SUFFIX
    cfg = _config(name, "tensorrt_plan", inp, out, opts, "model.plan", min(opts.max_batch, int(profile_max[0])))
    return TritonModel(name, cfg, engine_path, "model.plan", artifact)


def plan_repository(export_dir: str | Path, opts: RepoOptions = RepoOptions(),
                    verify: bool = True) -> list[TritonModel]:
    """The models an export becomes: the FP32 dynamic graph (else an FP32 tile graph) for onnxruntime, and
    the dynamic (else a tile) engine for TensorRT where one exists. Reads the manifest and graph headers;
    ``verify`` first checks every file used against the manifest's sha256."""
    manifest = load_manifest(export_dir)
    arts = manifest.artifacts

    def first(fmt: str) -> str | None:
        keys = [k for k, r in arts.items() if r["format"] == fmt]
        keys.sort(key=lambda k: arts[k]["shape"]["kind"] != "dynamic")
        return keys[0] if keys else None

    onnx_key, engine_key = first("onnx-fp32"), first("trt-fp16")
    if onnx_key is None:
        raise RepositoryError(f"{export_dir}: the export has no FP32 ONNX graph; re-run `python cli.py export`")
    if verify:
        used = [onnx_key] + ([engine_key, arts[engine_key]["built_from"]] if engine_key else [])
        for key in used:
            verify_artifact(manifest, key)
    models = [onnx_model(manifest.path(onnx_key), onnx_key, opts)]
    if engine_key is not None:
        rec = arts[engine_key]
        models.append(engine_model(manifest.path(engine_key), manifest.path(rec["built_from"]), engine_key,
                                   rec.get("tensorrt") or {}, opts))
    return models


def write_repository(export_dir: str | Path, repo: str | Path, opts: RepoOptions = RepoOptions(),
                     overwrite: bool = False) -> list[Path]:
    """Writes the Triton model repository of ``export_dir`` into ``repo``; returns the config paths.

    Every file is checked against the export's manifest (sha256) before it is copied, and every file is
    written to a temporary name and renamed, config last, so an interrupted run leaves no model whose
    config vouches for a partial file.

    Args:
        export_dir: an export directory (``manifest.json``).
        repo: the repository root (created; other models in it are left alone).
        opts: names, batching, instances, accelerator.
        overwrite: replace models of the same name that exist in ``repo``.
    """
    export_dir, repo = Path(export_dir), Path(repo)
    models = plan_repository(export_dir, opts)  # checks every file it uses against the manifest
    existing = [m.name for m in models if (repo / m.name).exists()]
    if existing and not overwrite:
        raise RepositoryError(f"{repo}: model(s) {', '.join(existing)} exist; pass --overwrite to replace them")
    written = []
    for m in models:
        folder = repo / m.name
        (folder / "config.pbtxt").unlink(missing_ok=True)  # no config may vouch for a half-copied file
        version = make_dirs(folder / "1")
        for stale in version.iterdir():
            if stale.name != m.model_file and stale.is_file():
                stale.unlink()
        with atomic_path(version / m.model_file) as tmp:
            shutil.copyfile(m.source, tmp)
        written.append(atomic_write_text(folder / "config.pbtxt", m.config))
    return written


__all__ = ["RepoOptions", "TritonModel", "RepositoryError", "plan_repository", "write_repository", "graph_io",
           "DEFAULT_MODEL_NAME", "ACCELERATORS", "KINDS"]
