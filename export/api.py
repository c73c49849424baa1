"""``export_model``: checkpoint (or model) -> ONNX fp32/fp16 (dynamic and/or fixed tiles) [-> TensorRT] + manifest."""

from __future__ import annotations

import datetime as _dt
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import onnx
import torch

from nafnet_core import __version__
from nafnet_core.adarevd import refuse_adarevd
from nafnet_core.checkpoint import load_checkpoint
from nafnet_core.config import DEFAULT_BASE_RATIO, DEFAULT_TRAIN_SIZE, find_preset, padded_size
from nafnet_core.errors import UserError
from nafnet_core.fileio import atomic_write_text, make_dirs, sha256_file
from nafnet_core.metrics import psnr
from nafnet_core.model import NAFNet, count_parameters
from nafnet_core.tlc import convert_to_tlc, is_tlc, tlc_kernels

from . import ranges
from .fold import fold_for_deploy
from .formats import FORMATS, Format, formats_for
from .int8 import Int8BudgetError, Int8Options
from .manifest import FORMAT as MANIFEST_FORMAT
from .manifest import MANIFEST_NAME, SCHEMA_VERSION, Manifest, file_record, onnx_metadata, write_manifest
from .onnx_export import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, save_onnx, set_metadata, to_onnx_proto, with_precision
from .samples import sample_photo
from .shapes import DEFAULT_TILE, ShapeSpec, make_profile
from .trt_plan import COMMANDS_NAME, TrtOptions, build_commands, tensorrt_settings


def prepare_model(model: NAFNet, *, tlc: bool = True, fold: bool = True, train_size: int = DEFAULT_TRAIN_SIZE,
                  base_ratio: float = DEFAULT_BASE_RATIO) -> NAFNet:
    """The deploy model: a TLC (optional), then folded (optional) copy in eval mode; ``model`` is untouched."""
    if is_tlc(model):
        raise ValueError("pass the model without TLC; export applies TLC itself (tlc=True)")
    out = convert_to_tlc(model, train_size=train_size, base_ratio=base_ratio) if tlc else model
    out = fold_for_deploy(out) if fold else out
    return out.eval()


def _shape_specs(tiles: Iterable[tuple[int, int]] | tuple[int, int] | None, dynamic: bool, batch: int,
                 multiple: int) -> list[ShapeSpec]:
    tiles = [] if tiles is None else list(tiles)
    if len(tiles) == 2 and all(isinstance(v, int) for v in tiles):  # one (h, w) pair
        tiles = [tuple(tiles)]
    for h, w in tiles:  # the runtime pads every image to the model's multiple before a graph sees it
        if h % multiple or w % multiple:
            raise UserError(f"--tile {h}x{w}: tile sides must be multiples of {multiple}: every image is padded "
                            f"to {multiple} before a graph sees it, so a {h}x{w} graph could run no image and no "
                            f"tile; use e.g. --tile {padded_size(h, multiple)}x{padded_size(w, multiple)}")
    specs = ([ShapeSpec.dynamic()] if dynamic else []) + [ShapeSpec.tile(h, w, batch) for h, w in tiles]
    if not specs:
        raise UserError("nothing to export: ask for --dynamic and/or at least one --tile")
    return list(dict.fromkeys(specs))


