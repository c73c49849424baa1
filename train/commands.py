"""CLI commands of the training package: ``train``, ``eval``, ``compare``, ``data check``, ``data synth``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from nafnet_core.cli_common import preset_option, train_size_option

from .config import PRESETS as TRAIN_PRESETS


@click.group(name="data")
def data() -> None:
    """Check a GoPro-style data set, or make the embedded synthetic one.

    \b
    Examples:
      python cli.py data check ~/datasets/DBlur/Gopro
      python cli.py data synth data/synth --seed 0 --count 24
    """


@data.command(name="check")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--full", is_flag=True, help="Decode every image (finds files truncated after their header; slower).")
@click.option("--crop", type=click.IntRange(min=0), default=0, show_default=True,
              help="Report training images smaller than this crop.")
@click.option("--blur-dir", type=click.Choice(["blur", "blur_gamma"]), default="blur", show_default=True,
              help="Blurry folder of the GOPRO_Large layout.")
def data_check(root: Path, full: bool, crop: int, blur_dir: str) -> None:
    """Pairs per split, missing partners, size mismatches, unreadable files; exit code 1 if anything is wrong.

    Reads ROOT/{train,test}/{blur,sharp}/ (DBlur) or ROOT/{train,test}/SEQUENCE/{blur,sharp}/ (GOPRO_Large).
    The test folder is split into val (first half in sorted order) and test (second half).

    \b
    Example:
      python cli.py data check ~/datasets/GOPRO_Large --full
    """
    from nafnet_core.data import check_dataset

    report = check_dataset(root, full=full, min_size=crop, blur_dir=blur_dir, progress=True)
    click.echo(report.summary(max_problems=200))
    if not report.ok:
        sys.exit(1)


@data.command(name="synth")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, byte-identical files.")
@click.option("--count", type=click.IntRange(min=1), default=24, show_default=True,
              help="Training pairs (the test folder gets max(2, count // 3) pairs of other photos).")
@click.option("--size", default="192x256", show_default=True, metavar="HxW", help="Height x width of every pair.")
def data_synth(out: Path, seed: int, count: int, size: str) -> None:
    """Write a GoPro-style synthetic set made from scikit-image's bundled photos (no downloads).

    Blur = average, in linear light, of sub-frames along a random smooth camera path (translation, small
    rotation and zoom); sharp = the view at the path's mean position, so the blur is centred on it.

    \b
    Example:
      python cli.py data synth data/synth --seed 1 --count 48
    """
    from nafnet_core.errors import UserError
    from nafnet_core.synth import synthesize

    try:
        h, w = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size must look like 192x256 (height x width), got {size!r}") from None
    synthesize(out, seed=seed, count=count, size=(h, w))
    click.echo(f"wrote {out} (seed {seed}, {count} train pairs); check it with: python cli.py data check {out}")


@click.command(name="train")
@click.option("--preset", type=click.Choice(list(TRAIN_PRESETS)), default=None,
              help="Training preset [default: gopro, the official NAFNet GoPro recipe].")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML or JSON file of config keys, applied over the preset.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override one config key (repeatable), e.g. --set lr=2e-4 --set loss=charbonnier.")
@click.option("--data", "data_root", type=click.Path(file_okay=False, path_type=Path),
              help="Dataset folder (DBlur or GOPRO_Large layout). Default: the embedded synthetic set.")
@click.option("--name", default=None, help="Run name: the run directory is RUNS/NAME [default: the preset].")
@click.option("--runs", "runs_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"),
              show_default=True, help="Parent folder of run directories.")
@click.option("--resume", is_flag=True, help="Continue RUNS/NAME/last.pt exactly where it stopped.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 [default: CUDA when available].")
@click.option("--bench", is_flag=True,
              help="Only measure training throughput: images/s, s/step, peak memory and compile time of this "
                   "config and of each speed option (channels_last, amp=bf16, compile), timed interleaved.")
@click.option("--json", "as_json", is_flag=True, help="With --bench: print the result as JSON instead of a table.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def train_cmd(preset, config_file, sets, data_root, name, runs_dir, resume, device, bench, as_json,
              progress) -> None:
    """Train NAFNet (one process, or several under torchrun) with validation, checkpoints and exact resume.

    \b
    Examples:
      python cli.py train --preset tiny                          # ~2 min on 2 CPU cores, synthetic data
      python cli.py train --data ~/datasets/DBlur/Gopro --name w32
      python cli.py train --preset seed --set batch=16 --data ~/datasets/DBlur/Gopro
      python cli.py train --name w32 --resume
      torchrun --nproc_per_node=2 cli.py train --data ~/datasets/GOPRO_Large --name w32-ddp
      python cli.py train --set batch=4 --bench                  # width32, 256 crops: config vs options
      tensorboard --logdir runs    # watch every run live (pip install tensorboard; --set tensorboard=off)

    One train per run directory: a second one on a directory a running train holds stops, naming its PID.
    """
    from nafnet_core.checkpoint import read_checkpoint

    from .config import ConfigError, build_config, parse_sets

    overrides = parse_sets(sets)
    if data_root is not None:
        overrides["data"] = str(data_root)
    run_dir = runs_dir / (name or preset or "gopro")
    if resume:
        if preset:
            raise ConfigError("--preset cannot be combined with --resume: the run's config is stored in last.pt "
                              "(use --set to change a key, e.g. --set steps=2000)")
        last = run_dir / "last.pt"
        if not last.exists():
            raise ConfigError(f"{last}: nothing to resume; check --name / --runs")
        base = read_checkpoint(last).get("extra", {}).get("train_config")
        cfg = build_config(base=base, file=config_file, sets=overrides)
    else:
        cfg = build_config(preset or "gopro", file=config_file, sets=overrides)
    if bench:
        from .bench import bench_options, rows_table

        result = bench_options(cfg, device=device or "cpu", progress=progress)
        if as_json:
            click.echo(json.dumps(result))
        else:
            click.echo(f"{cfg.model}, batch {cfg.batch} of {cfg.crop}x{cfg.crop}, {result['device']}, "
                       f"{result['threads']} threads; config = {result['config_resolves_to']}; medians of "
                       f"{result['timed_steps']} interleaved steps; memory: {result['memory']}")
            click.echo(rows_table(result["rows"], "fp32 eager"))
        return
    from .loop import train

    result = train(cfg, run_dir, resume=resume, progress=progress, device=device)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary line
        click.echo(f"{result.status}: step {result.step}/{result.total_steps}, best val PSNR "
                   f"{result.best_psnr:.2f} dB at step {result.best_step}; run directory {run_dir}")


@click.command(name="eval")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@preset_option
@train_size_option
@click.option("--data", "data_root", type=click.Path(file_okay=False, path_type=Path),
              help="Dataset folder [default: the run's data set, else the embedded synthetic set].")
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True)
@click.option("--tlc/--no-tlc", default=True, show_default=True, help="Test-time local converter.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the means here.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the per-image table here.")
@click.option("--max-images", type=click.IntRange(min=0), default=0, help="Only the first N pairs (0 = all).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 [default: CUDA when available].")
def eval_cmd(checkpoint, preset, train_size, data_root, split, tlc, json_path, csv_path, max_images, device) -> None:
    """Score a checkpoint on full-resolution images: per-image PSNR/SSIM and the blurry input's, and the mean.

    \b
    Examples:
      python cli.py eval runs/tiny/best.pt --json runs/tiny/test.json
      python cli.py eval NAFNet-GoPro-width32.pth --preset nafnet-gopro-width32 --data ~/datasets/GOPRO_Large
    """
    from .evaluate import evaluate_checkpoint

    result, meta = evaluate_checkpoint(checkpoint, preset=preset, train_size=train_size, data=data_root,
                                       split=split, tlc=tlc, max_images=max_images, device=device)
    click.echo(result.csv_text(), nl=False)
    s = result.summary()
    if "exit_histogram" in s:
        click.echo(depths_table(result))
    elif result.n_outputs > 1:
        click.echo(heads_table(result, meta["model_heads"]))
    click.echo(f"mean over {s['images']} {split} images of {meta['data']} (TLC {'on' if tlc else 'off'}, "
               f"train size {meta['train_size']}): PSNR {s['psnr']:.3f} dB, SSIM {s['ssim']:.4f}"
               f"{f' (deployment head {result.head})' if result.n_outputs > 1 and 'exit_histogram' not in s else ''}"
               f"{' (adaptive exits)' if 'exit_histogram' in s else ''}; "
               f"blurry input {s['input_psnr']:.3f} dB, {s['input_ssim']:.4f}")
    if csv_path:
        result.write_csv(csv_path)
    if json_path:
        result.write_json(json_path, **meta)
    if result.failed:
        for reason in result.failed.values():
            click.echo(f"failed: {reason}", err=True)
        raise click.ClickException(f"{len(result.failed)} of {len(result.failed) + s['images']} pairs could not be "
                                   "scored (listed above; the means exclude them)")


def depths_table(result) -> str:
    """AdaRevD's table: mean PSNR/SSIM of every exit depth, of the adaptive result, and the exit histogram."""
    k = result.n_outputs - 1
    psnrs, ssims = result.head_means("psnr"), result.head_means("ssim")
    lines = ["exit depth  PSNR dB    SSIM"]
    lines += [f"{d + 1:>10}  {psnrs[d]:7.3f}  {ssims[d]:.4f}" for d in range(k)]
    lines.append(f"{'adaptive':>10}  {psnrs[k]:7.3f}  {ssims[k]:.4f}")
    hist = result.exit_histogram()
    total = sum(hist) or 1
    lines.append("exit histogram (tiles per depth): " + ", ".join(
        f"{d}: {n} ({100 * n / total:.0f}%)" for d, n in enumerate(hist)))
    return "\n".join(lines)


