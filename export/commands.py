"""CLI of the export package: ``export CHECKPOINT ...`` and ``export lint DIR_OR_ONNX``."""

from __future__ import annotations

from pathlib import Path

import click

from nafnet_core.cli_common import SIZE, Group, preset_option, train_size_option
from nafnet_core.errors import UserError

from .formats import FORMATS
from .int8 import CALIBRATION_METHODS, CPU_FORM_CHOICES, DEFAULT_BUDGET_DB, DEFAULT_CALIBRATION, DEFAULT_CROPS
from .onnx_export import DEFAULT_OPSET
from .shapes import DEFAULT_PROFILE, DEFAULT_TILE


class ExportGroup(Group):
    """``export`` is both a command and a group: a first argument that is not a subcommand is a checkpoint,
    so ``export CKPT --trt`` runs ``export model CKPT --trt`` while ``export lint DIR`` runs ``lint``."""

    default_command = "model"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@click.group(cls=ExportGroup)
def export() -> None:
    """Export a checkpoint to ONNX (fp32/fp16, dynamic and fixed tiles) and TensorRT; lint the result.

    \b
    python cli.py export CHECKPOINT [OPTIONS]    same as `export model CHECKPOINT`
    python cli.py export lint DIR_OR_ONNX        TensorRT readiness without a GPU
    python cli.py export triton DIR --out REPO   model repository for Triton Inference Server

    \b
    Examples:
      python cli.py export runs/demo/best.pt --fp16
      python cli.py export NAFNet-GoPro-width32.pth --preset nafnet-gopro-width32 --trt
      python cli.py export best.pt --tile 720x1280 --out exported/frame
      python cli.py export lint exported/best --checkpoint runs/demo/best.pt
    """


def _profile(ctx, param, value):
    if value is None:
        return DEFAULT_PROFILE
    from .shapes import ShapeError, parse_profile

    try:
        return parse_profile(value)
    except ShapeError as e:
        raise click.BadParameter(str(e)) from None


@export.command("model")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@preset_option
@train_size_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory. Default: exported/<checkpoint name>.")
@click.option("--tile", "tiles", type=SIZE, multiple=True,
              help="Fixed tile HxW, sides multiples of 16 (repeatable); TLC windows become constants. "
                   f"Default without --dynamic: {DEFAULT_TILE[0]}x{DEFAULT_TILE[1]} plus the dynamic graph.")
@click.option("--dynamic", is_flag=True, help="Export the dynamic batch/height/width graph (default when no --tile).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batch of the fixed-tile graphs.")
@click.option("--fp16", is_flag=True, help=f"Also write onnx-fp16: {FORMATS['onnx-fp16'].description}.")
@click.option("--int8", is_flag=True,
              help=f"Also write onnx-int8: {FORMATS['onnx-int8'].description}; and onnx-int8-cpu where faster (see "
                   "--int8-cpu-form). Calibrated on train crops at each graph's shape, checked on the val split.")
@click.option("--int8-budget", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_BUDGET_DB,
              show_default=True, help="Largest val-split |ΔPSNR| (dB) vs PyTorch fp32; the convs with the worst "
                                      "SQNR go back to float until it holds (no INT8 file if it never does).")
@click.option("--int8-calibration", type=click.Choice(list(CALIBRATION_METHODS)), default=DEFAULT_CALIBRATION,
              show_default=True, help="How activation ranges are taken from the calibration crops.")
@click.option("--int8-crops", type=click.IntRange(min=1), default=DEFAULT_CROPS, show_default=True,
              help="Train crops to calibrate on.")
@click.option("--int8-cpu-form", type=click.Choice(CPU_FORM_CHOICES), default="auto", show_default=True,
              help="onnx-int8-cpu (an output Q after each INT8 conv: onnxruntime's QLinearConv): auto = only where "
                   "measured faster than fp32 in onnxruntime here.")
@click.option("--data", "data_root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Data set for --int8 (train split: calibration, val split: the budget). Default: the embedded "
                   "synthetic set.")
