"""From what the user names (checkpoint, official .pth, .onnx, engine, export directory) to a Runner.

One table of backends keyed by name drives ``--backend`` choices, ``auto`` selection and parity rows.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """One runnable file of an export: which backend runs it, at what precision, with what shape.

    Attributes:
        backend: ``torch``, ``onnxrt`` or ``trt``.
        precision: ``fp32`` or ``fp16``.
        path: the file.
        fixed_shape: (H, W) of a fixed-tile graph/engine, None when dynamic.
    """

    backend: str
    precision: str
    path: Path
    fixed_shape: tuple[int, int] | None = None

    @property
    def mode(self) -> str:
        return "whole" if self.fixed_shape is None else f"tile{self.fixed_shape[0]}"


def export_artifacts(export_dir: Path) -> list[Artifact]:
    """The runnable files of an export directory, from its manifest."""
    from export import load_manifest  # the export package owns the manifest format

    manifest = load_manifest(export_dir)
    return [Artifact(a["backend"], a["precision"], export_dir / a["file"],
                     tuple(a["tile"]) if a.get("tile") else None) for a in manifest.artifacts]


def tensorrt_ready() -> tuple[bool, str]:
    from .trt import tensorrt_available

    return tensorrt_available()


def _pick(artifacts: list[Artifact], backend: str, precision: str | None, prefer_tile: bool | None) -> Artifact | None:
    cands = [a for a in artifacts if a.backend == backend and (precision is None or a.precision == precision)]
    if prefer_tile is not None:
        cands.sort(key=lambda a: (a.fixed_shape is None) == prefer_tile)
    cands.sort(key=lambda a: a.precision != "fp32" if precision is None and backend != "trt" else False)
    return cands[0] if cands else None


def open_runner(model: str | Path, backend: str = "auto", precision: str | None = None, *, preset: str | None = None,
                tlc: bool = True, train_size: int | None = None, device: str = "auto", threads: int | None = None,
                tiled_graph: bool | None = None) -> Runner:
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
    """
    path = Path(model)
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not path.exists():
        raise UserError(f"{path}: no such model file or export directory")
    suffix = path.suffix.lower()
    if path.is_dir():
        return _from_export_dir(path, backend, precision, device, threads, tiled_graph, tlc, train_size)
    if suffix == ".onnx":
        _require(backend, ("auto", "onnxrt"), path)
        return OnnxRuntimeRunner(path, precision or "fp32", device=device, threads=threads)
    if suffix in ENGINE_SUFFIXES:
        _require(backend, ("auto", "trt"), path)
        return TensorRTRunner(path, precision or "fp16")
    _require(backend, ("auto", "torch"), path)
    return torch_runner(path, precision or "fp32", preset=preset, tlc=tlc, train_size=train_size, device=device)


def torch_runner(checkpoint: str | Path, precision: str = "fp32", *, preset: str | None = None, tlc: bool = True,
                 train_size: int | None = None, device: str = "auto") -> TorchRunner:
    ckpt = load_checkpoint(checkpoint, preset=preset)
    model = convert_to_tlc(ckpt.model, train_size or ckpt.train_size) if tlc else ckpt.model
    label = f"torch-{precision}" + ("" if tlc else "-notlc")
    return TorchRunner(model, precision, device=device, name=label)


def _require(backend: str, allowed: tuple[str, ...], path: Path) -> None:
    if backend not in allowed:
        what = {"torch": "a checkpoint", "onnxrt": "an .onnx file", "trt": "a TensorRT engine"}
        raise UserError(f"{path}: --backend {backend} needs {what[backend]} or an export directory; "
                        f"export it first with `python cli.py export`")


def _from_export_dir(path: Path, backend: str, precision: str | None, device: str, threads: int | None,
                     tiled_graph: bool | None, tlc: bool, train_size: int | None) -> Runner:
    artifacts = export_artifacts(path)
    order = [backend] if backend != "auto" else ["trt", "onnxrt", "torch"]
    reasons = []
    for name in order:
        if name == "trt":
            ready, why = tensorrt_ready()
            art = _pick(artifacts, "trt", precision, None)
            if art is not None and ready:
                return TensorRTRunner(art.path, art.precision, art.fixed_shape)
            reasons.append(f"trt: {why if art is not None else 'no engine in the export'}")
        elif name == "onnxrt":
            art = _pick(artifacts, "onnxrt", precision, tiled_graph)
            if art is not None:
                return OnnxRuntimeRunner(art.path, art.precision, device=device, threads=threads,
                                         name=f"onnxrt-{art.precision}-{art.mode}")
            reasons.append("onnxrt: no matching ONNX graph in the export")
        else:
            art = _pick(artifacts, "torch", None, None)
            if art is not None:
                return torch_runner(art.path, precision or "fp32", tlc=tlc, train_size=train_size, device=device)
            reasons.append("torch: no checkpoint in the export")
    raise RunnerError(f"{path}: nothing in this export runs with --backend {backend}"
                      f"{'' if precision is None else ' --precision ' + precision}: " + "; ".join(reasons))


