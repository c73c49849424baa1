"""CLI commands of the runtime: ``infer``, ``parity``, ``bench``, ``demo``. They parse and call the library."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from nafnet_core.cli_common import preset_option, train_size_option
from nafnet_core.errors import UserError
from nafnet_core.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, MAX_PIXELS_ENV, VIDEO_FORMATS, max_pixels_limit

from .backends import BACKEND_CHOICES
from .models import BENCH_RECORD, PARITY_RECORD
from .video import VIDEO_CODECS


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


backend_option = click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
                              help="Runtime; auto = the fastest this machine measured (`bench` on the export), "
                                   "else trt > onnxrt > torch.")
precision_option = click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8"]), default=None,
                                help="Arithmetic precision (int8: an export's INT8 graph or engine, `export "
                                     "--int8`). Default: fp32 (fp16 for TensorRT).")
verify_option = click.option(
    "--verify/--no-verify", default=True, show_default=True,
    help="Check ONNX/engine files against the export manifest's sha256, and engines against this TensorRT "
         "version and GPU, before use; --no-verify loads them as they are.")
device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                             show_default=True, help="Device for torch and onnxruntime.")


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, path_type=Path))
@click.option("--model", "-m", "model", default=None, type=click.Path(exists=True, path_type=Path),
              help="Checkpoint, official .pth (with --preset), .onnx, TensorRT engine, or export directory.")
@click.option("--server", "server", default=None, metavar="URL",
              help="Instead of --model: a Triton server (`serve`, or NVIDIA's with `export triton`'s repository), "
                   "http://HOST:PORT or grpc://HOST:PORT.")
@click.option("--model-name", default="nafnet", show_default=True, help="With --server: the model's name there.")
@click.option("--concurrency", type=click.IntRange(1, 64), default=4, show_default=True,
              help="With --server: images in flight at once.")
@backend_option
@precision_option
@device_option
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (mirrors INPUT). Default: INPUT_deblurred beside INPUT.")
@click.option("--tile", type=TileParam(), default="auto", show_default=True,
              help="auto: whole image up to ~1280x720 on dynamic graphs, tiles above; none: whole image; N or HxW.")
@click.option("--overlap", type=click.IntRange(0), default=None,
              help="Tile overlap in pixels, blended with a raised-cosine ramp. "
                   "Default: 128 (a quarter of smaller tiles).")
@click.option("--overwrite", is_flag=True,
              help="Re-process images whose output exists (default: skip, so re-runs resume).")
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
@click.option("--codec", type=click.Choice(["auto", *VIDEO_CODECS]), default="auto", show_default=True,
              help="Videos: output codec. auto = H.264 (libx264, yuv420p) where the container holds it; lossless = "
                   "H.264 RGB at crf 0 (decodes to the restored frames exactly), ffv1 = lossless FFV1.")
@click.option("--crf", type=click.IntRange(0, 63), default=None,
              help="Videos: quality of h264/vp9 (lower is better; default 18 for h264, 32 for vp9).")
@click.option("--batch", type=click.IntRange(1), default=None,
              help="Videos: frames per model call. Default: a fixed-batch graph's batch, else 1.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--exit", "exit_mode", default="auto", show_default=True, metavar="auto|fixed:K",
              help="AdaRevD exports: each tile's exit depth from the classifier, or K sub-decoders on every tile.")
def infer(input_path: Path, model: Path | None, server: str | None, model_name: str, concurrency: int, backend: str,
          precision: str | None, device: str, out_dir: Path | None, tile, overlap: int | None, overwrite: bool,
          compare: bool, tlc: bool, preset: str | None, train_size: int | None, threads: int | None, max_pixels: int,
          verify: bool, codec: str, crf: int | None, batch: int | None, quiet: bool, exit_mode: str) -> None:
    """Deblur an image, a video or a folder (recursive) with any backend, here or on a Triton server.

    PNG, JPEG, BMP, TIFF and WebP in 8 or 16 bits, gray or RGBA (alpha kept) are written back in the
    same format and depth; EXIF orientation is applied. Videos (.mp4 .m4v .mov .mkv .webm .avi; needs
    `pip install av`) stream frame by frame and keep their container, frame count, time stamps, frame
    rate, rotation and audio (copied); a fault part-way keeps the frames before it as NAME.partial.SUFFIX.
    Existing outputs are skipped, so an interrupted run resumes. Files that cannot be read are listed at
    the end (exit code 1).

    \b
    Examples:
      python cli.py infer blurry/ --model runs/demo/export
      python cli.py infer photo.jpg --model NAFNet-GoPro-width32.pth --preset nafnet-gopro-width32 --backend torch
      python cli.py infer frames/ -m export/ --backend onnxrt --tile 512 --out sharp/ --compare
      python cli.py infer clip.mp4 -m export/ --crf 16 --compare
      python cli.py infer clip.mp4 -m export/ --codec lossless   # for measurement
      python cli.py infer blurry/ --server grpc://127.0.0.1:8001 --concurrency 8
      python cli.py infer blurry/ -m exported/revd --exit fixed:2   # an AdaRevD export: exit histogram per image
    """
    from .adarevd import format_histogram, infer_images, is_adarevd_export
    from .infer import default_output, infer_path

    if model is not None and is_adarevd_export(model):
        out = out_dir or default_output(input_path)
        trt = backend == "trt"  # the engines of `export --trt`; else onnxruntime on this CPU
        total = infer_images(model, input_path, out, exit_mode, precision or ("fp16" if trt else "fp32"), threads,
                             overwrite, say=lambda line: click.echo(line, err=True),
                             backend="tensorrt" if trt else "onnxruntime")
        click.echo(f"AdaRevD {model} -> {out}: exits over all tiles {format_histogram(total)}")
        return
    from .models import open_runner

    if (model is None) == (server is None):
        raise click.UsageError("give either --model (run here) or --server URL (run on a Triton server)")
    max_pixels = max_pixels_limit(max_pixels)  # a bad NAFNET_MAX_PIXELS fails before the model loads
    if server is not None:
        from .remote import RemoteRunner

        runner = RemoteRunner(server, model_name)
    else:
        runner = open_runner(model, backend, precision, preset=preset, tlc=tlc, train_size=train_size, device=device,
                             threads=threads, verify=verify, reuse_memory=True)
    out_dir = out_dir or default_output(input_path)
    with runner:
        chosen = f" (--backend auto {runner.auto_note})" if getattr(runner, "auto_note", "") else ""
        click.echo(f"{runner.name}{chosen}: {model or server} -> {out_dir}", err=True)
        report = infer_path(runner, input_path, out_dir, tile=tile, overlap=overlap, overwrite=overwrite,
                            compare=compare, max_pixels=max_pixels, progress=not quiet, codec=codec, crf=crf,
                            batch=batch, workers=concurrency if server is not None else 1)
    if report.removed_parts:
        click.echo(f"removed {len(report.removed_parts)} temporary file(s) an interrupted run left in {out_dir}")
    n = len(report.written)
    rate = f", {n / report.seconds:.2f} files/s" if n and report.seconds > 0 else ""
    if report.video_frames and report.seconds > 0:
        rate += f" ({report.video_frames} video frames, {report.video_frames / report.seconds:.2f} frames/s)"
    click.echo(f"wrote {n}, skipped {len(report.skipped)} existing, failed {len(report.failed)} "
               f"in {report.seconds:.1f} s{rate} -> {out_dir}")
    if report.skipped and not overwrite:
        click.echo("  (existing outputs were kept; --overwrite re-processes them)")
    if report.failed:
        click.echo("failed:", err=True)
        for why in report.failed.values():
            click.echo(f"  {why}", err=True)
        sys.exit(1)
    if not n and not report.skipped:
        raise UserError(f"{input_path}: no images or videos found (looked for "
                        f"{' '.join(IMAGE_SUFFIXES + tuple(VIDEO_FORMATS))})")


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

    The reference is PyTorch fp32 on the whole image with the export's TLC setting. Limits, docs/DESIGN.md §8 (Parity):
    fp32 |ΔPSNR| <= 0.01 dB and >= 60 dB vs the reference output; fp16 <= 0.05 dB and >= 45 dB;
    tiled vs whole <= 0.05 dB. Rows that cannot run here say why. Exit 0 only if every row that ran passed.

    \b
    Examples:
      python cli.py parity runs/demo/export
      python cli.py parity exported/ --data DBlur/Gopro --split test --limit 50 --json parity.json
      python cli.py parity exported/revd   # AdaRevD: adaptive, each fixed exit, every depth + select

    An AdaRevD export is checked per exit: the adaptive runtime against PyTorch's adaptive result (same
    exits), "every sub-decoder on every tile, then select" against the adaptive run, and each fixed:K
    against PyTorch at depth K, per precision and backend (--torch-precisions, --tile and --overlap do not
    apply; its images must have the exported size).
    """
    from .adarevd import check_adarevd_parity, is_adarevd_export
    from .parity import check_parity

    if data_root is None:
        from nafnet_core.synth import ensure_synthetic

        data_root = ensure_synthetic(progress=not quiet)
    precisions = tuple(p.strip() for p in torch_precisions.split(",") if p.strip())
    bad = [p for p in precisions if p not in ("fp32", "fp16", "bf16")]
    if bad:
        raise UserError(f"--torch-precisions: unknown precision {bad[0]!r}; use fp16, bf16")
    if is_adarevd_export(export_dir):  # adaptive, every fixed exit, "every depth, select"
        report = check_adarevd_parity(export_dir, data_root, split=split, limit=limit, checkpoint=checkpoint,
                                      threads=threads, progress=not quiet, verify=verify)
    else:
        report = check_parity(export_dir, data_root, split=split, limit=limit, checkpoint=checkpoint,
                              torch_precisions=precisions, tile=tile, overlap=overlap,
                              device="cpu" if device == "auto" else device, threads=threads, progress=not quiet,
                              verify=verify, reuse_memory=True)
    click.echo(report.table())
    if json_path is not None:
        report.write_json(json_path)
        click.echo(f"wrote {json_path}")
    _record_in_export(export_dir, PARITY_RECORD, report.json_text())
    sys.exit(0 if report.passed else 1)