def check_onnx(path: Path, reference: NAFNet, spec: ShapeSpec) -> dict[str, Any]:
    """Runs the ONNX file in onnxruntime (CPU) on a photo and compares with the FP32 PyTorch ``reference``."""
    from .int8 import cpu_session

    m = reference.config.pad_multiple
    shape = (1, 3, 3 * m + 1, 4 * m + 3) if spec.is_dynamic else (spec.batch, 3, spec.height, spec.width)
    x = sample_photo(shape[2], shape[3], batch=shape[0])
    with torch.no_grad():
        ref = reference(x)
    sess = cpu_session(path)
    out = torch.from_numpy(sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
    diff = (out - ref).abs().max().item()
    return {"input_shape": list(shape), "reference": "torch-fp32", "runtime": "onnxruntime-cpu",
            "max_abs_diff": float(f"{diff:.3g}"),
            "psnr_db": round(float(psnr(out.clamp(0, 1), ref.clamp(0, 1), data_range=1.0).min()), 2)}


def _resolve_source(source: str | Path | NAFNet, preset: str | None, train_size: int | None):
    if isinstance(source, NAFNet):
        config = source.config
        return source, {"checkpoint": None, "sha256": None, "kind": "module"}, find_preset(config), \
            train_size or getattr(source, "train_size", DEFAULT_TRAIN_SIZE)
    ckpt = load_checkpoint(source, preset=preset)
    refuse_adarevd(ckpt.config, "export")
    return ckpt.model, {"checkpoint": str(source), "sha256": sha256_file(source), "kind": ckpt.source}, \
        ckpt.preset, train_size or ckpt.train_size


def export_model(source: str | Path | NAFNet, out_dir: str | Path, *, preset: str | None = None,
                 tiles: Iterable[tuple[int, int]] | tuple[int, int] | None = (DEFAULT_TILE,), dynamic: bool = True,
                 batch: int = 1, fp16: bool = False, trt: bool = False, tlc: bool = True, fold: bool = True,
                 opset: int = DEFAULT_OPSET, train_size: int | None = None, base_ratio: float = DEFAULT_BASE_RATIO,
                 trt_options: TrtOptions | None = None, check: bool = True, progress: bool = False,
                 openvino: bool = False, int8: bool = False, int8_options: Int8Options | None = None) -> Manifest:
    """Exports a NAFNet into ``out_dir``; returns the manifest (written last, atomically).

    Besides the graphs it writes ``TENSORRT.md``: the trtexec/Polygraphy commands that build the same
    engines by hand (:func:`export.trt_plan.build_commands`), hashed in the manifest's ``files``.

    Args:
        source: a checkpoint path (project, official ``{'params': ...}`` .pth or safetensors) or a NAFNet.
        out_dir: directory for the artifacts and ``manifest.json``.
        preset: architecture of an official .pth (project checkpoints carry their config).
        tiles: fixed (height, width) tiles to export (static graphs, TLC windows as constants).
        dynamic: also export a graph with dynamic batch/height/width.
        batch: batch of the fixed-tile graphs.
        fp16: also write the mixed-precision FP16 ONNX for every shape; stages whose residual stream would
            overflow FP16 on sample photos keep it in FP32 there (:mod:`export.fp16_stream`, manifest ``fp16``).
        trt: also build a TensorRT FP16 engine per shape from the FP16 ONNX (implies ``fp16``).
        tlc: TLC local pooling (kernels from ``train_size``) instead of global pooling.
        fold: the deploy form of every block (``export.fold``: folding, split gates, TLC attention on the
            window grid); the same arithmetic to FP32 rounding.
        opset: ONNX opset.
        train_size: training crop size for the TLC kernels (default: from the checkpoint, else 256).
        base_ratio: TLC window / training feature size.
        trt_options: TensorRT builder settings.
        check: run each ONNX in onnxruntime on a photo and record max |diff| and PSNR vs PyTorch FP32.
        progress: show a progress bar on stderr.
        openvino: also convert every fp32 ONNX graph to an OpenVINO IR with its BF16 FP32 islands marked
            (``model-fp32-<shape>.xml`` + ``.bin``, both hashed in the manifest; needs the openvino extra).
        int8: also write the INT8 Q/DQ graph of every shape (and its cpu form where faster; with ``trt``, its
            engine): convs quantized, the worst returned to float until the val |ΔPSNR| is within the budget
            (:mod:`export.int8`, manifest ``int8``). Raises :class:`export.int8.Int8BudgetError` after writing
            everything else when a shape's INT8 graph cannot meet the budget.
        int8_options: calibration method, budget, data set, crops (:class:`export.int8.Int8Options`).
    """
    from tqdm import tqdm

    trt_options = trt_options or TrtOptions()
    model, source_rec, preset_name, train_size = _resolve_source(source, preset, train_size)
    specs = _shape_specs(tiles, dynamic, batch, model.config.pad_multiple)
    formats = formats_for(fp16, trt, openvino, int8)
    int8_options = int8_options or Int8Options()
    if openvino:
        from .openvino_ir import import_openvino

        import_openvino()  # missing extra: one line before anything is written
    out_dir = make_dirs(out_dir)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # an interrupted export must leave no valid manifest
    for stale in out_dir.glob(".*.part"):  # temporary files of an export that was killed mid-write
        stale.unlink(missing_ok=True)

    deploy = prepare_model(model, tlc=tlc, fold=fold, train_size=train_size, base_ratio=base_ratio)
    data: dict[str, Any] = {
        "format": MANIFEST_FORMAT, "schema_version": SCHEMA_VERSION, "project_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {"preset": preset_name, "config": model.config.to_dict(), "parameters": count_parameters(model),
                  "head": model.head},  # the output the graphs compute (multi-head models: the deployment head)
        "source": source_rec,
        "tlc": {"enabled": tlc, "train_size": train_size, "base_ratio": base_ratio,
                "kernels": [list(k) for k in tlc_kernels(model.config, train_size, base_ratio)] if tlc else None},
        "folded": fold, "opset": opset,
        "io": {"input": INPUT_NAME, "output": OUTPUT_NAME, "layout": "NCHW", "dtype": "float32",
               "value_range": [0.0, 1.0], "pad_multiple": model.config.pad_multiple},
        "artifacts": {},
        "tensorrt_settings": tensorrt_settings(trt_options, model.config.img_channel),
    }
    onnx_formats = [f for f in formats if f.suffix == ".onnx" and f.built_from is None]
    if any(f.precision == "fp16" for f in onnx_formats):
        data["fp16"] = ranges.plan(deploy)  # a stream that would overflow FP16 stays FP32 there
    fp32_stream = data.get("fp16", {}).get("fp32_stream")
    steps = len(onnx_formats) * len(specs) * (2 if check else 1)
    with tqdm(total=steps, desc="export", unit="step", file=sys.stderr, disable=not progress) as bar:
        for fmt in onnx_formats:
            graph_model = with_precision(deploy, fmt.precision, fp32_stream)
            for spec in specs:
                bar.set_postfix_str(fmt.artifact_name(spec))
                rec = {"format": fmt.name, "precision": fmt.precision, "runtime": fmt.runtime,
                       "shape": spec.to_dict()}
                start = time.perf_counter()
                proto = to_onnx_proto(graph_model, spec, opset=opset)
                set_metadata(proto, onnx_metadata(data, rec))
                path = save_onnx(proto, out_dir / fmt.file_name(spec))
                del proto
                rec = {**file_record(path), **rec, "export_seconds": round(time.perf_counter() - start, 1)}
                bar.update()
                if check:
                    rec["check"] = check_onnx(path, deploy, spec)
                    bar.update()
                data["artifacts"][fmt.artifact_name(spec)] = rec
    int8_error = _write_int8(data, out_dir, specs, deploy, int8_options, check, progress) if int8 else None
    commands = atomic_write_text(out_dir / COMMANDS_NAME, build_commands(data))
    data["files"] = {"tensorrt-commands": file_record(commands)}
    if openvino:
        _write_openvino(data, out_dir, specs, progress)
    write_manifest(out_dir, data)

    if trt:
        _build_engines(data, out_dir, specs, trt_options, progress)
        write_manifest(out_dir, data)
    if int8_error is not None:
        raise int8_error
    return Manifest(data, out_dir)


