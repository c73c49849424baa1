"""``DIR/manifest.json``: what an export directory holds, and the check that it is intact.

Written last and atomically by :func:`export.export_model`, so an interrupted export never leaves a
manifest that vouches for a partial file (an older manifest is removed before anything is written).
Consumers (the runtime's Runners) call :func:`load_manifest` or :func:`verify` and pick artifacts.

Schema (``schema_version`` 1)::

    {
      "format": "nafnet-deblurring-export", "schema_version": 1,
      "project_version": "0.1.0", "created_utc": "2025-01-01T12:00:00Z",
      "model":  {"preset": "nafnet-gopro-width32" | null, "config": {ModelConfig fields},
                 "parameters": 17111907},
      "source": {"checkpoint": "path/as/given" | null, "sha256": "<hex>" | null,
                 "kind": "official" | "project" | "safetensors" | "module"},
      "tlc":    {"enabled": true, "train_size": 256, "base_ratio": 1.5,
                 "kernels": [[384, 384], [192, 192], [96, 96], [48, 48], [24, 24]]},   # level 0 .. middle
      "folded": true,                       # deploy form of the blocks (export/fold.py)
      "opset": 18,
      "io": {"input": "input", "output": "output", "layout": "NCHW", "dtype": "float32",
             "value_range": [0.0, 1.0], "pad_multiple": 16},  # graphs pad/crop internally: any H, W
      "artifacts": {                        # key: "<format>-<shape tag>", see export.formats
        "onnx-fp32-dynamic": {
          "format": "onnx-fp32", "file": "model-fp32-dynamic.onnx", "sha256": "<hex>", "bytes": 68634651,
          "precision": "fp32", "runtime": "onnxruntime",
          "shape": {"kind": "dynamic", "dims": {"batch": [1, null], "height": [1, null], "width": [1, null]}},
          "check": {"input_shape": [1, 3, 37, 53], "reference": "torch-fp32", "max_abs_diff": 4e-07,
                    "psnr_db": 128.1}                                                # optional
        },
        "onnx-fp16-512x512": {..., "shape": {"kind": "tile", "batch": 1, "height": 512, "width": 512}},
        "openvino-fp32-dynamic": {..., "file": "model-fp32-dynamic.xml", "runtime": "openvino",
          "built_from": "onnx-fp32-dynamic", "companions": ["openvino-fp32-dynamic-weights"],
          "openvino": {"version": "2026.4.1-...", "fp32_islands": 131}},   # its .bin is in "files"
        "trt-fp16-512x512": {..., "built_from": "onnx-fp16-512x512",
          "tensorrt": {"version": "10.13.0", "gpu": "NVIDIA L4", "compute_capability": "8.9",
                       "profile": {"min": [...], "opt": [...], "max": [...]}, "workspace_bytes": 4294967296,
                       "builder_optimization_level": 3, "timing_cache": "path", "build_seconds": 61.2}}
      },
      "tensorrt_settings": {"dynamic_profile": {"min": [1, 3, 64, 64], "opt": [...], "max": [...]},
                            "workspace_bytes": 4294967296, "builder_optimization_level": 3},
      "files": {                            # other files of the export, hashed like the artifacts
        "tensorrt-commands": {"file": "TENSORRT.md", "sha256": "<hex>", "bytes": 9876},  # trtexec/Polygraphy
        "openvino-fp32-dynamic-weights": {"file": "model-fp32-dynamic.bin", "sha256": "<hex>", "bytes": 68...}
      },
      "fp16": {"fp32_stream": ["encoders.0", ...], "fp32_convs": ["downs.0", ...], "margin": 4.0,
               "max_stream": 812.5, "max_gate": 95.1, "gate_overflow": [], "measured_on": "2 photos, 256x256"}
                                            # with FP16 graphs only: export.fp16_stream
    }

Every ONNX artifact carries the same facts in its ``metadata_props`` (keys ``nafnet.*``, see
:func:`onnx_metadata`), so a lone ``.onnx`` file still says what it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nafnet_core.errors import UserError
from nafnet_core.fileio import atomic_write_text, sha256_file

MANIFEST_NAME = "manifest.json"
FORMAT = "nafnet-deblurring-export"
SCHEMA_VERSION = 1


class ManifestError(UserError, ValueError):
    """A missing, unreadable or inconsistent export directory; the message names the file."""


@dataclass
class Manifest:
    """A loaded manifest: the raw ``data`` dict plus the directory it describes."""

    data: dict[str, Any]
    directory: Path

    @property
    def artifacts(self) -> dict[str, dict[str, Any]]:
        return self.data["artifacts"]

    def path(self, name: str) -> Path:
        """Absolute path of artifact ``name``."""
        if name not in self.artifacts:
            raise ManifestError(f"{self.directory / MANIFEST_NAME}: no artifact {name!r}; "
                                f"it has: {', '.join(self.artifacts) or '(none)'}")
        return self.directory / self.artifacts[name]["file"]

    def select(self, *, format: str | None = None, precision: str | None = None, runtime: str | None = None,
               kind: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """Artifacts matching every given field (``kind``: ``tile`` or ``dynamic``)."""
        for name, rec in self.artifacts.items():
            if format and rec["format"] != format or precision and rec["precision"] != precision:
                continue
            if runtime and rec["runtime"] != runtime or kind and rec["shape"]["kind"] != kind:
                continue
            yield name, rec


def file_record(path: Path) -> dict[str, Any]:
    """``{"file", "sha256", "bytes"}`` of a written artifact (file name relative to its directory)."""
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_manifest(directory: str | Path, data: dict[str, Any]) -> Path:
    """Writes ``DIR/manifest.json`` atomically (call it last)."""
    path = Path(directory) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def load_manifest(directory: str | Path) -> Manifest:
    """Reads and sanity-checks ``DIR/manifest.json`` (no hashing; see :func:`verify`)."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest; export into {directory} first (python cli.py export CHECKPOINT "
                            f"--out {directory})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: unreadable manifest ({e}); re-run the export") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a NAFNet-Deblurring export manifest")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {data.get('schema_version')!r}, this version reads "
                            f"{SCHEMA_VERSION}; re-run the export")
    if not isinstance(data.get("artifacts"), dict):
        raise ManifestError(f"{path}: no artifacts table")
    if not isinstance(data.get("files", {}), dict):
        raise ManifestError(f"{path}: the files table is not a table; re-run the export")
    for name, rec in [*data["artifacts"].items(), *data.get("files", {}).items()]:
        file = rec.get("file") if isinstance(rec, dict) else None
        # A bare file name inside the directory: a manifest must not point at files elsewhere.
        if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
            raise ManifestError(f"{path}: artifact {name!r} names {file!r}, not a file in {directory}; "
                                "refusing a manifest that points outside its directory")
        if not isinstance(rec.get("sha256"), str) or not isinstance(rec.get("bytes"), int):
            raise ManifestError(f"{path}: artifact {name!r} has no sha256/bytes; re-run the export")
    return Manifest(data, directory)


