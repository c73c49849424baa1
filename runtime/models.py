"""From what the user names (checkpoint, official .pth, .onnx, engine, export directory) to a Runner.

One table of backends keyed by name drives ``--backend`` choices, ``auto`` selection and parity rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from nafnet_core import convert_to_tlc, load_checkpoint
from nafnet_core.config import pad_multiple_of
from nafnet_core.errors import UserError

from .runners import PRECISIONS, OnnxRuntimeRunner, OpenVINORunner, Runner, RunnerError, TensorRTRunner, TorchRunner

#: ``--backend`` choices. ``auto`` picks by measurement where the export holds one from this machine
#: (:func:`auto_order`: ``bench`` records its rows, ``parity`` its verdicts), else by name (NAME_ORDER).
BACKENDS = ("auto", "torch", "onnxrt", "openvino", "trt")
#: ``auto`` without a measurement: TensorRT, then onnxruntime, then PyTorch. OpenVINO is not in it: on this
#: project's 2-core AVX2 machine it was not faster than onnxruntime (BENCHMARKS.md); a bench record can pick it.
NAME_ORDER = ("trt", "onnxrt", "torch")
#: Files inside an export directory that ``bench`` and ``parity`` write for ``auto`` (and ``compare``).
BENCH_RECORD = "bench.json"
PARITY_RECORD = "parity.json"
#: Precisions OpenVINO computes an FP32 graph in (bf16: a compile-time hint with FP32 islands, export/openvino_ir.py).
OPENVINO_PRECISIONS = ("fp32", "bf16")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class Artifact:
    """One runnable thing of an export: which backend runs it, at what precision, with what shape.

    Attributes:
        backend: ``torch``, ``onnxrt``, ``openvino`` or ``trt``.
        precision: ``fp32`` or ``fp16`` (what the file holds; OpenVINO may run an fp32 file in bf16).
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


_RUNTIMES = {"onnxruntime": "onnxrt", "tensorrt": "trt", "openvino": "openvino"}


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


def openvino_artifact(artifacts: list[Artifact], precision: str | None, prefer_tile: bool | None) -> Artifact | None:
    """What OpenVINO runs at ``precision`` (fp32 or bf16, both from FP32 weights): the export's IR if there is one
    (it carries the BF16 FP32-island marks), else the fp32 ONNX graph; dynamic unless ``prefer_tile``."""
    if precision not in (None, *OPENVINO_PRECISIONS):
        return None
    cands = [a for a in artifacts if a.backend in ("openvino", "onnxrt") and a.precision == "fp32"]
    cands.sort(key=lambda a: ((a.fixed_shape is not None) != bool(prefer_tile), a.backend != "openvino"))
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
    if suffix == ".onnx" or suffix == ".xml":
        _require(backend, ("auto", "onnxrt", "openvino") if suffix == ".onnx" else ("auto", "openvino"), path)
        if verify:
            from export.manifest import verify_file

            verify_file(path)
        if suffix == ".xml" or backend == "openvino":
            runner = OpenVINORunner(path, precision or "fp32", threads=threads)
        else:
            runner = OnnxRuntimeRunner(path, precision or "fp32", device=device, threads=threads)
        if suffix == ".onnx":
            from export.onnx_export import read_metadata

            describe_model(runner, read_metadata(path).get("nafnet.config"))
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


def _config_dict(config: dict | str | None) -> dict | None:
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            return None
    return config if isinstance(config, dict) else None


def whole_image_input(config: dict | str | None) -> bool:
    """True for a model config (dict or its JSON) whose input FFT spans the whole input (``input_fft='fs'``)."""
    config = _config_dict(config)
    return config is not None and config.get("input_fft") == "fs"


def describe_model(runner: Runner, config: dict | str | None) -> Runner:
    """Tells ``runner`` what the exported model's config (manifest or ONNX metadata; dict or JSON) says about
    its input: whether it spans the whole input, and the padding multiple every image is padded to."""
    config = _config_dict(config)
    runner.whole_image_input = runner.whole_image_input or whole_image_input(config)
    if config is not None:
        runner.pad_multiple = pad_multiple_of(config)
    return runner


def _require(backend: str, allowed: tuple[str, ...], path: Path) -> None:
    if backend not in allowed:
        what = {"torch": "a checkpoint", "onnxrt": "an .onnx file", "trt": "a TensorRT engine",
                "openvino": "an .onnx file or OpenVINO IR (.xml)", "auto": "a model file"}
        raise UserError(f"{path}: --backend {backend} needs {what[backend]} or an export directory; "
                        f"export it first with `python cli.py export`")


def _from_export_dir(path: Path, backend: str, precision: str | None, device: str, threads: int | None,
                     tiled_graph: bool | None, tlc: bool, train_size: int | None, verify: bool = True) -> Runner:
    info = read_export(path)
    runner = _runner_of_export(info, path, backend, precision, device, threads, tiled_graph, verify)
    return describe_model(runner, info.config)