@click.option("--trt", is_flag=True,
              help=f"Also build trt-fp16 (needs TensorRT and a GPU): {FORMATS['trt-fp16'].description}.")
@click.option("--openvino", is_flag=True,
              help="Also write openvino-fp32 (pip install -e \".[openvino]\"): "
                   f"{FORMATS['openvino-fp32'].description}.")
@click.option("--tlc/--no-tlc", default=True, show_default=True, help="TLC local pooling (kernels from --train-size).")
@click.option("--fold/--no-fold", default=True, show_default=True,
              help="Deploy form: fold LayerNorm affine and beta/gamma into convs, split gates, TLC attention on the "
                   "window grid (same arithmetic, ~1.3x faster in onnxruntime).")
@click.option("--opset", type=click.IntRange(17, 23), default=DEFAULT_OPSET, show_default=True, help="ONNX opset.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Run every ONNX in onnxruntime on a photo and record max |diff| vs PyTorch in the manifest.")
@click.option("--workspace", type=click.FloatRange(min=0.1), default=4.0, show_default=True,
              help="TensorRT builder workspace (GiB).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimisation level.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TensorRT timing cache (reused and updated). Default: ~/.cache/nafnet-deblurring/tensorrt/.")
@click.option("--profile", "profile_hw", callback=_profile, default=None, metavar="MIN:OPT:MAX",
              help="TensorRT profile of the dynamic graph, e.g. 64x64:720x1280:1088x1920 (the default).")
@click.option("--triton", "triton_repo", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="REPO", help="Also write a Triton Inference Server model repository (see `export triton`).")
def model_cmd(checkpoint: Path, preset, train_size, out_dir, tiles, dynamic, batch, fp16, int8, int8_budget,
              int8_calibration, int8_crops, int8_cpu_form, data_root, trt, openvino, tlc, fold, opset, check,
              workspace, opt_level, timing_cache, profile_hw, triton_repo) -> None:
    """Export CHECKPOINT to ONNX fp32 (and fp16 / TensorRT) with TLC, writing DIR/manifest.json last.

    DIR/TENSORRT.md holds the trtexec and Polygraphy commands that build the same engines by hand,
    filled in for the export's files, profile, workspace and optimisation level. For example:

    \b
    TensorRT 10.x (strongly typed only when asked; never --fp16, the graph holds the precisions):
      trtexec --onnx=model-fp16-512x512.onnx --saveEngine=model-fp16-512x512.engine --stronglyTyped
        --noTF32 --memPoolSize=workspace:4096M --builderOptimizationLevel=3 --timingCacheFile=timing.cache
        --skipInference
      trtexec --onnx=model-fp16-dynamic.onnx ... (same flags) --minShapes=input:1x3x64x64
        --optShapes=input:1x3x720x1280 --maxShapes=input:1x3x1088x1920 --skipInference
    TensorRT 11.x: the same without --stronglyTyped (always strongly typed; --fp16 no longer exists).
    Compare with FP32 (polygraphy run, --strongly-typed on 10.x only):
      polygraphy run model-fp32-512x512.onnx --onnxrt --save-inputs in.json --save-outputs ref.json
      polygraphy run model-fp16-512x512.onnx --trt --strongly-typed --load-inputs in.json
        --load-outputs ref.json --check-error-stat max --atol 0.02 --rtol 0

    \b
    Examples:
      python cli.py export runs/demo/best.pt
      python cli.py export NAFNet-GoPro-width32.pth --preset nafnet-gopro-width32 --fp16
      python cli.py export best.pt --tile 512x512 --tile 720x1280 --trt --opt-level 5
      python cli.py export best.pt --dynamic --openvino
      python cli.py export best.pt --tile 256x256 --int8 --int8-budget 0.1
      python cli.py export runs/revd/best.pt --tile 720x1280   # AdaRevD: encoder + one graph per sub-decoder

    An AdaRevD checkpoint exports graph E (encoder and per-tile exit logits) and one graph per sub-decoder
    step for images of the first --tile size (default 720x1280), fp32 (and FP16 with --fp16; --trt builds an
    engine from each FP16 graph), which `infer -m DIR` runs with the exits chosen per tile and `parity DIR`
    checks (docs/variants.md).
    """
    from .api import export_model
    from .int8 import Int8Options
    from .trt_plan import TrtOptions

    options = TrtOptions(workspace_gib=workspace, opt_level=opt_level, timing_cache=timing_cache, profile_hw=profile_hw)
    unsupported = [flag for flag, on in (("--int8", int8), ("--openvino", openvino), ("--dynamic", dynamic),
                                         ("--triton-repo", triton_repo is not None)) if on]
    if _export_adarevd(checkpoint, preset, out_dir, tiles, fp16, opset, train_size, trt and options, unsupported):
        return
    if not tiles and not dynamic:
        tiles, dynamic = (DEFAULT_TILE,), True
    out_dir = out_dir or Path("exported") / checkpoint.stem
    manifest = export_model(checkpoint, out_dir, preset=preset, tiles=list(tiles), dynamic=dynamic, batch=batch,
                            fp16=fp16, trt=trt, tlc=tlc, fold=fold, opset=opset, train_size=train_size,
                            trt_options=options, check=check, progress=True, openvino=openvino, int8=int8,
                            int8_options=Int8Options(budget_db=int8_budget, calibration=int8_calibration,
                                                     data=data_root, crops=int8_crops, cpu_form=int8_cpu_form))
    _print_artifacts(manifest)
    from .ranges import summary

    line = summary(manifest.data.get("fp16"))
    if line:
        click.echo(line)
    if triton_repo is not None:
        from .triton_repo import RepoOptions, write_repository

        _print_repository(write_repository(out_dir, triton_repo, RepoOptions(profile_hw=profile_hw), overwrite=True))