def _write_int8(data: dict[str, Any], out_dir: Path, specs: list[ShapeSpec], deploy: NAFNet, options: Int8Options,
                check: bool, progress: bool) -> Int8BudgetError | None:
    """The INT8 graphs of every shape (:mod:`export.int8`); returns the budget error of the shapes that have none."""
    from . import int8 as q

    log = q.progress_log(progress)
    root = q.data_root(options, progress)
    data["int8"] = {"budget_db": options.budget_db, "calibration": options.calibration,
                    "percentile": q.PERCENTILE if options.calibration == "percentile" else None,
                    "data": str(options.data) if options.data is not None else "embedded synthetic set",
                    "calibration_split": "train", "calibration_crops": options.crops, "budget_split": "val",
                    "activations": "int8, symmetric, per tensor, zero point 0",
                    "weights": "int8, symmetric, per output channel (axis 0), zero point 0", "bias": "float",
                    "quantized_ops": ["Conv"], "float_parts": dict(q.FLOAT_PARTS), "cpu_form": options.cpu_form,
                    "graphs": {}}
    graphs = data["int8"]["graphs"]
    errors = []
    with q.work_dir(out_dir) as tmp:
        for spec in specs:
            src = FORMATS["onnx-fp32"].artifact_name(spec)
            shape = None if spec.is_dynamic else (spec.height, spec.width)
            work = Path(tmp) / spec.tag
            work.mkdir()
            fp32_path = out_dir / data["artifacts"][src]["file"]
            fp16_src = FORMATS["onnx-fp16"].artifact_name(spec)  # the TensorRT form's float parts
            fp16_path = out_dir / data["artifacts"][fp16_src]["file"]
            for fmt_name, form in (("onnx-int8", "qdq"), ("onnx-int8-cpu", "cpu")):
                fmt = FORMATS[fmt_name]
                name = fmt.artifact_name(spec)
                if form == "cpu" and options.cpu_form == "never":
                    continue
                log(f"INT8 {name}: calibrating ({options.calibration}, {options.crops} train crops at "
                    f"{'whole images' if shape is None else spec.tag}) ...")
                start = time.perf_counter()
                graph_path = work / fmt.file_name(spec)
                try:
                    result = q.quantize_graph(fp32_path, graph_path, deploy, shape, options, form, root, work, log,
                                              fp16_path=fp16_path if form == "qdq" else None)
                except q.Int8BudgetError as e:
                    graphs[name] = {"form": form, "written": False, "why": str(e)}
                    log(f"INT8 {name}: {e}")
                    if form == "qdq":  # no cpu form either
                        errors.append(str(e))
                        break
                    continue
                record = result.record(options.budget_db)
                if form == "cpu" and options.cpu_form == "auto":
                    why = _cpu_form_slower(record, fp32_path, graph_path, q.val_inputs(root, shape, 1)[0][0])
                    if why:
                        graphs[name] = {**record, "written": False, "why": why}
                        log(f"INT8 {name}: not written, {why}")
                        continue
                rec = {"format": fmt.name, "precision": fmt.precision, "runtime": fmt.runtime,
                       "shape": spec.to_dict(), "built_from": fp16_src if form == "qdq" else src,
                       "calibrated_on": src, "int8": record}
                proto = onnx.load(str(graph_path))
                set_metadata(proto, onnx_metadata(data, rec))
                path = save_onnx(proto, out_dir / fmt.file_name(spec))
                del proto
                rec = {**file_record(path), **rec, "export_seconds": round(time.perf_counter() - start, 1)}
                if check:
                    rec["check"] = check_onnx(path, deploy, spec)
                data["artifacts"][name] = rec
                graphs[name] = {"written": True, "form": form, "quantized_convs": record["quantized_convs"],
                                "float_convs": len(record["float_convs"]),
                                "val_delta_psnr_db": record["val_delta_psnr_db"]}
                log(f"INT8 {name}: {record['quantized_convs']} convs INT8, {len(record['float_convs'])} float, "
                    f"val ΔPSNR {record['val_delta_psnr_db']:+.4f} dB")
    return q.Int8BudgetError("; ".join(errors)) if errors else None