def verify(directory: str | Path) -> Manifest:
    """Loads the manifest and checks size and sha256 of every artifact; raises naming the first bad file."""
    manifest = load_manifest(directory)
    for name in manifest.artifacts:
        verify_artifact(manifest, name)
    for name, rec in manifest.data.get("files", {}).items():
        _check_file(manifest, name, rec, manifest.directory / rec["file"])
    return manifest


def verify_artifact(manifest: Manifest, name: str) -> Path:
    """Checks size and sha256 of one artifact (what a runner calls before loading it); returns its path."""
    path = manifest.path(name)
    return _check_file(manifest, name, manifest.artifacts[name], path)


def verify_companions(manifest: Manifest, name: str) -> None:
    """Checks the ``files`` entries an artifact needs beside it (an OpenVINO IR's ``.bin``)."""
    files = manifest.data.get("files", {})
    for key in manifest.artifacts[name].get("companions", []):
        if key not in files:
            raise ManifestError(f"{manifest.directory / MANIFEST_NAME}: artifact {name!r} needs {key!r}, which the "
                                "files table does not list; re-run the export")
        _check_file(manifest, key, files[key], manifest.directory / files[key]["file"])


def _check_file(manifest: Manifest, name: str, rec: dict[str, Any], path: Path) -> Path:
    if not path.is_file():
        raise ManifestError(f"{path}: missing (artifact {name!r} of {manifest.directory / MANIFEST_NAME}); "
                            "re-run the export")
    if path.stat().st_size != rec["bytes"] or sha256_file(path) != rec["sha256"]:
        raise ManifestError(f"{path}: modified since export (size or sha256 differs from {MANIFEST_NAME}); "
                            "refusing to load it. Re-run the export, or pass --no-verify if you changed it "
                            "on purpose")
    return path


