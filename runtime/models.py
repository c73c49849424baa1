"""From what the user names (checkpoint, official .pth, .onnx, engine, export directory) to a Runner.

The backends themselves are records in :mod:`runtime.backends`; this module reads an export's manifest, orders
the backends for ``--backend auto`` and opens the runner the records describe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from nafnet_core.config import pad_multiple_of
from nafnet_core.errors import UserError

from .backends import AUTO_ORDER, BACKEND_CHOICES, BACKENDS, Artifact, OpenOptions, file_backend, lone_artifact
from .runners import Runner, RunnerError, TorchRunner

#: Files inside an export directory that ``bench`` and ``parity`` write for ``auto`` (and ``compare``).
BENCH_RECORD = "bench.json"
PARITY_RECORD = "parity.json"


@dataclass
class ExportInfo:
    """What the runtime needs from an export directory's manifest.

    Attributes:
        directory: the export directory.
        artifacts: the ONNX graphs and engines it holds.
        checkpoint: the source checkpoint, when it still exists unchanged (the PyTorch reference), else None.
        checkpoint_note: why there is no checkpoint, when there is none.
        preset / tlc / train_size: how the graphs were made (the reference must match).
        int8_budget: the |ΔPSNR| budget (dB) the export's INT8 graphs were made for (manifest ``int8``), their
            parity limit; None without INT8 graphs.
    """

    directory: Path
    artifacts: list[Artifact]
    checkpoint: Path | None
    checkpoint_note: str
    preset: str | None
    tlc: bool
    train_size: int
    config: dict | None = None
    int8_budget: float | None = None


#: The manifest's ``runtime`` of an artifact -> the backend that runs it.
_RUNTIMES = {b.runtime: b.name for b in BACKENDS.values() if b.runtime}


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
                      int(tlc.get("train_size") or 256), (data.get("model") or {}).get("config"),
                      (data.get("int8") or {}).get("budget_db"))


def open_runner(model: str | Path, backend: str = "auto", precision: str | None = None, *, preset: str | None = None,
                tlc: bool = True, train_size: int | None = None, device: str = "auto", threads: int | None = None,
                tiled_graph: bool | None = None, verify: bool = True, reuse_memory: bool = False) -> Runner:
    """A (not yet activated) Runner for ``model``.

    Args:
        model: a checkpoint (project, official .pth with ``preset``, safetensors), an ``.onnx``, an engine,
            or an export directory.
        backend: one of BACKEND_CHOICES.
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
        reuse_memory: PyTorch on CPU keeps freed memory in the process (process-wide: off for library use;
            the command line turns it on, see ``TorchRunner``).
    """
    path = Path(model)
    if backend not in BACKEND_CHOICES:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    if not path.exists():
        raise UserError(f"{path}: no such model file or export directory")
    options = OpenOptions(device=device, threads=threads, verify=verify, reuse_memory=reuse_memory, preset=preset,
                          tlc=tlc, train_size=train_size)
    if path.is_dir():
        info = read_export(path)
        # an export's checkpoint is described by its manifest, not by the caller's preset/tlc/train_size
        export_options = replace(options, preset=info.preset, tlc=info.tlc, train_size=info.train_size)
        runner = _runner_of_export(info, path, backend, precision, tiled_graph, export_options)
        return describe_model(runner, info.config)
    rec = file_backend(path, backend)
    art = lone_artifact(path, rec, precision)
    if rec.name != "torch":
        from export.manifest import verify_file

        found = verify_file(path) if verify else None
        if rec.name == "trt" and found:
            art = Artifact(art.backend, art.precision, path, built_for=found[0].artifacts[found[1]].get("tensorrt"))
    runner = rec.open(art, precision, options)
    if path.suffix.lower() == ".onnx":
        from export.onnx_export import read_metadata

        describe_model(runner, read_metadata(path).get("nafnet.config"))
    return runner


def torch_runner(checkpoint: str | Path, precision: str = "fp32", *, preset: str | None = None, tlc: bool = True,
                 train_size: int | None = None, device: str = "auto", reuse_memory: bool = False) -> TorchRunner:
    """The PyTorch runner of a checkpoint (the parity reference, bench's baseline)."""
    options = OpenOptions(device=device, preset=preset, tlc=tlc, train_size=train_size, reuse_memory=reuse_memory)
    return BACKENDS["torch"].open(Artifact("torch", precision, Path(checkpoint), key="source"), precision, options)


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
    ``parity``) records as failed are left out, and INT8 pairs are kept only where it records them passed.
    Backends the record does not time follow in AUTO_ORDER.
    Without a usable record: AUTO_ORDER, and the note says why.
    """
    by_name: list[tuple[str, str | None]] = [(b, precision) for b in AUTO_ORDER]
    directory = Path(export_dir)
    try:
        bench = json.loads((directory / BENCH_RECORD).read_text())
    except FileNotFoundError:
        return by_name, f"by name ({' > '.join(AUTO_ORDER)}): no {BENCH_RECORD} in the export (`bench` writes it)"
    except (OSError, ValueError) as e:
        return by_name, f"by name: {directory / BENCH_RECORD} is unreadable ({type(e).__name__})"
    if bench.get("machine") != machine_id():
        return by_name, f"by name: {BENCH_RECORD} was measured on another machine ({bench.get('machine')})"
    failed, passed = set(), set()
    try:
        parity = json.loads((directory / PARITY_RECORD).read_text())
        failed = {(r["backend"], r["precision"]) for r in parity.get("rows", []) if r.get("pass") is False}
        passed = {(r["backend"], r["precision"]) for r in parity.get("rows", []) if r.get("pass") is True}
    except (OSError, ValueError, KeyError, TypeError):
        parity = None
    rows = [r for r in bench.get("rows", []) if isinstance(r, dict) and r.get("median_ms")
            and str(r.get("status", "")).startswith("ok") and r.get("size") == bench.get("size")
            and r.get("backend") in BACKENDS and (precision is None or r.get("precision") == precision)]
    order: list[tuple[str, str | None]] = []
    for r in sorted(rows, key=lambda r: r["median_ms"]):
        pair = (r["backend"], r["precision"])
        if pair[1] == "int8" and pair not in passed - failed:  # INT8 only where parity passed it
            continue
        if pair not in failed and pair not in order:
            order.append(pair)
    measured = {b for b, _ in order}
    order += [(b, p) for b, p in by_name if b not in measured and (b, p or BACKENDS[b].default_precision) not in failed]
    note = (f"by measurement: {BENCH_RECORD} at {bench.get('size')} on this machine"
            + (f", without the pairs {PARITY_RECORD} failed" if failed else "")
            + ("" if parity is not None else f" (no {PARITY_RECORD}: parity not checked)"))
    return order, note


def _runner_of_export(info: ExportInfo, path: Path, backend: str, precision: str | None, tiled_graph: bool | None,
                      options: OpenOptions) -> Runner:
    order, note = ([(backend, precision)], "") if backend != "auto" else auto_order(path, precision)
    reasons = []
    for name, prec in order:
        rec = BACKENDS[name]
        art, missing = rec.pick(info.artifacts, (info.checkpoint, info.checkpoint_note), prec, tiled_graph)
        # auto skips what cannot run at that precision here; a named backend fails on activate with the reason
        ok, why = rec.probe(prec if backend == "auto" else None)
        if art is None or not ok:
            reasons.append(f"{name}: {missing or why}")
            continue
        if options.verify and art.key and art.key != "source":  # only the file about to be loaded is hashed
            from export.manifest import load_manifest, verify_artifact, verify_companions

            manifest = load_manifest(path)
            verify_artifact(manifest, art.key)
            verify_companions(manifest, art.key)
        runner = rec.open(art, prec, options)
        runner.auto_note = note
        return runner
    raise RunnerError(f"{path}: nothing in this export runs with --backend {backend}"
                      f"{'' if precision is None else ' --precision ' + precision}: " + "; ".join(reasons))
