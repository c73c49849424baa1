"""Everything about a TensorRT build that needs no GPU: options, profiles, cache location, records.

The thin part that imports TensorRT is :mod:`export.tensorrt_build`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from nafnet_core.errors import UserError

from .shapes import DEFAULT_PROFILE

INSTALL_HINT = ('install it on a machine with an NVIDIA GPU: pip install -e ".[trt]" (tensorrt>=10.12), '
                "or use NVIDIA's TensorRT container")


class TensorRTUnavailable(UserError, RuntimeError):
    """TensorRT or a CUDA GPU is missing; the ONNX artifacts were still written."""


def missing_message(what: str, out_dir: str | Path | None = None) -> str:
    """One sentence: what is missing, how to install it, and that the ONNX files are there."""
    where = f"; the ONNX artifacts and manifest in {out_dir} were written" if out_dir is not None else ""
    return f"--trt needs {what}: {INSTALL_HINT}{where}."


@dataclass(frozen=True)
class TrtOptions:
    """TensorRT builder settings.

    Args:
        workspace_gib: builder workspace memory pool limit (GiB).
        opt_level: builder optimisation level 0-5 (TensorRT default 3; higher builds slower, may run faster).
        timing_cache: timing cache file, read if present and rewritten after the build
            (None: :func:`default_timing_cache`).
        profile_hw: (min, opt, max) (height, width) of the dynamic graph's optimisation profile.
        max_batch: largest batch of the dynamic profile.
    """

    workspace_gib: float = 4.0
    opt_level: int = 3
    timing_cache: Path | None = None
    profile_hw: tuple = field(default=DEFAULT_PROFILE)
    max_batch: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.opt_level <= 5:
            raise ValueError(f"builder optimisation level must be 0..5, got {self.opt_level}")
        if self.workspace_gib <= 0:
            raise ValueError(f"workspace must be positive, got {self.workspace_gib} GiB")

    @property
    def workspace_bytes(self) -> int:
        return int(self.workspace_gib * 2**30)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nafnet-deblurring" / "tensorrt"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


def default_timing_cache(trt_version: str, gpu_name: str, compute_capability: str) -> Path:
    """Per TensorRT version and GPU (a cache is only valid for both):
    ``~/.cache/.../trt-10.13.0-nvidia-l4-sm89.cache``."""
    sm = compute_capability.replace(".", "")
    return cache_dir() / f"trt-{_slug(trt_version)}-{_slug(gpu_name)}-sm{sm}.cache"


# ---------------------------------------------------------------------------------------------------------
# Manual builds: trtexec and Polygraphy command lines for an export directory

#: File written beside the manifest with the manual build commands of that export.
COMMANDS_NAME = "TENSORRT.md"
#: Timing cache file name used by the written commands (relative to the export directory).
COMMANDS_TIMING_CACHE = "timing.cache"
#: Polygraphy's pass mark (max |diff| against the FP32 graph in onnxruntime, outputs in [0, 1]) per precision.
#: FP16: the project's parity limit (>= 45 dB PSNR vs FP32) allows an RMS error of 5.6e-3 and single pixels
#: in textured regions reach a few times that, so 0.02 flags a broken engine without failing a sound one.
#: FP32 (TF32 off): only summation order differs, 1e-3 is far above it.
POLYGRAPHY_ATOL = {"fp16": 0.02, "fp32": 1e-3, "int8": 0.25}


def tensorrt_settings(options: TrtOptions, channels: int = 3) -> dict:
    """The manifest's ``tensorrt_settings`` record: what the commands and ``--trt`` build with (no GPU needed)."""
    from .shapes import ShapeSpec, make_profile

    return {"dynamic_profile": make_profile(ShapeSpec.dynamic(), options.profile_hw, options.max_batch,
                                            channels).to_dict(),
            "workspace_bytes": options.workspace_bytes, "builder_optimization_level": options.opt_level}


def _dims(shape: list[int]) -> str:
    return "x".join(str(v) for v in shape)


