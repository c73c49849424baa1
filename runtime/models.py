"""From what the user names (checkpoint, official .pth, .onnx, engine, export directory) to a Runner.

One table of backends keyed by name drives ``--backend`` choices, ``auto`` selection and parity rows.
"""

from __future__ import annotations

import json

from dataclasses import dataclass, field
from pathlib import Path

from nafnet_core import convert_to_tlc, load_checkpoint
from nafnet_core.errors import UserError

from .runners import OnnxRuntimeRunner, Runner, RunnerError, TensorRTRunner, TorchRunner

#: ``--backend`` choices; ``auto`` picks the fastest one that can run here (trt > onnxrt > torch).
BACKENDS = ("auto", "torch", "onnxrt", "trt")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class Artifact:
    """One runnable thing of an export: which backend runs it, at what precision, with what shape.

    Attributes:
        backend: ``torch``, ``onnxrt`` or ``trt``.
        precision: ``fp32`` or ``fp16``.
        path: the file.
        fixed_shape: (H, W) of a fixed-tile graph/engine, None when dynamic.
        key: its name in the manifest (``onnx-fp16-512x512``), or ``source`` for the checkpoint.
    """

    backend: str
    precision: str
    path: Path
    fixed_shape: tuple[int, int] | None = None
    key: str = ""
    built_for: dict | None = field(default=None, compare=False)  # engines: the manifest's tensorrt record

    @property
    def mode(self) -> str:
        return "whole" if self.fixed_shape is None else f"tile{self.fixed_shape[0]}x{self.fixed_shape[1]}"


@dataclass
class ExportInfo:
    """What the runtime needs from an export directory's manifest.

    Attributes:
        directory: the export directory.
        artifacts: the ONNX graphs and engines it holds.
        checkpoint: the source checkpoint, when it still exists unchanged (the PyTorch reference), else None.
        checkpoint_note: why there is no checkpoint, when there is none.
        preset / tlc / train_size: how the graphs were made (the reference must match).
    """

    directory: Path
    artifacts: list[Artifact]
    checkpoint: Path | None
    checkpoint_note: str
    preset: str | None
    tlc: bool
    train_size: int
    config: dict | None = None


_RUNTIMES = {"onnxruntime": "onnxrt", "tensorrt": "trt"}


def read_export(export_dir: str | Path, verify_files: bool = False) -> ExportInfo:
    """Reads ``DIR/manifest.json`` (export package format); ``verify_files`` also checks every sha256."""
    import export

    export_dir = Path(export_dir)
    manifest = export.verify(export_dir) if verify_files else export.load_manifest(export_dir)
    data = manifest.data
    artifacts = []
    for key, rec in manifest.artifacts.items():
        backend = _RUNTIMES.get(rec.get("runtime"))
        if backend is None:
            continue
        shape = rec.get("shape", {})
        fixed = (int(shape["height"]), int(shape["width"])) if shape.get("kind") == "tile" else None
        artifacts.append(Artifact(backend, rec["precision"], export_dir / rec["file"], fixed, key,
                                  rec.get("tensorrt") if backend == "trt" else None))
    source = data.get("source") or {}
    checkpoint, note = None, "the export was made from an in-memory model"
    if source.get("checkpoint"):
        for cand in (Path(source["checkpoint"]), export_dir / Path(source["checkpoint"]).name):
            if cand.is_file():
                from nafnet_core.fileio import sha256_file

                if source.get("sha256") and sha256_file(cand) != source["sha256"]:
                    note = f"{cand} changed since the export (sha256 differs)"
                    continue
                checkpoint = cand
                break
        else:
            note = note if "changed" in note else f"source checkpoint {source['checkpoint']} not found"
    tlc = data.get("tlc") or {}
    return ExportInfo(export_dir, artifacts, checkpoint, "" if checkpoint else note,
                      (data.get("model") or {}).get("preset"), bool(tlc.get("enabled", True)),
                      int(tlc.get("train_size") or 256), (data.get("model") or {}).get("config"))


def export_artifacts(export_dir: Path) -> list[Artifact]:
    """The runnable files of an export directory, from its manifest."""
    return read_export(export_dir).artifacts


def tensorrt_ready() -> tuple[bool, str]:
    from .trt import tensorrt_available

    return tensorrt_available()


def _pick(artifacts: list[Artifact], backend: str, precision: str | None, prefer_tile: bool | None) -> Artifact | None:
    """The artifact to run: the asked precision (else fp32 for ONNX), and the dynamic graph unless
    ``prefer_tile`` (a 1280x720 frame then runs whole: no tile overlap to recompute, BENCHMARKS.md;
    larger images are tiled by the runtime either way)."""
    cands = [a for a in artifacts if a.backend == backend and (precision is None or a.precision == precision)]
    want_tile = bool(prefer_tile)
    cands.sort(key=lambda a: ((a.precision != "fp32") if precision is None and backend != "trt" else False,
                              (a.fixed_shape is not None) != want_tile))
    return cands[0] if cands else None