def _record_in_export(export_dir: Path, name: str, text: str) -> None:
    """Writes ``text`` to ``export_dir/name`` (atomically), where ``--backend auto`` reads it; an export that
    cannot be written to (read-only media) costs one warning line, not the command's result."""
    from nafnet_core.fileio import atomic_write_text

    try:
        atomic_write_text(export_dir / name, text)
    except OSError as e:
        click.echo(f"warning: could not record {name} in {export_dir} ({e.strerror or e}); --backend auto "
                   "will choose by name there", err=True)
        return
    click.echo(f"recorded {export_dir / name} (read by --backend auto)")


@click.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--size", callback=_hw, default="720x1280", show_default=True, help="Benchmark image HxW.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Timed runs (median reported).")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="Threads for every backend (default: all cores).")
@click.option("--fp16", "include_fp16", is_flag=True, help="Also time the FP16 ONNX graphs (fp32 math on CPU).")
@click.option("--no-torch", is_flag=True, help="Skip the PyTorch eager baseline.")
@click.option("--big", callback=_hw, default=None,
              help="Also run one image of this size (e.g. 2160x3840) tiled on the fastest fp32 "
                   "onnxruntime/OpenVINO row, for its time and peak memory.")
@click.option("--rounds", type=click.IntRange(1), default=1, show_default=True,
              help="Interleaved rounds: every backend once per round, medians over all (for a loaded machine).")
