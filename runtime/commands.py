"""CLI commands of the runtime: ``infer``, ``parity``, ``bench``, ``demo``. They parse and call the library."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nafnet_core.cli_common import preset_option, train_size_option
from nafnet_core.errors import UserError
from nafnet_core.images import DEFAULT_MAX_PIXELS

from .models import BACKENDS
from .tiling import DEFAULT_OVERLAP


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
@click.option("--overlap", type=click.IntRange(0), default=DEFAULT_OVERLAP, show_default=True,
              help="Tile overlap in pixels (blended with a raised-cosine ramp).")
@click.option("--overwrite", is_flag=True, help="Re-process images whose output exists (default: skip, so re-runs resume).")
@click.option("--compare", is_flag=True, help="Also write input|output side-by-side images to OUT_compare/.")
@click.option("--tlc/--no-tlc", default=True, show_default=True,
              help="Apply TLC to checkpoints (exports carry their own setting).")
@preset_option
@train_size_option
@click.option("--threads", type=click.IntRange(1), default=None, help="onnxruntime threads (default: all cores).")
@click.option("--max-pixels", type=click.IntRange(1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse larger images (decompression-bomb guard).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def infer(input_path: Path, model: Path, backend: str, precision: str | None, device: str, out_dir: Path | None,
          tile, overlap: int, overwrite: bool, compare: bool, tlc: bool, preset: str | None, train_size: int | None,
          threads: int | None, max_pixels: int, quiet: bool) -> None:
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

    runner = open_runner(model, backend, precision, preset=preset, tlc=tlc, train_size=train_size, device=device,
                         threads=threads)
    out_dir = out_dir or default_output(input_path)
    with runner:
        click.echo(f"{runner.name}: {model} -> {out_dir}", err=True)
        report = infer_path(runner, input_path, out_dir, tile=tile, overlap=overlap, overwrite=overwrite,
                            compare=compare, max_pixels=max_pixels, progress=not quiet)
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