def _profile_of(artifact: dict, settings: dict) -> dict | None:
    """None for a tile graph (static shapes: no shape flags), else the dynamic profile of ``settings``."""
    return None if artifact["shape"]["kind"] == "tile" else settings["dynamic_profile"]


def trtexec_command(onnx_file: str, artifact: dict, settings: dict, major: int,
                    input_name: str = "input") -> list[str]:
    """``trtexec`` argv that builds ``onnx_file``'s engine as ``--trt`` does, for TensorRT ``major`` 10 or 11.

    Args:
        onnx_file: the ONNX file name (relative to the export directory, where the command runs).
        artifact: its manifest record (``shape`` decides the profile flags).
        settings: the manifest's ``tensorrt_settings``.
        major: TensorRT major version: 10 adds ``--stronglyTyped`` (weak typing is the default there);
            11 has strong typing always (the flag is a deprecated no-op). Neither gets ``--fp16``: the
            precisions are the graph's Casts.
        input_name: the graph's input.
    """
    if major not in (10, 11):
        raise ValueError(f"TensorRT major version must be 10 or 11, got {major}")
    engine = onnx_file.rsplit(".", 1)[0] + ".engine"
    argv = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine}"]
    argv += ["--stronglyTyped"] if major == 10 else []
    argv += ["--noTF32", f"--memPoolSize=workspace:{settings['workspace_bytes'] // 2**20}M",
             f"--builderOptimizationLevel={settings['builder_optimization_level']}",
             f"--timingCacheFile={COMMANDS_TIMING_CACHE}"]
    profile = _profile_of(artifact, settings)
    if profile is not None:
        argv += [f"--{k}Shapes={input_name}:{_dims(profile[k])}" for k in ("min", "opt", "max")]
    return argv + ["--skipInference"]


def polygraphy_commands(onnx_file: str, reference_file: str | None, artifact: dict, settings: dict, major: int,
                        input_name: str = "input") -> list[list[str]]:
    """``polygraphy run`` argvs: save FP32 reference outputs (onnxruntime), then build the engine and compare.

    Args:
        onnx_file: the graph to build (FP16 for the project's engines).
        reference_file: the FP32 graph of the same shape run in onnxruntime as the reference (None: compare
            against onnxruntime running ``onnx_file`` itself).
        artifact: ``onnx_file``'s manifest record.
        settings: the manifest's ``tensorrt_settings``.
        major: TensorRT major version (10: ``--strongly-typed``; 11: always strongly typed).
        input_name: the graph's input.
    """
    if major not in (10, 11):
        raise ValueError(f"TensorRT major version must be 10 or 11, got {major}")
    stem = onnx_file.rsplit(".", 1)[0]
    profile = _profile_of(artifact, settings)
    run_shape = [] if profile is None else ["--input-shapes", f"{input_name}:[{','.join(map(str, profile['opt']))}]"]
    reference = ["polygraphy", "run", reference_file or onnx_file, "--onnxrt", *run_shape,
                 "--save-inputs", f"{stem}.inputs.json", "--save-outputs", f"{stem}.reference.json"]
    build = ["polygraphy", "run", onnx_file, "--trt"] + (["--strongly-typed"] if major == 10 else [])
    if profile is not None:
        build += [arg for k in ("min", "opt", "max")
                  for arg in (f"--trt-{k}-shapes", f"{input_name}:[{','.join(map(str, profile[k]))}]")]
    build += ["--pool-limit", f"workspace:{settings['workspace_bytes'] // 2**20}M",
              "--builder-optimization-level", str(settings["builder_optimization_level"]),
              "--load-timing-cache", COMMANDS_TIMING_CACHE, "--save-timing-cache", COMMANDS_TIMING_CACHE,
              "--save-engine", f"{stem}.engine",
              "--load-inputs", f"{stem}.inputs.json", "--load-outputs", f"{stem}.reference.json",
              "--check-error-stat", "max", "--atol", str(POLYGRAPHY_ATOL[artifact["precision"]]), "--rtol", "0"]
    return [reference, build]


