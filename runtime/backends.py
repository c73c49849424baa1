"""One record per backend: what it runs, which files it opens, whether it runs here, how to open it.

``open_runner`` (lone files, export directories, ``--backend auto``), ``parity`` and ``bench`` read these
records and nothing else, so a backend is added here once:

    name       the ``--backend`` value (``torch``, ``onnxrt``, ``openvino``, ``trt``)
    runtime    the manifest's ``runtime`` of the artifacts it runs
    runner     its Runner class; ``runner.precisions`` are what it computes in
    suffixes   the lone files it opens (``.onnx``, an engine, a checkpoint...)
    auto_rank  its place in ``auto``'s order where no measurement decides (None: by measurement or name only)
    probe      (runs here at this precision, why not: the install hint)
    pick       the artifact of an export it runs, or why there is none
    build      the Runner for an artifact
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nafnet_core.errors import UserError

from .runners import OnnxRuntimeRunner, OpenVINORunner, Runner, TensorRTRunner, TorchRunner


@dataclass(frozen=True)
class Artifact:
    """One runnable thing of an export (or a lone file): which backend runs it, at what precision, what shape.

    Attributes:
        backend: a :data:`BACKENDS` name.
        precision: what the file holds (``fp32``/``fp16``; a checkpoint: the precision asked for).
        path: the file.
        fixed_shape: (H, W) of a fixed-tile graph/engine, None when dynamic.
        key: its name in the manifest (``onnx-fp16-512x512``), ``source`` for the checkpoint, "" for a lone file.
        built_for: engines: the manifest's ``tensorrt`` record (what it was built with).
    """

    backend: str
    precision: str
    path: Path
    fixed_shape: tuple[int, int] | None = None
    key: str = ""
    built_for: dict | None = field(default=None, compare=False)

    @property
    def mode(self) -> str:
        return "whole" if self.fixed_shape is None else f"tile{self.fixed_shape[0]}x{self.fixed_shape[1]}"


@dataclass(frozen=True)
class OpenOptions:
    """How runners are opened: the settings every backend reads its share of.

    Attributes:
        device: ``auto``, ``cpu`` or ``cuda`` (torch, onnxruntime).
        threads: onnxruntime / OpenVINO intra-op threads (default: the runner's).
        verify: engines: check the TensorRT version and GPU they were built for.
        reuse_memory: torch on CPU: keep freed memory in the process (process-wide; the command line turns it on,
            see ``TorchRunner``).
        preset / tlc / train_size: how a checkpoint becomes the model (official .pth architecture, TLC).
        opt_level: onnxruntime graph optimisation level.
    """

    device: str = "auto"
    threads: int | None = None
    verify: bool = True
    reuse_memory: bool = False
    preset: str | None = None
    tlc: bool = True
    train_size: int | None = None
    opt_level: str = "all"


@dataclass(frozen=True)
class Backend:
    name: str
    runtime: str | None  # the manifest's ``runtime`` of the artifacts it runs (None: the checkpoint)
    runner: type[Runner]
    suffixes: tuple[str, ...]
    opens: str  # what it opens, for messages
    auto_rank: int | None
    probe: Callable[[str | None], tuple[bool, str]]
    pick: Callable[..., tuple[Artifact | None, str]]  # (artifacts, checkpoint, precision, prefer_tile)
    build: Callable[[Artifact, str, OpenOptions, str], Runner]  # (artifact, precision, options, name)
    targets: Callable[[list[Artifact]], list[tuple[str, Artifact]]] | None = None  # parity/bench rows

    def rows(self, artifacts: list[Artifact]) -> list[tuple[str, Artifact]]:
        """(precision, artifact) of every row ``parity`` checks for this backend in an export: each of its
        files at the file's precision, unless the record says otherwise."""
        if self.targets is not None:
            return self.targets(artifacts)
        arts = sorted((a for a in artifacts if a.backend == self.name),
                      key=lambda a: (a.precision, a.fixed_shape is not None))
        return [(a.precision, a) for a in arts]

    @property
    def precisions(self) -> tuple[str, ...]:
        return self.runner.precisions

    @property
    def default_precision(self) -> str:
        return self.runner.precisions[0]

    def open(self, art: Artifact, precision: str | None = None, options: OpenOptions = OpenOptions(),
             name: str | None = None) -> Runner:
        """The (not yet activated) Runner of ``art`` at ``precision`` (default: the artifact's, else the
        backend's first)."""
        precision = precision or (art.precision if art.precision in self.precisions else self.default_precision)
        return self.build(art, precision, options, name or f"{self.name}-{precision}"
                          + ("" if not art.key or art.key == "source" else f"-{art.mode}"))


# ------------------------------------------------------------------------------------------------ the records


def _always(precision: str | None) -> tuple[bool, str]:
    return True, ""


def _openvino_probe(precision: str | None) -> tuple[bool, str]:
    from export.openvino_ir import bf16_support, openvino_available

    ok, why = openvino_available()
    return bf16_support() if ok and precision == "bf16" else (ok, why)


def _tensorrt_probe(precision: str | None) -> tuple[bool, str]:
    from .trt import tensorrt_available

    ok, why = tensorrt_available()
    return ok, ("" if ok else why)


def _pick_checkpoint(artifacts, checkpoint: tuple[Path | None, str], precision, prefer_tile):
    path, note = checkpoint
    return (Artifact("torch", precision or "fp32", path, key="source"), "") if path is not None else (None, note)


def is_int8_cpu_form(art: Artifact) -> bool:
    """An INT8 graph in onnxruntime's CPU form (``export --int8``: an output Q after each INT8 conv)."""
    return art.key.startswith("onnx-int8-cpu-")


def _pick_file(backend: str, missing: str):
    def pick(artifacts, checkpoint, precision, prefer_tile) -> tuple[Artifact | None, str]:
        """The asked precision (else fp32 first, except engines; INT8 only when asked for: ``auto`` asks for it only
        where ``parity`` passed it), the dynamic graph unless ``prefer_tile`` (a 1280x720 frame then runs whole: no
        tile overlap to recompute; larger images are tiled either way); of two INT8 graphs onnxruntime takes its CPU
        form."""
        cands = [a for a in artifacts if a.backend == backend
                 and (a.precision == precision if precision is not None else a.precision != "int8")]
        cands.sort(key=lambda a: ((a.precision != "fp32") if precision is None and backend != "trt" else False,
                                  (a.fixed_shape is not None) != bool(prefer_tile), not is_int8_cpu_form(a)))
        return (cands[0], "") if cands else (None, missing)

    return pick


def _onnxrt_rows(artifacts: list[Artifact]) -> list[tuple[str, Artifact]]:
    """Each ONNX graph at its precision, except that an INT8 shape with both forms is one row: the CPU form (what
    onnxruntime runs; the other form is TensorRT's, checked through its engine)."""
    arts = sorted((a for a in artifacts if a.backend == "onnxrt"),
                  key=lambda a: (a.precision, a.fixed_shape is not None))
    cpu_shapes = {a.fixed_shape for a in arts if is_int8_cpu_form(a)}
    return [(a.precision, a) for a in arts
            if not (a.precision == "int8" and not is_int8_cpu_form(a) and a.fixed_shape in cpu_shapes)]


def _pick_openvino(artifacts, checkpoint, precision, prefer_tile) -> tuple[Artifact | None, str]:
    """OpenVINO runs fp32 and bf16 from FP32 weights: the export's IR if there is one (it carries the BF16 FP32-island
    marks), else the fp32 ONNX graph; dynamic unless ``prefer_tile``."""
    if precision not in (None, *OpenVINORunner.precisions):
        return None, f"it runs {' or '.join(OpenVINORunner.precisions)}, not {precision}"
    cands = [a for a in artifacts if a.backend in ("openvino", "onnxrt") and a.precision == "fp32"]
    cands.sort(key=lambda a: ((a.fixed_shape is not None) != bool(prefer_tile), a.backend != "openvino"))
    return (cands[0], "") if cands else (None, "no fp32 ONNX graph or IR in the export")


def _openvino_rows(artifacts: list[Artifact]) -> list[tuple[str, Artifact]]:
    """fp32 and bf16, whole (the dynamic graph) and tiled (a fixed tile), from the IR or the fp32 ONNX graph."""
    rows = []
    for precision in OpenVINORunner.precisions:
        for prefer_tile in (False, True):
            art, _ = _pick_openvino(artifacts, None, precision, prefer_tile)
            if art is not None and (art.fixed_shape is not None) == prefer_tile:
                rows.append((precision, art))
    return rows


def _build_torch(art: Artifact, precision: str, o: OpenOptions, name: str) -> Runner:
    from nafnet_core import convert_to_tlc, load_checkpoint
    from nafnet_core.adarevd import refuse_adarevd

    ckpt = load_checkpoint(art.path, preset=o.preset)
    refuse_adarevd(ckpt.config, "the tiling runtime")
    model = convert_to_tlc(ckpt.model, o.train_size or ckpt.train_size) if o.tlc else ckpt.model
    return TorchRunner(model, precision, device=o.device, name=name + ("" if o.tlc else "-notlc"),
                       reuse_memory=o.reuse_memory)


def _build_onnxrt(art: Artifact, precision: str, o: OpenOptions, name: str) -> Runner:
    return OnnxRuntimeRunner(art.path, precision, device=o.device, threads=o.threads, opt_level=o.opt_level, name=name)


def _build_openvino(art: Artifact, precision: str, o: OpenOptions, name: str) -> Runner:
    return OpenVINORunner(art.path, precision, threads=o.threads, name=name)


def _build_tensorrt(art: Artifact, precision: str, o: OpenOptions, name: str) -> Runner:
    return TensorRTRunner(art.path, precision, art.fixed_shape, name=name, built_for=art.built_for, verify=o.verify)


ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors", ".ckpt")

#: Every backend, in the order tables list them.
BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("torch", None, TorchRunner, CHECKPOINT_SUFFIXES, "a checkpoint", 3, _always, _pick_checkpoint,
            _build_torch),
    Backend("onnxrt", "onnxruntime", OnnxRuntimeRunner, (".onnx",), "an .onnx file", 2, _always,
            _pick_file("onnxrt", "no matching ONNX graph in the export"), _build_onnxrt, _onnxrt_rows),
    # Not in auto's unmeasured order: on a 2-core AVX2 machine it was not faster than onnxruntime (BENCHMARKS.md,
    # "OpenVINO and BF16"); a bench record picks it where it is.
    Backend("openvino", "openvino", OpenVINORunner, (".onnx", ".xml"), "an .onnx file or OpenVINO IR (.xml)", None,
            _openvino_probe, _pick_openvino, _build_openvino, _openvino_rows),
    Backend("trt", "tensorrt", TensorRTRunner, ENGINE_SUFFIXES, "a TensorRT engine", 1, _tensorrt_probe,
            _pick_file("trt", "no engine in the export"), _build_tensorrt),
)}
#: ``--backend`` choices.
BACKEND_CHOICES = ("auto", *BACKENDS)
#: ``auto`` without a measurement: TensorRT, then onnxruntime, then PyTorch.
AUTO_ORDER = tuple(sorted((b.name for b in BACKENDS.values() if b.auto_rank is not None),
                          key=lambda n: BACKENDS[n].auto_rank))


def backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}") from None


def file_backend(path: Path, name: str) -> Backend:
    """The backend that opens the lone file ``path`` under ``--backend name`` (``auto``: the first whose suffixes
    match, torch for anything else); a clear error where the asked backend cannot open it."""
    suffix = path.suffix.lower()
    if name == "auto":
        return next((b for b in BACKENDS.values() if suffix in b.suffixes and b.name != "torch"), BACKENDS["torch"])
    rec = backend(name)
    other = any(suffix in b.suffixes for b in BACKENDS.values() if b.name != "torch")
    if (suffix in rec.suffixes) if rec.name != "torch" else not other:
        return rec
    raise UserError(f"{path}: --backend {name} needs {rec.opens} or an export directory; "
                    "export it first with `python cli.py export`")


def lone_artifact(path: Path, rec: Backend, precision: str | None) -> Artifact:
    """A lone file as an artifact of ``rec`` (its precision: the one asked for, else the backend's first)."""
    return Artifact(rec.name, precision or rec.default_precision, path)