def verify_file(path: str | Path) -> tuple[Manifest, str] | None:
    """For a lone ``.onnx`` / engine file: checks it against the manifest of its folder.

    Returns (manifest, artifact name), or None when the folder has no manifest or the manifest does not
    list the file (nothing to check against). Raises :class:`ManifestError` if the file was modified.
    """
    path = Path(path)
    if not (path.parent / MANIFEST_NAME).is_file():
        return None
    manifest = load_manifest(path.parent)
    name = next((n for n, rec in manifest.artifacts.items() if rec["file"] == path.name), None)
    if name is None:
        return None
    verify_artifact(manifest, name)
    verify_companions(manifest, name)
    return manifest, name


def engine_mismatch(record: dict[str, Any], env: dict[str, str]) -> str | None:
    """Why an engine built as ``record`` (its manifest ``tensorrt`` record) cannot run in ``env``, or None.

    ``env`` holds ``version`` (TensorRT), ``gpu`` (device name) and ``compute_capability`` ("8.9") of the
    machine about to load it. TensorRT engines are tied to the TensorRT version and the GPU they were
    built on; loading one elsewhere fails or, worse, runs slowly. Pure Python, so it is tested without a GPU.
    """
    reasons = []
    for key, what in (("version", "TensorRT"), ("compute_capability", "compute capability"), ("gpu", "GPU")):
        built, here = str(record.get(key, "?")), str(env.get(key, "?"))
        if built != here:
            reasons.append(f"{what} {built} at build time, {here} here")
    if not reasons:
        return None
    return ("engine built for another setup (" + "; ".join(reasons) + "); rebuild it on this machine with "
            "`python cli.py export CHECKPOINT --trt`, or pass --no-verify to try it anyway")


def onnx_metadata(data: dict[str, Any], artifact: dict[str, Any]) -> dict[str, str]:
    """The ``metadata_props`` written into one ONNX artifact (string values; JSON for structures)."""
    return {
        "nafnet.project_version": data["project_version"],
        "nafnet.preset": data["model"]["preset"] or "",
        "nafnet.config": json.dumps(data["model"]["config"], sort_keys=True),
        "nafnet.train_size": str(data["tlc"]["train_size"]),
        "nafnet.tlc": json.dumps(data["tlc"]),
        "nafnet.folded": str(data["folded"]).lower(),
        "nafnet.precision": artifact["precision"],
        "nafnet.shape": json.dumps(artifact["shape"]),
        "nafnet.opset": str((artifact.get("int8") or {}).get("opset") or data["opset"]),
        "nafnet.source_sha256": data["source"]["sha256"] or "",
        "nafnet.io": json.dumps(data["io"]),
        # convs an FP16 graph computes in FP32 (around an FP32 residual stream, export.fp16_stream)
        "nafnet.fp32_convs": json.dumps(data.get("fp16", {}).get("fp32_convs", []) if _fp16_parts(artifact)
                                        else []),
        # INT8 graphs: the form, the convs kept in float and what the float parts compute in (export.int8)
        **({"nafnet.int8_form": artifact["int8"]["form"],
            "nafnet.int8_float_convs": json.dumps([c["conv"] for c in artifact["int8"]["float_convs"]]),
            "nafnet.int8_float_parts": artifact["int8"].get("float_parts", "fp32")}
           if artifact["precision"] == "int8" else {}),
    }


def _fp16_parts(artifact: dict[str, Any]) -> bool:
    """The artifact computes its float parts as the FP16 graph does (onnx-fp16, the TensorRT INT8 form)."""
    return artifact["precision"] == "fp16" or (artifact.get("int8") or {}).get("float_parts") == "fp16-fp32-islands"