def _cpu_form_slower(record: dict[str, Any], fp32_path: Path, cpu_path: Path, x) -> str:
    """Why the cpu form is not written (measured not faster than the fp32 graph in onnxruntime here), or ""."""
    from .int8 import onnx_latency_ms

    ms = {"fp32": onnx_latency_ms(fp32_path, x), "int8-cpu": onnx_latency_ms(cpu_path, x)}
    record["latency_ms_here"] = {k: round(v, 1) for k, v in ms.items()}
    if ms["int8-cpu"] < ms["fp32"]:
        return ""
    return (f"not faster than fp32 in onnxruntime here ({ms['int8-cpu']:.1f} vs {ms['fp32']:.1f} ms at "
            f"{'x'.join(map(str, x.shape[-2:]))}); --int8-cpu-form always writes it")


def _write_openvino(data: dict[str, Any], out_dir: Path, specs: list[ShapeSpec], progress: bool) -> None:
    """One OpenVINO IR per fp32 ONNX graph; the ``.xml`` is the artifact, its ``.bin`` a ``files`` companion."""
    import openvino as ov

    from .openvino_ir import write_ir

    fmt: Format = FORMATS["openvino-fp32"]
    source_fmt = FORMATS[fmt.built_from]
    for spec in specs:
        onnx_name = source_fmt.artifact_name(spec)
        if progress:
            print(f"converting {onnx_name} to OpenVINO IR ...", file=sys.stderr)
        start = time.perf_counter()
        xml, bin_path, islands = write_ir(out_dir / data["artifacts"][onnx_name]["file"], out_dir / fmt.file_name(spec))
        weights = f"{fmt.artifact_name(spec)}-weights"
        data["files"][weights] = file_record(bin_path)
        data["artifacts"][fmt.artifact_name(spec)] = {
            **file_record(xml), "format": fmt.name, "precision": fmt.precision, "runtime": fmt.runtime,
            "shape": spec.to_dict(), "built_from": onnx_name, "companions": [weights],
            "openvino": {"version": ov.get_version(), "fp32_islands": islands,
                         "convert_seconds": round(time.perf_counter() - start, 1)}}


