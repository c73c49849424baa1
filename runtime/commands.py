"""CLI commands of the runtime: ``infer``, ``parity``, ``bench``, ``demo``. They parse and call the library."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nafnet_core.cli_common import preset_option, train_size_option
from nafnet_core.errors import UserError
from nafnet_core.images import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, max_pixels_limit

from .models import BACKENDS


class TileParam(click.ParamType):
    """``auto``, ``none``, ``N`` or ``HxW`` (multiples of 16)."""

    name = "auto|none|N|HxW"

    def convert(self, value, param, ctx):
        if not isinstance(value, str) or value.lower() in ("auto", "none"):
            return value.lower() if isinstance(value, str) else value
        h, _, w = value.lower().partition("x")
        try:
            hw = (int(h), int(w or h))
        except ValueError:
            self.fail(f"{value!r} is not auto, none, N or HxW", param, ctx)
        if min(hw) < 16 or hw[0] % 16 or hw[1] % 16:
            self.fail(f"{value!r}: tile sides must be multiples of 16 (e.g. 512 or 384x640)", param, ctx)
        return hw


backend_option = click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                              help="Runtime; auto = fastest that can run here (trt > onnxrt > torch).")
precision_option = click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
                                help="Arithmetic precision. Default: fp32 (fp16 for TensorRT).")
verify_option = click.option(
    "--verify/--no-verify", default=True, show_default=True,
    help="Check ONNX/engine files against the export manifest's sha256, and engines against this TensorRT "
         "version and GPU, before use; --no-verify loads them as they are.")
device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                             show_default=True, help="Device for torch and onnxruntime.")


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, path_type=Path))
@click.option("--model", "-m", "model", required=True, type=click.Path(exists=True, path_type=Path),
              help="Checkpoint, official .pth (with --preset), .onnx, TensorRT engine, or export directory.")
@backend_option
@precision_option
@device_option
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (mirrors INPUT). Default: INPUT_deblurred beside INPUT.")
@click.option("--tile", type=TileParam(), default="auto", show_default=True,
              help="auto: whole image up to ~1280x720 on dynamic graphs, tiles above; none: whole image; N or HxW.")
@click.option("--overlap", type=click.IntRange(0), default=None,
              help="Tile overlap in pixels, blended with a raised-cosine ramp. Default: 128 (a quarter of smaller tiles).")
@click.option("--overwrite", is_flag=True, help="Re-process images whose output exists (default: skip, so re-runs resume).")
@click.option("--compare", is_flag=True, help="Also write input|output side-by-side images to OUT_compare/.")
@click.option("--tlc/--no-tlc", default=True, show_default=True,
              help="Apply TLC to checkpoints (exports carry their own setting).")
@preset_option
@train_size_option
@click.option("--threads", type=click.IntRange(1), default=None, help="onnxruntime threads (default: all cores).")
@click.option("--max-pixels", type=click.IntRange(1), default=None,
              help=f"Refuse larger images (decompression-bomb guard). Default: ${MAX_PIXELS_ENV} or "
                   f"{DEFAULT_MAX_PIXELS:,}.")
@verify_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def infer(input_path: Path, model: Path, backend: str, precision: str | None, device: str, out_dir: Path | None,
          tile, overlap: int | None, overwrite: bool, compare: bool, tlc: bool, preset: str | None, train_size: int | None,
          threads: int | None, max_pixels: int, verify: bool, quiet: bool) -> None:
    """Deblur an image or a folder (recursive) with any backend.

    PNG, JPEG, BMP, TIFF and WebP in 8 or 16 bits, gray or RGBA (alpha kept) are written back in the
    same format and depth; EXIF orientation is applied. Existing outputs are skipped, so an interrupted
    run resumes. Files that cannot be read are listed at the end (exit code 1).

    \b
    Examples:
      python cli.py infer blurry/ --model runs/demo/export
      python cli.py infer photo.jpg --model NAFNet-GoPro-width32.pth --preset nafnet-gopro-width32 --backend torch
      python cli.py infer frames/ -m export/ --backend onnxrt --tile 512 --out sharp/ --compare
    """
    from .infer import default_output, infer_path
    from .models import open_runner

    max_pixels = max_pixels_limit(max_pixels)  # a bad NAFNET_MAX_PIXELS fails before the model loads
    runner = open_runner(model, backend, precision, preset=preset, tlc=tlc, train_size=train_size, device=device,
                         threads=threads, verify=verify)
    out_dir = out_dir or default_output(input_path)
    with runner:
        click.echo(f"{runner.name}: {model} -> {out_dir}", err=True)
        report = infer_path(runner, input_path, out_dir, tile=tile, overlap=overlap, overwrite=overwrite,
                            compare=compare, max_pixels=max_pixels, progress=not quiet)
    if report.removed_parts:
        click.echo(f"removed {len(report.removed_parts)} temporary file(s) an interrupted run left in {out_dir}")
    n = len(report.written)
    rate = f", {n / report.seconds:.2f} images/s" if n and report.seconds > 0 else ""
    click.echo(f"wrote {n}, skipped {len(report.skipped)} existing, failed {len(report.failed)} "
               f"in {report.seconds:.1f} s{rate} -> {out_dir}")
    if report.skipped and not overwrite:
        click.echo("  (existing outputs were kept; --overwrite re-processes them)")
    if report.failed:
        click.echo("failed:", err=True)
        for src, why in report.failed.items():
            click.echo(f"  {why}", err=True)
        sys.exit(1)
    if not n and not report.skipped:
        raise UserError(f"{input_path}: no images found (looked for .png .jpg .jpeg .bmp .tif .tiff .webp)")


def _hw(ctx, param, value):
    if value is None:
        return None
    h, _, w = value.lower().partition("x")
    try:
        return int(h), int(w or h)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected HxW, e.g. 720x1280") from None


@click.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data_root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Data set root (GoPro layout or the synthetic set). Default: the embedded synthetic set.")
@click.option("--split", default="test", show_default=True, help="Split to evaluate (train, val, test).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N pairs.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="PyTorch reference checkpoint, if the export's source checkpoint moved.")
@click.option("--torch-precisions", default="fp16,bf16", show_default=True,
              help="Extra PyTorch precisions to check (comma list; empty for none).")
@click.option("--tile", "tile", callback=_hw, default=None,
              help="Tile of the torch tiled row (default: the export's fixed tile, else 512).")
@click.option("--overlap", type=click.IntRange(0), default=None, help="Tile overlap (default: as infer).")
@device_option
@click.option("--threads", type=click.IntRange(1), default=None, help="onnxruntime threads (default: all cores).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report as JSON.")
@verify_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def parity(export_dir: Path, data_root: Path | None, split: str, limit: int | None, checkpoint: Path | None,
           torch_precisions: str, tile, overlap: int | None, device: str, threads: int | None, json_path: Path | None,
           verify: bool, quiet: bool) -> None:
    """Check export parity: PSNR/SSIM of every backend x precision x (whole | tiled) vs PyTorch fp32.

    The reference is PyTorch fp32 on the whole image with the export's TLC setting. Limits (DESIGN §7):
    fp32 |ΔPSNR| <= 0.01 dB and >= 60 dB vs the reference output; fp16 <= 0.05 dB and >= 45 dB;
    tiled vs whole <= 0.05 dB. Rows that cannot run here say why. Exit 0 only if every row that ran passed.

    \b
    Examples:
      python cli.py parity runs/demo/export
      python cli.py parity exported/ --data DBlur/Gopro --split test --limit 50 --json parity.json
    """
    from .parity import check_parity

    if data_root is None:
        from train.synth import ensure_synthetic

        data_root = ensure_synthetic(progress=not quiet)
    precisions = tuple(p.strip() for p in torch_precisions.split(",") if p.strip())
    bad = [p for p in precisions if p not in ("fp32", "fp16", "bf16")]
    if bad:
        raise UserError(f"--torch-precisions: unknown precision {bad[0]!r}; use fp16, bf16")
    report = check_parity(export_dir, data_root, split=split, limit=limit, checkpoint=checkpoint,
                          torch_precisions=precisions, tile=tile, overlap=overlap,
                          device="cpu" if device == "auto" else device, threads=threads, progress=not quiet,
                          verify=verify)
    click.echo(report.table())
    if json_path is not None:
        report.write_json(json_path)
        click.echo(f"wrote {json_path}")
    sys.exit(0 if report.passed else 1)


@click.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--size", callback=_hw, default="720x1280", show_default=True, help="Benchmark image HxW.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Timed runs (median reported).")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="Threads for every backend (default: all cores).")
@click.option("--fp16", "include_fp16", is_flag=True, help="Also time the FP16 ONNX graphs (fp32 math on CPU).")
@click.option("--no-torch", is_flag=True, help="Skip the PyTorch eager baseline.")
@click.option("--big", callback=_hw, default=None,
              help="Also run one image of this size (e.g. 2160x3840) tiled, for its peak memory.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def bench(export_dir: Path, size, repeats: int, warmup: int, threads: int | None, include_fp16: bool, no_torch: bool,
          big, json_path: Path | None, quiet: bool) -> None:
    """Latency, images/s, peak memory and GFLOP/s of every backend of an export, on this machine.

    Each backend runs in its own process (so its peak resident memory is its own); the machine's fp32
    matrix-multiply rate is measured in the same run, so GFLOP/s read as a fraction of what it can do.

    \b
    Examples:
      python cli.py bench runs/demo/export --size 256x256
      python cli.py bench exported/ --size 720x1280 --big 2160x3840 --json bench.json
    """
    import json

    from nafnet_core.fileio import atomic_write_text

    from .bench import bench_export, bench_table

    result = bench_export(export_dir, size, repeats=repeats, warmup=warmup, threads=threads,
                          include_torch=not no_torch, include_fp16=include_fp16, big=big, progress=not quiet)
    click.echo(bench_table(result))
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {json_path}")


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True,
              help="Where everything goes (train/, export/, parity.json, deblurred/, comparison.png).")
@click.option("--steps", type=click.IntRange(1), default=None,
              help="Training steps (default: the demo training preset's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Synthetic data and training seed.")
@click.option("--overwrite", is_flag=True, help="Redo a previous demo in --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def demo(out_dir: Path, steps: int | None, seed: int, overwrite: bool, quiet: bool) -> None:
    """The whole job on a CPU in a few minutes: synthetic data -> train -> export -> parity -> infer.

    Renders the embedded synthetic camera-shake set, trains the demo training preset (the tiny model),
    exports ONNX fp32 + FP16 (dynamic and a fixed tile; a TensorRT engine where TensorRT exists), checks parity
    of every backend against PyTorch and deblurs the test folder. It ends with the test gain (mean PSNR
    of the deblurred test images minus that of their blurry inputs) and the path of a labelled
    blurry | deblurred | sharp image to open. Exit 0 if parity and inference passed.

    \b
    Examples:
      python cli.py demo
      python cli.py demo --out /tmp/demo --steps 200 --overwrite
    """
    from .demo import run_demo

    result = run_demo(out_dir, steps=steps, seed=seed, overwrite=overwrite, progress=not quiet,
                      echo=lambda m: click.echo(m, err=True))
    click.echo(result.table())
    sys.exit(0 if result.ok else 1)