@click.option("--no-openvino", is_flag=True, help="Skip the OpenVINO fp32/bf16 rows.")
@click.option("--no-bf16", is_flag=True, help="Skip the PyTorch bf16 row.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def bench(export_dir: Path, size, repeats: int, warmup: int, threads: int | None, include_fp16: bool, no_torch: bool,
          big, rounds: int, no_openvino: bool, no_bf16: bool, json_path: Path | None, quiet: bool) -> None:
    """Latency, images/s, peak memory and GFLOP/s of every backend of an export, on this machine.

    Each backend runs in its own process (so its peak resident memory is its own); the machine's fp32
    matrix-multiply rate is measured in the same run, so GFLOP/s read as a fraction of what it can do.

    \b
    Examples:
      python cli.py bench runs/demo/export --size 256x256
      python cli.py bench exported/ --size 720x1280 --big 2160x3840 --json bench.json
      python cli.py bench exported/ --repeats 1 --rounds 3     # interleaved: A B C, A B C, A B C
      python cli.py bench exported/revd --rounds 3             # AdaRevD: adaptive and every fixed exit

    An AdaRevD export is timed at its own image size (--size does not apply): the adaptive path and each
    fixed exit depth, with the time of graph E and of each sub-decoder step and the share of tiles per exit.
    """
    from nafnet_core.fileio import atomic_write_text

    from .adarevd import adarevd_bench_table, bench_adarevd, is_adarevd_export
    from .bench import bench_export, bench_table

    if is_adarevd_export(export_dir):  # its own image size; the adaptive path and every fixed exit
        result = bench_adarevd(export_dir, precisions=("fp32", "fp16") if include_fp16 else ("fp32",),
                               rounds=max(rounds, repeats), warmup=warmup, threads=threads, progress=not quiet)
        click.echo(adarevd_bench_table(result))
        if json_path is not None:
            atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
            click.echo(f"wrote {json_path}")
        return
    result = bench_export(export_dir, size, repeats=repeats, warmup=warmup, threads=threads,
                          include_torch=not no_torch, include_fp16=include_fp16, big=big, progress=not quiet,
                          rounds=rounds, include_openvino=not no_openvino, include_bf16=not no_bf16,
                          reuse_memory=True)
    click.echo(bench_table(result))
    text = json.dumps(result, indent=2) + "\n"
    if json_path is not None:
        atomic_write_text(json_path, text)
        click.echo(f"wrote {json_path}")
    _record_in_export(export_dir, BENCH_RECORD, text)


