"""The report of a study (``python cli.py tune report NAME``): trials table, best config, importances, plots.

Everything is read from the study's storage (trial states, parameters, values, the user attributes the worker
recorded: steps run, seconds, reasons, cost) and written beside the trials: ``best.yaml`` (the best config's
keys, for ``train --config``), ``history.png`` (value per trial, best so far) and, for a latency objective,
``pareto.png``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nafnet_core.fileio import atomic_write_text

from .report import pyplot, save_figure
from .tune import JOURNAL_NAME, TuneError, counted, open_storage, optuna_module, sqlalchemy_url, superseded


@dataclass
class TrialRow:
    number: int
    state: str
    baseline: bool
    params: dict[str, Any]
    val_psnr: float | None
    val_ssim: float | None
    latency_ms: float | None
    steps: int | None
    seconds: float | None
    reason: str
    run_dir: str | None
    resume_of: int | None = None
    pareto: bool = False


@dataclass
class StudyReport:
    study: str
    objectives: list[str]
    preset: str
    base: dict[str, Any]
    rows: list[TrialRow]
    best: list[int] = field(default_factory=list)  # best trial (or the Pareto front)
    importances: dict[str, float] = field(default_factory=dict)
    importances_note: str = ""
    total_steps: int | None = None
    dashboard: str = ""

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.state] = out.get(r.state, 0) + 1
        return out

    def steps_saved(self) -> tuple[int, int]:
        """(steps run by every counted trial, steps the same trials would have run unpruned)."""
        run = sum(r.steps or 0 for r in self.rows if r.state in ("COMPLETE", "PRUNED"))
        full = sum((self.total_steps or 0) if r.state == "PRUNED" and (r.steps or 0) > 0 else (r.steps or 0)
                   for r in self.rows if r.state in ("COMPLETE", "PRUNED"))
        return run, full


def load_report(name: str, runs: Path, storage: str | None) -> StudyReport:
    optuna = optuna_module()
    study_dir = runs / name
    st = open_storage(sqlalchemy_url(storage) if storage else None, study_dir, create=False)
    try:
        study = optuna.load_study(study_name=name, storage=st)
    except KeyError:
        raise TuneError(f"no study {name!r} in {storage or study_dir / JOURNAL_NAME}") from None
    trials = study.get_trials(deepcopy=False)
    gone = superseded(trials)
    attrs = study.user_attrs
    objectives = list(attrs.get("objectives", ["psnr"]))
    rows = []
    for t in trials:
        u = t.user_attrs
        state = t.state.name
        reason = u.get("fail_reason") or u.get("prune_reason") or ""
        if t.number in gone:
            state, reason = "REQUEUED", f"{reason.split(';')[0] or 'stopped'}; resumed as trial {gone[t.number]}"
        values = t.values or []
        rows.append(TrialRow(number=t.number, state=state, baseline=bool(u.get("baseline")), params=dict(t.params),
                             val_psnr=values[0] if values else (_last(t) if state == "PRUNED" else None),
                             val_ssim=u.get("best_ssim"),
                             latency_ms=u.get("latency_ms"), steps=u.get("steps"), seconds=u.get("seconds"),
                             reason=reason, run_dir=u.get("run_dir"), resume_of=u.get("resume_of")))
    complete = [t for t in counted(trials) if t.state.name == "COMPLETE"]
    best: list[int] = []
    if complete:
        if len(objectives) > 1:
            best = sorted(t.number for t in study.best_trials)
        else:
            best = [max(complete, key=lambda t: t.values[0]).number]
    for r in rows:
        r.pareto = len(objectives) > 1 and r.number in best
    importances, note = {}, ""
    if len(complete) >= 3 and any(t.params for t in complete):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "some regimes have less than 2 trials": said below
            try:  # importance of reaching a high PSNR (the first objective's direction for several)
                importances = optuna.importance.get_param_importances(
                    study, target=(lambda t: -t.values[0]) if len(objectives) > 1 else None)
            except (ValueError, RuntimeError) as e:
                note = str(e).splitlines()[0]
        note = note or f"from {len(complete)} complete trials" + ("; indicative only below about 10" if
                                                                 len(complete) < 10 else "")
    else:
        note = "needs at least 3 complete trials with parameters"
    from .config import build_config

    total = None
    try:
        total = build_config(attrs.get("preset", "gopro"), sets=attrs.get("base", {})).steps
    except Exception:  # noqa: BLE001 - a study of an older config: no steps-saved figure
        pass
    dashboard = f"optuna-dashboard {storage}" if storage else f"optuna-dashboard {study_dir / JOURNAL_NAME}"
    return StudyReport(study=name, objectives=objectives, preset=attrs.get("preset", "gopro"),
                       base=attrs.get("base", {}), rows=rows, best=best, importances=dict(importances),
                       importances_note=note, total_steps=total, dashboard=dashboard)


def _last(t) -> float | None:
    """The last reported validation PSNR of an unfinished or pruned trial."""
    if t.intermediate_values:
        return t.intermediate_values[max(t.intermediate_values)]
    return None


def _params_text(params: dict[str, Any]) -> str:
    def v(x):
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    return " ".join(f"{k.replace('model_args.', '')}={v(x)}" for k, x in params.items()) or "(base config)"


def trials_table(rep: StudyReport) -> str:
    from nafnet_core.cli_common import fmt, text_table

    head = ["trial", "state", "val PSNR", "SSIM"] + (["latency ms"] if len(rep.objectives) > 1 else []) + \
        ["steps", "seconds", "params", "reason"]
    body = []
    for r in rep.rows:
        mark = "*" if r.number in rep.best else ""
        body.append([f"{r.number}{mark}", r.state + (" base" if r.baseline else ""), fmt(r.val_psnr, ".3f"),
                     fmt(r.val_ssim, ".4f")] + ([fmt(r.latency_ms, ".2f")] if len(rep.objectives) > 1 else []) +
                    [fmt(r.steps), fmt(r.seconds, ".0f"), _params_text(r.params), r.reason])
    return text_table(head, body)


def best_overrides(rep: StudyReport, number: int) -> dict[str, Any]:
    from .tune import Space

    row = next(r for r in rep.rows if r.number == number)
    return Space(Path("."), rep.preset, rep.base, []).overrides(row.params)


def best_set_lines(rep: StudyReport, number: int) -> list[str]:
    from .tune import Space

    row = next(r for r in rep.rows if r.number == number)
    return Space(Path("."), rep.preset, rep.base, []).set_lines(row.params)


def summary_text(rep: StudyReport) -> str:
    c = rep.counts
    lines = [f"study {rep.study}: {len(rep.rows)} trials (" + ", ".join(f"{v} {k}" for k, v in sorted(c.items())) + ")"]
    run, full = rep.steps_saved()
    if c.get("PRUNED"):
        lines.append(f"pruning: {c['PRUNED']} trials stopped early; {run} training steps run instead of {full} "
                     f"unpruned ({full - run} saved, {100 * (full - run) / max(full, 1):.0f} %)")
    base = next((r for r in rep.rows if r.baseline and r.state == "COMPLETE"), None)
    for n in rep.best:
        row = next(r for r in rep.rows if r.number == n)
        vs = f" ({row.val_psnr - base.val_psnr:+.3f} dB vs the baseline trial {base.number})" if base and \
            row.val_psnr is not None and base.val_psnr is not None else ""
        lat = f", {row.latency_ms:.2f} ms" if row.latency_ms is not None and len(rep.objectives) > 1 else ""
        lines.append(f"{'Pareto' if len(rep.objectives) > 1 else 'best'} trial {n}: val PSNR {row.val_psnr:.3f} dB"
                     f"{lat}{vs}")
        lines.append(f"  python cli.py train --preset {rep.preset} " + " ".join(best_set_lines(rep, n)))
    if rep.importances:
        lines.append(f"parameter importances (PED-ANOVA, {rep.importances_note}): " +
                     ", ".join(f"{k} {v:.2f}" for k, v in rep.importances.items()))
    elif rep.importances_note:
        lines.append(f"parameter importances: {rep.importances_note}")
    lines.append(f"dashboard: {rep.dashboard}")
    return "\n".join(lines)


def plot_history(rep: StudyReport, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    done = [r for r in rep.rows if r.state == "COMPLETE" and r.val_psnr is not None]
    pruned = [r for r in rep.rows if r.state == "PRUNED" and r.val_psnr is not None]
    ax.plot([r.number for r in done], [r.val_psnr for r in done], "o", label="complete (best val PSNR)")
    ax.plot([r.number for r in pruned], [r.val_psnr for r in pruned], "x", color="gray",
            label="pruned (last val PSNR)")
    best, xs, ys = -math.inf, [], []
    for r in sorted(done, key=lambda r: r.number):
        best = max(best, r.val_psnr)
        xs.append(r.number)
        ys.append(best)
    ax.step(xs, ys, where="post", color="C1", label="best so far")
    for r in rep.rows:
        if r.baseline and r.val_psnr is not None:
            ax.axhline(r.val_psnr, ls="--", color="C2", lw=1, label=f"baseline (trial {r.number})")
    ax.set(xlabel="trial", ylabel="val PSNR (dB)", title=f"study {rep.study}")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)


def plot_pareto(rep: StudyReport, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [r for r in rep.rows if r.state == "COMPLETE" and r.latency_ms is not None]
    front = sorted([r for r in pts if r.pareto], key=lambda r: r.latency_ms)
    ax.plot([r.latency_ms for r in pts], [r.val_psnr for r in pts], "o", alpha=0.5, label="trials")
    ax.plot([r.latency_ms for r in front], [r.val_psnr for r in front], "o-", color="C3", label="Pareto front")
    for r in front:
        ax.annotate(str(r.number), (r.latency_ms, r.val_psnr), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="deploy latency (ms)", ylabel="val PSNR (dB)", title=f"study {rep.study}: PSNR vs latency")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)


def write_outputs(rep: StudyReport, study_dir: Path, json_path: Path | None = None,
                  csv_path: Path | None = None) -> list[Path]:
    """best.yaml, history.png (and pareto.png); the JSON / CSV of the rows when asked. Returns what it wrote."""
    out = []
    study_dir.mkdir(parents=True, exist_ok=True)
    if rep.best and len(rep.objectives) == 1:
        keys = best_overrides(rep, rep.best[0])
        text = (f"# best trial {rep.best[0]} of study {rep.study}: python cli.py train --preset {rep.preset} "
                f"--config {study_dir / 'best.yaml'}\n" + yaml.safe_dump(keys, sort_keys=False))
        out.append(atomic_write_text(study_dir / "best.yaml", text))
    if any(r.state == "COMPLETE" for r in rep.rows):
        plot_history(rep, study_dir / "history.png")
        out.append(study_dir / "history.png")
        if len(rep.objectives) > 1:
            plot_pareto(rep, study_dir / "pareto.png")
            out.append(study_dir / "pareto.png")
    if json_path:
        data = {**asdict(rep), "summary": summary_text(rep).splitlines()}
        out.append(atomic_write_text(json_path, json.dumps(data, indent=1, default=str) + "\n"))
    if csv_path:
        from .report import csv_text

        cols = ["number", "state", "baseline", "val_psnr", "val_ssim", "latency_ms", "steps", "seconds", "params",
                "reason", "run_dir"]
        rows = [{**{k: getattr(r, k) for k in cols}, "params": _params_text(r.params)} for r in rep.rows]
        out.append(atomic_write_text(csv_path, csv_text(cols, rows, ".6g")))
    return out