def machine_id() -> dict:
    """What a speed measurement depends on: the CPU model, its core count and the CUDA GPU (if any)."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from .runners import cuda_device_count

    gpu = None
    if cuda_device_count():
        import torch

        gpu = torch.cuda.get_device_name(0)
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu}


def auto_order(export_dir: str | Path, precision: str | None = None) -> tuple[list[tuple[str, str | None]], str]:
    """The order ``--backend auto`` tries an export's backends in, and why: ([(backend, precision)], note).

    By measurement where the export holds ``bench.json`` (written by ``bench``) from this machine
    (:func:`machine_id`): its rows at the benchmark size, fastest median first, only those with status ok
    and of ``precision`` when one is given; backend x precision pairs that ``parity.json`` (written by
    ``parity``) records as failed are left out. Backends the record does not time follow in NAME_ORDER.
    Without a usable record: NAME_ORDER, and the note says why.
    """
    by_name: list[tuple[str, str | None]] = [(b, precision) for b in NAME_ORDER]
    directory = Path(export_dir)
    try:
        bench = json.loads((directory / BENCH_RECORD).read_text())
    except FileNotFoundError:
        return by_name, f"by name ({' > '.join(NAME_ORDER)}): no {BENCH_RECORD} in the export (`bench` writes it)"
    except (OSError, ValueError) as e:
        return by_name, f"by name: {directory / BENCH_RECORD} is unreadable ({type(e).__name__})"
    if bench.get("machine") != machine_id():
        return by_name, f"by name: {BENCH_RECORD} was measured on another machine ({bench.get('machine')})"
    failed = set()
    try:
        parity = json.loads((directory / PARITY_RECORD).read_text())
        failed = {(r["backend"], r["precision"]) for r in parity.get("rows", []) if r.get("pass") is False}
    except (OSError, ValueError, KeyError, TypeError):
        parity = None
    rows = [r for r in bench.get("rows", []) if isinstance(r, dict) and r.get("median_ms")
            and str(r.get("status", "")).startswith("ok") and r.get("size") == bench.get("size")
            and r.get("backend") in BACKENDS and (precision is None or r.get("precision") == precision)]
    order: list[tuple[str, str | None]] = []
    for r in sorted(rows, key=lambda r: r["median_ms"]):
        pair = (r["backend"], r["precision"])
        if pair not in failed and pair not in order:
            order.append(pair)
    measured = {b for b, _ in order}
    order += [(b, p) for b, p in by_name if b not in measured and (b, p or PRECISIONS[b][0]) not in failed]
    note = (f"by measurement: {BENCH_RECORD} at {bench.get('size')} on this machine"
            + (f", without the pairs {PARITY_RECORD} failed" if failed else "")
            + ("" if parity is not None else f" (no {PARITY_RECORD}: parity not checked)"))
    return order, note


def _runner_of_export(info: ExportInfo, path: Path, backend: str, precision: str | None, device: str,
                      threads: int | None, tiled_graph: bool | None, verify: bool) -> Runner:
    def checked(art: Artifact) -> Path:
        if verify:  # only the file about to be loaded is hashed (an IR: its .xml and its .bin)
            from export.manifest import load_manifest, verify_artifact, verify_companions

            manifest = load_manifest(path)
            verify_artifact(manifest, art.key)
            verify_companions(manifest, art.key)
        return art.path
    order, note = ([(backend, precision)], "") if backend != "auto" else auto_order(path, precision)
    reasons = []
    for name, prec in order:
        runner = _try_backend(info, path, name, prec, device, threads, tiled_graph, verify, checked, reasons)
        if runner is not None:
            runner.auto_note = note
            return runner
    raise RunnerError(f"{path}: nothing in this export runs with --backend {backend}"
                      f"{'' if precision is None else ' --precision ' + precision}: " + "; ".join(reasons))


def _try_backend(info: ExportInfo, path: Path, name: str, precision: str | None, device: str, threads: int | None,
                 tiled_graph: bool | None, verify: bool, checked, reasons: list[str]) -> Runner | None:
    """The runner of backend ``name`` for this export, or None with the reason appended to ``reasons``."""
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
    elif name == "openvino":
        from export.openvino_ir import openvino_available

        ok, why = openvino_available()
        art = openvino_artifact(info.artifacts, precision, tiled_graph)
        if art is not None and ok:
            return OpenVINORunner(checked(art), precision or "fp32", threads=threads,
                                  name=f"openvino-{precision or 'fp32'}-{art.mode}")
        if precision not in (None, *OPENVINO_PRECISIONS):
            why = f"it runs {' or '.join(OPENVINO_PRECISIONS)}, not {precision}"
        elif art is None:
            why = "no fp32 ONNX graph or IR in the export"
        reasons.append(f"openvino: {why}")
    else:
        if info.checkpoint is not None:
            return torch_runner(info.checkpoint, precision or "fp32", preset=info.preset, tlc=info.tlc,
                                train_size=info.train_size, device=device)
        reasons.append(f"torch: {info.checkpoint_note}")
    return None