@click.command()
@click.argument("model", metavar="EXPORT_DIR", type=click.Path(exists=True, path_type=Path))
@backend_option
@precision_option
@device_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 serves other machines too (put it behind your firewall).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True,
              help="Prometheus metrics (/metrics).")
@click.option("--model-name", default="nafnet", show_default=True, help="Model name in the URLs.")
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Dynamic batching: most images per batch (requests of the same size are batched).")
@click.option("--delay-us", type=click.IntRange(0), default=2000, show_default=True,
              help="Dynamic batching: longest wait for more requests to batch (microseconds).")
@click.option("--max-pixels", type=click.IntRange(1), default=None,
              help="Refuse images above this many pixels (H x W). Default: 3840x2160 = 8,294,400.")
@click.option("--tile", type=TileParam(), default="auto", show_default=True,
              help="As infer: whole image up to ~1280x720 on dynamic graphs, TLC-exact tiles above.")
@click.option("--overlap", type=click.IntRange(0), default=None, help="Tile overlap in pixels (as infer).")
@click.option("--threads", type=click.IntRange(1), default=None, help="onnxruntime threads (default: all cores).")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="tritonserver's log (default: a temporary file, kept and named only if something fails).")
@verify_option
def serve(model: Path, backend: str, precision: str | None, device: str, host: str, http_port: int, grpc_port: int,
          metrics_port: int, model_name: str, max_batch: int, delay_us: int, max_pixels: int | None, tile,
          overlap: int | None, threads: int | None, log_file: Path | None, verify: bool) -> None:
    """Serve an export with NVIDIA Triton Inference Server: HTTP, gRPC, metrics, dynamic batching.

    Clients send `input` FP32 Nx3xHxW in [0, 1] to /v2/models/NAME/infer and get `output` (same shape,
    not clamped) and `error` (one string per image, empty when it went well). Health: /v2/health/ready.
    Needs the serve extra: pip install -e ".[serve]" (in a virtual environment: it pins numpy<2).
    SIGINT or SIGTERM stops it cleanly.

    \b
    Examples:
      python cli.py serve runs/demo/export
      python cli.py infer blurry/ --server grpc://127.0.0.1:8001      (from another shell)
      python cli.py serve exported/w32 --host 0.0.0.0 --http-port 9000 --max-batch 4
    """
    from .models import open_runner
    from .serve import SERVE_MAX_PIXELS, ServeOptions, import_pytriton
    from .serve import serve as run_server

    import_pytriton()  # missing extra: one line before the model loads
    options = ServeOptions(host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                           model_name=model_name, max_batch=max_batch, delay_us=delay_us,
                           max_pixels=max_pixels or SERVE_MAX_PIXELS, tile=tile, overlap=overlap, log_file=log_file)
    runner = open_runner(model, backend, precision, device=device, threads=threads, verify=verify, reuse_memory=True)
    code = run_server(runner, options, echo=lambda m: click.echo(m, err=True))
    # The server, its processes, shared memory and workspace are gone and the runner is closed: nothing is left
    # to finalise. The interpreter's own teardown (a garbage collection over torch/onnx modules) took 4-9 s
    # more on a loaded 2-core machine, which a supervisor's stop timeout would count, so leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