def _export_adarevd(checkpoint: Path, preset, out_dir, tiles, fp16: bool, opset: int, train_size, trt,
                    unsupported: list[str]) -> bool:
    """Exports an AdaRevD checkpoint (:mod:`export.adarevd`); False for any other model. ``trt``: the TrtOptions
    of the engines to build, or False; ``unsupported``: the options given that an AdaRevD export refuses."""
    from nafnet_core.adarevd import AdaRevD
    from nafnet_core.checkpoint import load_checkpoint
    from nafnet_core.fileio import sha256_file

    from .adarevd import export_adarevd

    ckpt = load_checkpoint(checkpoint, preset=preset)
    if not isinstance(ckpt.model, AdaRevD):
        return False
    if unsupported:
        raise UserError(f"{checkpoint}: {', '.join(unsupported)} not available for AdaRevD models (graph E and one "
                        "graph per sub-decoder step, fp32/--fp16/--trt, one image size: --tile HxW)")
    size = tuple(tiles[0]) if tiles else (720, 1280)
    out_dir = out_dir or Path("exported") / checkpoint.stem
    click.echo(f"exporting AdaRevD for {size[0]}x{size[1]} images: graph E and {ckpt.config.sub_decoders} "
               "sub-decoder graphs", err=True)
    manifest = export_adarevd(ckpt.model, out_dir, size, fp16=fp16, opset=opset,
                              train_size=train_size or ckpt.train_size,
                              source={"checkpoint": str(checkpoint), "sha256": sha256_file(checkpoint)},
                              trt=bool(trt), trt_options=trt or None, progress=True)
    for name in manifest["files"]:
        click.echo(f"{name}: {Path(out_dir) / name}")
    click.echo(f"manifest: {Path(out_dir) / 'manifest.json'} (exit table {manifest['exits']}, tiles "
               f"{manifest['tiles']['k'][0]}x{manifest['tiles']['k'][1]} at rows {manifest['tiles']['rows']} columns "
               f"{manifest['tiles']['cols']})")
    return True