def build_commands(data: dict) -> str:
    """The text of ``TENSORRT.md``: trtexec and Polygraphy commands for every ONNX graph of the manifest ``data``.

    Pure (manifest in, Markdown out). Commands for the FP16 graphs (what ``--trt`` builds), or for the FP32
    graphs (an FP32 engine) when the export has no FP16 graph.
    """
    settings = data["tensorrt_settings"]
    input_name = data["io"]["input"]
    onnx = {name: rec for name, rec in data["artifacts"].items() if rec["file"].endswith(".onnx")}
    fp16 = sorted((name, rec) for name, rec in onnx.items() if rec["precision"] == "fp16")
    # the INT8 Q/DQ graphs (TensorRT's placement; not their cpu form) are built by --trt too
    int8 = sorted((name, rec) for name, rec in onnx.items() if rec.get("format") == "onnx-int8")
    ordered = fp16 + int8 or sorted(onnx.items())  # what --trt builds; FP32 only without them
    fp32_by_shape = {_json_key(rec["shape"]): rec["file"] for rec in onnx.values() if rec["precision"] == "fp32"}
    lines = [
        "# Building TensorRT engines from this export by hand",
        "",
        "Run these in this directory. They build what `python cli.py export CHECKPOINT --trt` builds: a strongly",
        "typed network (the precisions are the graph's own Casts, so there is no `--fp16`), TF32 off (the FP32",
        "LayerNorm and TLC islands stay exact FP32), the same workspace, optimisation level and profile, and a",
        f"timing cache `{COMMANDS_TIMING_CACHE}` reused between builds. A cache written on another GPU or TensorRT",
        "version is not used by the builder; delete it if TensorRT warns about it.",
        "",
        "- TensorRT 10.x (10.12 or newer): networks are weakly typed unless asked, so pass `--stronglyTyped`",
        "  (trtexec) / `--strongly-typed` (Polygraphy). Never add `--fp16`: with strong typing trtexec ignores it",
        "  with a warning, and without strong typing it lets the builder move the FP32 islands to FP16.",
        "- TensorRT 11.x: every network is strongly typed (`--stronglyTyped` is a deprecated no-op) and `--fp16`",
        "  no longer exists.",
        "- Polygraphy compares the engine with the FP32 graph run in onnxruntime (max |diff| on outputs in [0, 1]:",
        f"  {POLYGRAPHY_ATOL['fp16']} for FP16, {POLYGRAPHY_ATOL['int8']} for INT8, {POLYGRAPHY_ATOL['fp32']} for "
        "FP32); "
        "`python cli.py parity` gives the PSNR figures.",
        "- INT8 graphs are explicitly quantized (Q/DQ nodes, signed symmetric): no `--int8` and no calibration",
        "  cache (TensorRT 11 removed both; the scales are in the graph).",
        "- Tile graphs have fixed shapes: no shape flags. The dynamic graph needs the profile below",
        "  (`--profile` of the export).",
        "",
    ]
    for major in (10, 11):
        lines += [f"## TensorRT {major}.x", ""]
        for name, rec in ordered:
            shape = rec["shape"]
            what = ("dynamic, profile min/opt/max " + " / ".join(_dims(settings["dynamic_profile"][k])
                                                                for k in ("min", "opt", "max"))
                    if shape["kind"] == "dynamic" else f"tile {shape['batch']}x3x{shape['height']}x{shape['width']}")
            lines += [f"`{name}` ({rec['precision']}, {what}):", "", "```bash",
                      shlex.join(trtexec_command(rec["file"], rec, settings, major, input_name))]
            ref = fp32_by_shape.get(_json_key(shape)) if rec["precision"] in ("fp16", "int8") else None
            for argv in polygraphy_commands(rec["file"], ref, rec, settings, major, input_name):
                lines.append(shlex.join(argv))
            lines += ["```", ""]
    return "\n".join(lines)


def _json_key(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True)