def open_runner(model: str | Path, backend: str = "auto", precision: str | None = None, *, preset: str | None = None,
                tlc: bool = True, train_size: int | None = None, device: str = "auto", threads: int | None = None,
                tiled_graph: bool | None = None, verify: bool = True) -> Runner:
    """A (not yet activated) Runner for ``model``.

    Args:
        model: a checkpoint (project, official .pth with ``preset``, safetensors), an ``.onnx``, an engine,
            or an export directory.
        backend: one of BACKENDS.
        precision: ``fp32`` / ``fp16`` / ``bf16``; default fp32 (fp16 for TensorRT).
        preset: architecture of an official .pth.
        tlc: apply TLC to checkpoints (exported graphs carry their own setting).
        train_size: TLC training size (default: stored in the checkpoint).
        device: ``auto``, ``cpu`` or ``cuda`` for torch and onnxruntime.
        threads: onnxruntime intra-op threads.
        tiled_graph: for export directories, prefer the fixed-tile (True) or dynamic (False) ONNX graph.
        verify: check an ONNX graph or engine against its manifest's sha256 before use, and an engine
            against this machine's TensorRT version and GPU (False = ``--no-verify``). A lone file whose
            folder has no manifest listing it has nothing to be checked against and is used as it is.
    """
    path = Path(model)
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not path.exists():
        raise UserError(f"{path}: no such model file or export directory")
    suffix = path.suffix.lower()
    if path.is_dir():
        return _from_export_dir(path, backend, precision, device, threads, tiled_graph, tlc, train_size, verify)
    if suffix == ".onnx":
        _require(backend, ("auto", "onnxrt"), path)
        if verify:
            from export.manifest import verify_file

            verify_file(path)
        runner = OnnxRuntimeRunner(path, precision or "fp32", device=device, threads=threads)
        from export.onnx_export import read_metadata

        runner.whole_image_input = whole_image_input(read_metadata(path).get("nafnet.config"))
        return runner
    if suffix in ENGINE_SUFFIXES:
        _require(backend, ("auto", "trt"), path)
        from export.manifest import verify_file

        found = verify_file(path) if verify else None
        built_for = found[0].artifacts[found[1]].get("tensorrt") if found else None
        return TensorRTRunner(path, precision or "fp16", built_for=built_for, verify=verify)
    _require(backend, ("auto", "torch"), path)
    return torch_runner(path, precision or "fp32", preset=preset, tlc=tlc, train_size=train_size, device=device)


def torch_runner(checkpoint: str | Path, precision: str = "fp32", *, preset: str | None = None, tlc: bool = True,
                 train_size: int | None = None, device: str = "auto") -> TorchRunner:
    ckpt = load_checkpoint(checkpoint, preset=preset)
    model = convert_to_tlc(ckpt.model, train_size or ckpt.train_size) if tlc else ckpt.model
    label = f"torch-{precision}" + ("" if tlc else "-notlc")
    return TorchRunner(model, precision, device=device, name=label)


def whole_image_input(config: dict | str | None) -> bool:
    """True for a model config (dict or its JSON) whose input FFT spans the whole input (``input_fft='fs'``)."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            return False
    return isinstance(config, dict) and config.get("input_fft") == "fs"


def _require(backend: str, allowed: tuple[str, ...], path: Path) -> None:
    if backend not in allowed:
        what = {"torch": "a checkpoint", "onnxrt": "an .onnx file", "trt": "a TensorRT engine"}
        raise UserError(f"{path}: --backend {backend} needs {what[backend]} or an export directory; "
                        f"export it first with `python cli.py export`")


def _from_export_dir(path: Path, backend: str, precision: str | None, device: str, threads: int | None,
                     tiled_graph: bool | None, tlc: bool, train_size: int | None, verify: bool = True) -> Runner:
    info = read_export(path)
    runner = _runner_of_export(info, path, backend, precision, device, threads, tiled_graph, verify)
    runner.whole_image_input = runner.whole_image_input or whole_image_input(info.config)
    return runner


def _runner_of_export(info: ExportInfo, path: Path, backend: str, precision: str | None, device: str,
                      threads: int | None, tiled_graph: bool | None, verify: bool) -> Runner:

    def checked(art: Artifact) -> Path:
        if verify:  # only the file about to be loaded is hashed
            from export.manifest import load_manifest, verify_artifact

            verify_artifact(load_manifest(path), art.key)
        return art.path
    order = [backend] if backend != "auto" else ["trt", "onnxrt", "torch"]
    reasons = []
    for name in order:
        if name == "trt":
            ready, why = tensorrt_ready()
            art = _pick(info.artifacts, "trt", precision, None)
            if art is not None and ready:
                return TensorRTRunner(checked(art), art.precision, art.fixed_shape, name=f"trt-{art.precision}-{art.mode}",
                                      built_for=art.built_for, verify=verify)
            reasons.append(f"trt: {why if art is not None else 'no engine in the export'}")
        elif name == "onnxrt":
            art = _pick(info.artifacts, "onnxrt", precision, tiled_graph)
            if art is not None:
                return OnnxRuntimeRunner(checked(art), art.precision, device=device, threads=threads,
                                         name=f"onnxrt-{art.precision}-{art.mode}")
            reasons.append("onnxrt: no matching ONNX graph in the export")
        else:
            if info.checkpoint is not None:
                return torch_runner(info.checkpoint, precision or "fp32", preset=info.preset, tlc=info.tlc,
                                    train_size=info.train_size, device=device)
            reasons.append(f"torch: {info.checkpoint_note}")
    raise RunnerError(f"{path}: nothing in this export runs with --backend {backend}"
                      f"{'' if precision is None else ' --precision ' + precision}: " + "; ".join(reasons))