def _build_engines(data: dict[str, Any], out_dir: Path, specs: list[ShapeSpec], options: TrtOptions,
                   progress: bool) -> None:
    from . import tensorrt_build  # lazy: imports tensorrt

    tensorrt_build.import_tensorrt(out_dir)  # fail fast, after the ONNX artifacts exist
    for engine_fmt in (FORMATS["trt-fp16"], FORMATS["trt-int8"]):  # INT8: from the Q/DQ graph, where there is one
        source_fmt = FORMATS[engine_fmt.built_from]
        for spec in specs:
            onnx_name = source_fmt.artifact_name(spec)
            if onnx_name not in data["artifacts"]:
                continue
            profile = make_profile(spec, options.profile_hw, options.max_batch)
            if progress:
                print(f"building TensorRT engine {engine_fmt.artifact_name(spec)} ...", file=sys.stderr)
            engine_path = out_dir / engine_fmt.file_name(spec)
            trt_rec = tensorrt_build.build_engine(out_dir / data["artifacts"][onnx_name]["file"], engine_path,
                                                  profile, INPUT_NAME, options, out_dir)
            data["artifacts"][engine_fmt.artifact_name(spec)] = {
                **file_record(engine_path), "format": engine_fmt.name, "precision": engine_fmt.precision,
                "runtime": engine_fmt.runtime, "shape": spec.to_dict(), "built_from": onnx_name, "tensorrt": trt_rec}


__all__ = ["export_model", "prepare_model", "check_onnx"]