def _print_repository(configs: list[Path]) -> None:
    for path in configs:
        click.echo(f"triton model {path.parent.name}: {path.parent}")
    repo = configs[0].parent.parent.resolve()
    click.echo(f"serve it with NVIDIA's container: docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 "
               f"-v {repo}:/models nvcr.io/nvidia/tritonserver:24.10-py3 tritonserver --model-repository=/models")


def _print_artifacts(manifest) -> None:
    rows = []
    for name, rec in manifest.artifacts.items():
        c = rec.get("check")
        checked = f"max|d| {c['max_abs_diff']:.1e}, {c['psnr_db']:.1f} dB vs torch fp32" if c else ""
        rows.append((name, rec["file"], f"{rec['bytes'] / 1e6:.1f} MB", checked))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[3])
    click.echo(f"manifest: {manifest.directory / 'manifest.json'}")


@export.command("triton")
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "repo", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Model repository root (created; other models in it are kept).")
@click.option("--model-name", default="nafnet", show_default=True, help="Name of the onnxruntime model "
              "(the TensorRT engine's is NAME_trt).")
@click.option("--max-batch", type=click.IntRange(1), default=8, show_default=True, help="max_batch_size.")
@click.option("--delay-us", type=click.IntRange(0), default=2000, show_default=True,
              help="Dynamic batcher: longest wait for more requests of the same shape (microseconds).")
@click.option("--instances", type=click.IntRange(1), default=1, show_default=True,
              help="Model instances per GPU (instance_group count).")
@click.option("--kind", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="Instance kind: every visible GPU, or the CPU (no TensorRT).")
@click.option("--accelerator", type=click.Choice(["trt-fp16", "trt-fp32", "none"]), default="trt-fp16",
              show_default=True, help="TensorRT execution accelerator of the onnxruntime model on GPUs.")
@click.option("--profile", "profile_hw", callback=_profile, default=None, metavar="MIN:OPT:MAX",
              help="TensorRT shape profile of the dynamic graph (HxW), default 64x64:720x1280:1088x1920.")
@click.option("--overwrite", is_flag=True, help="Replace models of the same name in REPO.")
def triton_cmd(export_dir: Path, repo: Path, model_name: str, max_batch: int, delay_us: int, instances: int,
               kind: str, accelerator: str, profile_hw, overwrite: bool) -> None:
    """Write a model repository for NVIDIA Triton Inference Server from an export directory.

    REPO/NAME/config.pbtxt + 1/model.onnx (onnxruntime_onnx, TensorRT FP16 accelerator with a shape
    profile, dynamic batching, instance group) and, where the export holds an engine, REPO/NAME_trt
    (tensorrt_plan). Input `input` FP32 Nx3xHxW in [0, 1], output `output`: the tensors `serve` takes,
    so `infer --server` works against either.

    \b
    Examples:
      python cli.py export triton runs/demo/export --out model_repository
      python cli.py export triton exported/w32 --out repo --instances 2 --max-batch 4 --overwrite
    """
    from .triton_repo import RepoOptions, write_repository

    opts = RepoOptions(name=model_name, max_batch=max_batch, delay_us=delay_us, instances=instances, kind=kind,
                       accelerator=accelerator, profile_hw=profile_hw)
    _print_repository(write_repository(export_dir, repo, opts, overwrite=overwrite))


@export.command("lint")
@click.argument("target", metavar="DIR_OR_ONNX", type=click.Path(exists=True, path_type=Path))
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="PyTorch checkpoint for the FP16 range report: per block the largest residual stream, gate "
                   "product and layer output on photos against 65504, the share below FP16's smallest normal, "
                   "and PyTorch half vs FP32 (default: the manifest's source, if present).")
@preset_option
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of sample images for the range report (default: bundled photos).")
@click.option("--size", type=SIZE, default="256x256", show_default=True,
              help="Size the bundled photos are resized to for the range report.")
@click.option("--half-size", type=SIZE, default="128x128", show_default=True,
              help="Crop for the PyTorch half-vs-fp32 PSNR (half is slow on CPU).")
