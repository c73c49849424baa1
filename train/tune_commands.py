"""CLI of the tuner: ``tune SPACE.yaml``, ``tune report NAME``, ``tune ablate BASE``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nafnet_core.cli_common import Group


class TuneGroup(Group):
    """``tune`` is both a command and a group: a first argument that is not a subcommand is a space file, so
    ``tune space.yaml --study s`` runs ``tune run space.yaml --study s``."""

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@click.group(cls=TuneGroup, name="tune")
def tune() -> None:
    """Search the training config on Optuna, report a study, ablate factors over seeds (pip install -e ".[tune]").

    \b
    python cli.py tune SPACE.yaml --study NAME     same as `tune run SPACE.yaml --study NAME`
    python cli.py tune report NAME                 trials, best config, importances, history.png
    python cli.py tune ablate BASE --factor K=A,B  one factor at a time (or --factorial) over seeds

    \b
    Examples:
      python cli.py tune space.yaml --study tiny-lr --trials 16
      python cli.py tune space.yaml --study tiny-lr --storage postgresql://tune@db:5432/optuna   # on every machine
      python cli.py tune report tiny-lr
      python cli.py tune ablate tiny --factor dropout=0,0.5 --factor crop_mode=resize,random --seeds 3
    """


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


@tune.command(name="run")
@click.argument("space_file", type=click.Path(dir_okay=False, path_type=Path), metavar="SPACE.yaml")
@click.option("--study", required=True, help="Study name: its folder is RUNS/NAME (trials in RUNS/NAME/trial-NNNN).")
@click.option("--data", "data_root", type=click.Path(file_okay=False, path_type=Path),
              help="Dataset folder for every trial [default: the space's base config, else the synthetic set].")
@click.option("--trials", type=click.IntRange(min=1), default=16, show_default=True,
              help="Total trials of the study, across all its workers (the baseline included).")
@click.option("--hours", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Start no new trial after this many hours.")
@click.option("--storage", default=None, metavar="URL",
              help="Database shared by workers on several machines (postgresql://user@host:port/db) "
                   "[default: RUNS/NAME/study.journal].")
@click.option("--objective", type=click.Choice(["psnr", "psnr,latency"]), default="psnr", show_default=True,
              help="psnr: best val PSNR (pruning on; budgets are constraints); psnr,latency: the Pareto front of "
                   "val PSNR and deploy latency (no pruning).")
@click.option("--prune/--no-prune", default=True, show_default=True,
              help="Stop hopeless trials at validation points (the space file's pruner: asha or median).")
@click.option("--runs", "runs_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"),
              show_default=True, help="Parent folder of study folders.")
@click.option("--device", default=None, help="Device of every trial: cpu, cuda, cuda:1 [default: CUDA when available].")
@click.option("--gpus-per-trial", type=click.IntRange(min=0), default=0, show_default=True,
              help="Run each trial under torchrun on this many GPUs (of this worker's CUDA_VISIBLE_DEVICES).")
@click.option("--seed", type=int, default=None, help="Sampler seed (same seed, same first trials).")
def tune_run(space_file, study, data_root, trials, hours, storage, objective, prune, runs_dir, device,
             gpus_per_trial, seed) -> None:
    """Run one worker of study NAME over SPACE.yaml until --trials, --hours or Ctrl-C.

    The first trial is the baseline (the base config with no key searched). Each trial is an ordinary
    training run in RUNS/NAME/trial-NNNN (compare reads it); a trial that fails is FAIL with its
    reason, never a score, and a study where every trial failed exits 1. A second `tune` on the same
    study joins it; after a stop or a kill, starting again continues the study and resumes the
    interrupted trial from its last.pt.

    \b
    Example space file:
      base: {preset: tiny, steps: 600, val_every: 100}
      space:
        lr: {low: 1.0e-4, high: 4.0e-3, log: true}
        model_args.width: {choices: [8, 12, 16]}
        loss: {choices: [psnr, l1, charbonnier]}
        dropout: {low: 0.0, high: 0.5, step: 0.1}

    \b
    Examples:
      python cli.py tune space.yaml --study tiny-lr --trials 16
      python cli.py tune space.yaml --study tiny-pareto --objective psnr,latency --no-prune
      python cli.py compare runs/tiny-lr/trial-*
    """
    from .tune import TuneSettings, load_space, optuna_module, run_study

    optuna_module()
    objectives = tuple(objective.split(","))
    space = load_space(space_file, prune=prune and len(objectives) == 1)
    settings = TuneSettings(study=study, runs=runs_dir, storage=storage, trials=trials, hours=hours,
                            objectives=objectives, prune=prune, data=str(data_root) if data_root else None,
                            device=device, gpus_per_trial=gpus_per_trial, seed=seed, echo=_echo)
    summary = run_study(space, settings)
    _finish(summary, study, runs_dir, storage)


def _finish(summary, study: str, runs_dir: Path, storage: str | None) -> None:
    import signal

    click.echo(f"this worker ran {len(summary.ran)} trial(s); the study has {summary.study_trials} "
               f"({summary.study_complete} complete). Report: python cli.py tune report {study}"
               + (f" --runs {runs_dir}" if runs_dir != Path("runs") else "")
               + (f" --storage {storage}" if storage else ""))
    if summary.stopped_by:
        click.echo(f"stopped by {summary.stopped_by}: the running trial saved last.pt and is re-queued; start the "
                   "same command again to continue", err=True)
        sys.exit(128 + int(getattr(signal, summary.stopped_by)))
    if summary.all_failed:
        reasons = "; ".join(f"trial {n}: {r}" for n, r in summary.study_failed[:3])
        raise click.ClickException(f"every trial of study {study} failed ({len(summary.study_failed)}): {reasons}")


@tune.command(name="report")
@click.argument("name")
@click.option("--storage", default=None, metavar="URL", help="The study's database [default: RUNS/NAME/study.journal].")
@click.option("--runs", "runs_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"),
              show_default=True, help="Parent folder of study folders.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the report here.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the trials here.")
def tune_report(name, storage, runs_dir, json_path, csv_path) -> None:
    """Trials table (state, params, best val PSNR/SSIM, steps, time, reason of FAIL or PRUNE), the best config
    as --set lines and RUNS/NAME/best.yaml, parameter importances, history.png (pareto.png for psnr,latency),
    and the optuna-dashboard command. An ablation study gets its ablation table.

    \b
    Examples:
      python cli.py tune report tiny-lr
      python cli.py tune report tiny-lr --json report.json --csv trials.csv
    """
    from .tune_report import load_report, summary_text, trials_table, write_outputs

    rep = load_report(name, runs_dir, storage)
    click.echo(trials_table(rep))
    click.echo(summary_text(rep))
    written = write_outputs(rep, runs_dir / name, json_path, csv_path)
    if written:
        click.echo("wrote " + ", ".join(str(p) for p in written))
    from .ablate import ablation_table, is_ablation, load_ablation

    if is_ablation(runs_dir / name, storage, name):
        click.echo(ablation_table(load_ablation(name, runs_dir, storage)))


@tune.command(name="ablate")
@click.argument("base")
@click.option("--factor", "factors", multiple=True, required=True, metavar="KEY=V1,V2[,...]",
              help="A factor and its levels (the first is the reference level); repeatable.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="Seeds per variant.")
@click.option("--factorial", is_flag=True, help="Every combination of the levels (default: one factor at a time).")
@click.option("--study", default=None, help="Study name [default: ablate-<factor keys>].")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a key of BASE (repeatable).")
@click.option("--data", "data_root", type=click.Path(file_okay=False, path_type=Path), help="Dataset folder.")
@click.option("--runs", "runs_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"),
              show_default=True, help="Parent folder of study folders.")
@click.option("--storage", default=None, metavar="URL", help="Database shared by workers [default: a journal file].")
@click.option("--device", default=None, help="Device of every run.")
def tune_ablate(base, factors, seeds, factorial, study, sets, data_root, runs_dir, storage, device) -> None:
    """Train BASE (a training preset or a YAML config file, or a space file's base:) and its variants over
    --seeds seeds; report each variant's test PSNR difference from the reference with a 95 % interval from
    paired per-image test PSNR, against the seed-noise floor.

    The reference variant takes the first level of every factor. Each run is scored on the test split
    (TLC) after training; a variant whose interval covers zero or whose difference is within the
    seed-noise floor is reported "not distinguishable from seed noise".

    \b
    Examples:
      python cli.py tune ablate tiny --factor dropout=0,0.5 --factor crop_mode=resize,random --seeds 3
      python cli.py tune ablate base.yaml --factor loss=psnr,l1,charbonnier --seeds 4 --set steps=400
      python cli.py tune ablate tiny --factor dropout=0,0.5 --factor crop=32,64 --factorial
    """
    from train.config import parse_sets

    from .ablate import ablation_table, load_ablation, run_ablation
    from .tune import TuneSettings, optuna_module

    optuna_module()
    name = study or "ablate-" + "-".join(f.split("=", 1)[0].replace("model_args.", "") for f in factors)
    settings = TuneSettings(study=name, runs=runs_dir, storage=storage, prune=False,
                            data=str(data_root) if data_root else None, device=device, evaluate_test=True,
                            baseline=False, echo=_echo)
    summary = run_ablation(base, list(factors), seeds=seeds, factorial=factorial, sets=parse_sets(sets),
                           settings=settings)
    click.echo(ablation_table(load_ablation(name, runs_dir, storage)))
    _finish(summary, name, runs_dir, storage)