def heads_table(result, heads: int) -> str:
    """Every output of a multi-head model: its head pair, mean PSNR/SSIM, and which is deployed / best here.

    Args:
        result: the evaluation (:class:`train.evaluate.EvalResult`).
        heads: the model's ``heads`` (its outputs average the pairs of :func:`nafnet_core.model.head_pairs`).
    """
    from nafnet_core.model import head_pairs

    pairs = head_pairs(heads)
    best = result.best_head()
    lines = ["output  heads   PSNR dB    SSIM"]
    for k, (p, q) in enumerate(zip(result.head_means("psnr"), result.head_means("ssim"))):
        marks = [m for m, on in (("deployment head (recorded in the checkpoint)", k == result.head),
                                 ("best on this split", k == best)) if on]
        lines.append(f"{k:>6}  ({pairs[k][0]},{pairs[k][1]})  {p:8.3f}  {q:.4f}  {', '.join(marks)}".rstrip())
    return "\n".join(lines)


@click.command(name="compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="RUN_DIR...")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the rows here.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write a CSV here.")
def compare_cmd(run_dirs, json_path, csv_path) -> None:
    """The experiment table: training runs side by side.

    For each run: the config keys that differ between the runs, parameters, GFLOP at 256x256 and
    720x1280, best validation PSNR/SSIM (and the blurry input's), test PSNR/SSIM with TLC (from an eval
    JSON in the run folder), training images/s, and the onnxruntime fp32 latency at 720x1280 when an
    export of the run's best.pt holds a `bench --json` result. AdaRevD runs add the PSNR of each exit depth,
    the adaptive PSNR and the % of tiles per exit depth, of the best validation and of the test eval.
    Missing pieces are "-".

    \b
    Examples:
      python cli.py compare runs/*
      python cli.py eval runs/w32/best.pt --json runs/w32/test.json   # adds the test column
      python cli.py export runs/w32/best.pt --out runs/w32/export
      python cli.py bench runs/w32/export --json runs/w32/export/bench.json   # adds the latency column
      python cli.py compare runs/w32 runs/w32-swiglu --csv table.csv
    """
    from nafnet_core.fileio import atomic_write_text

    from .compare import compare_csv, compare_table, rows_as_dicts, summarize_runs

    rows = summarize_runs(list(run_dirs))
    click.echo(compare_table(rows))
    if json_path:
        atomic_write_text(json_path, json.dumps(rows_as_dicts(rows), indent=1) + "\n")
    if csv_path:
        atomic_write_text(csv_path, compare_csv(rows))