@click.option("--run/--no-run", default=True, show_default=True, help="Run each graph in onnxruntime.")
def lint_cmd(target: Path, checkpoint, preset, images, size, half_size, run) -> None:
    """Check TensorRT readiness of an export directory or .onnx file, without a GPU; FP16 range report.

    Exits 1 if any check fails.

    \b
    Examples:
      python cli.py export lint exported/best
      python cli.py export lint exported/best/model-fp16-512x512.onnx --checkpoint runs/demo/best.pt
    """
    from .lint import lint_path

    findings = lint_path(target, run=run)
    for f in findings:
        click.echo(f"{'PASS' if f.ok else 'FAIL'}  {f.file}  {f.check}" + (f": {f.detail}" if f.detail else ""))
    checkpoint = checkpoint or _manifest_checkpoint(target)
    if checkpoint is not None:
        _range_report(checkpoint, preset, target, images, size, half_size)
    else:
        click.echo("FP16 range report skipped: pass --checkpoint (the manifest names no readable source)")
    failed = sum(not f.ok for f in findings)
    if failed:
        raise click.ClickException(f"{failed} check(s) failed")


def _manifest_checkpoint(target: Path) -> Path | None:
    from .manifest import ManifestError, load_manifest

    try:
        src = load_manifest(target if target.is_dir() else target.parent).data["source"]["checkpoint"]
    except ManifestError:
        return None
    return Path(src) if src and Path(src).is_file() else None


def _range_report(checkpoint: Path, preset, target: Path, images, size, half_size) -> None:
    from nafnet_core.checkpoint import load_checkpoint

    from .api import prepare_model
    from .fp16_stream import STREAM_MARGIN, stage_of
    from .manifest import ManifestError, load_manifest
    from .ranges import FP16_MAX, FP16_MIN_NORMAL, fp16_range_report
    from .samples import load_images, sample_photo

    try:
        data = load_manifest(target if target.is_dir() else target.parent).data
        tlc, fold, train_size = data["tlc"]["enabled"], data["folded"], data["tlc"]["train_size"]
    except ManifestError:
        data, tlc, fold, train_size = None, True, True, None
    ckpt = load_checkpoint(checkpoint, preset=preset or (data or {}).get("model", {}).get("preset"))
    model = prepare_model(ckpt.model, tlc=tlc, fold=fold, train_size=train_size or ckpt.train_size)
    imgs = load_images(images) if images else [sample_photo(*size, index=i) for i in range(2)]
    fp32_stream = ((data or {}).get("fp16") or {}).get("fp32_stream", [])
    report = fp16_range_report(model, imgs, half_size, fp32_stream=fp32_stream)
    click.echo(f"\nFP16 range report ({report.images} images, FP32 activations; FP16 max {FP16_MAX:.0f}, "
               f"smallest normal {FP16_MIN_NORMAL:.1e}):")
    click.echo(f"  {'block':<22} {'stream':>9} {'gates':>9} {'any layer':>9} {'subnormal':>9} {'headroom':>9}")
    for b in report.blocks:
        kept = stage_of(b.block) in fp32_stream
        flag = ("  <- stream kept FP32 by the export" if kept
                else "  <- overflows FP16" if b.headroom < 1
                else "  <- within the export's margin: re-export to keep it FP32"
                if b.max_stream > FP16_MAX / STREAM_MARGIN
                else "")
        click.echo(f"  {b.block:<22} {b.max_stream:>9.4g} {b.max_gate:>9.4g} {b.max_abs:>9.4g} {b.subnormal:>8.2%} "
                   f"{b.headroom:>8.1f}x{flag}")
    if report.half_psnr_db is not None:
        h, w = report.half_size
        kept = f" (stream of {', '.join(fp32_stream)} in FP32, as exported)" if fp32_stream else ""
        click.echo(f"PyTorch half vs fp32 at {h}x{w}{kept}: {report.half_psnr_db:.2f} dB")
