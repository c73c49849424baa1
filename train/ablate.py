"""Ablations over seeds (``python cli.py tune ablate BASE --factor KEY=V1,V2 --seeds K``) and their statistics.

The variants are the reference (the first level of every factor) and one factor changed at a time (or, with
``--factorial``, every combination); each trains with seeds ``0..K-1`` as a trial of an Optuna study whose
trials are all enqueued up front (so workers share it, and a stopped ablation continues, like any study), and
each trained run is scored on the test split (``test.json``, per image, TLC).

For a variant V against the reference R, with ``v_si`` / ``r_si`` the test PSNR of image i in seed s:

- ΔPSNR = mean over images of ``d_i = mean_s v_si - mean_s r_si``, its 95 % interval
  ``± t(0.975, n-1) · sd(d) / sqrt(n)`` (paired per image: the same image's difficulty cancels);
- the seed-noise floor: the pooled standard deviation ``s`` of the per-seed mean test PSNR within every variant
  (degrees of freedom ``Σ (K_v - 1)``), as the 95 % half-width of a difference of two K-seed means,
  ``t(0.975, df) · s · sqrt(2 / K)``: what two identical configs trained with different seeds differ by;
- "not distinguishable from seed noise" when the interval covers zero or ``|Δ|`` is within the floor.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PRESETS as TRAIN_PRESETS
from .config import ConfigError, load_config_file, parse_value
from .tune import (
    Param,
    Space,
    TuneError,
    TuneSettings,
    WorkerSummary,
    _encode,
    check_probes,
    counted,
    open_storage,
    optuna_module,
    run_study,
    sqlalchemy_url,
)


def split_levels(text: str) -> list[str]:
    """``"0,0.5"`` -> ["0", "0.5"]; commas inside brackets or braces stay (``[1,1],[2,2]``)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [x.strip() for x in out]


def parse_factor(text: str) -> tuple[str, list[Any]]:
    key, sep, levels = text.partition("=")
    key = key.strip()
    if not sep or not key or not levels.strip():
        raise TuneError(f"--factor {text!r}: expected KEY=V1,V2 (e.g. dropout=0,0.5)")
    values = [parse_value(v) for v in split_levels(levels)]
    if len(values) < 2:
        raise TuneError(f"--factor {text!r}: needs at least two levels (the first is the reference)")
    if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
        raise TuneError(f"--factor {text!r}: a level is repeated")
    return key, values


def load_base(base: str, sets: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(training preset, config keys) of BASE: a preset name, a YAML/JSON config file, or a space file's base:."""
    if base in TRAIN_PRESETS:
        return base, dict(sets)
    path = Path(base)
    if not path.is_file():
        raise TuneError(f"{base}: neither a training preset ({', '.join(TRAIN_PRESETS)}) nor a config file")
    try:
        data = load_config_file(path)
    except ConfigError as e:
        raise TuneError(str(e)) from None
    if "space" in data or "base" in data:
        data = dict(data.get("base") or {})
    preset = data.pop("preset", "gopro")
    if preset not in TRAIN_PRESETS:
        raise TuneError(f"{path}: preset {preset!r} is not a training preset; one of {', '.join(TRAIN_PRESETS)}")
    return preset, {**data, **sets}


def variant_levels(factors: list[tuple[str, list]], factorial: bool) -> list[dict[str, Any]]:
    """The reference (first levels) first, then one factor changed at a time, or every combination."""
    ref = {k: v[0] for k, v in factors}
    if factorial:
        return [dict(zip([k for k, _ in factors], combo)) for combo in itertools.product(*[v for _, v in factors])]
    out = [ref]
    for k, values in factors:
        out += [{**ref, k: v} for v in values[1:]]
    return out


def variant_label(levels: dict[str, Any], ref: dict[str, Any]) -> str:
    diff = {k: v for k, v in levels.items() if v != ref[k]}
    if not diff:
        return "reference (" + " ".join(f"{k.replace('model_args.', '')}={v}" for k, v in levels.items()) + ")"
    return " ".join(f"{k.replace('model_args.', '')}={v}" for k, v in diff.items())


def run_ablation(base: str, factor_texts: list[str], *, seeds: int, factorial: bool, sets: dict[str, Any],
                 settings: TuneSettings) -> WorkerSummary:
    """Enqueues every variant x seed as a trial (first start only) and runs this worker until all are done."""
    factors = [parse_factor(f) for f in factor_texts]
    keys = [k for k, _ in factors]
    if len(set(keys)) != len(keys):
        raise TuneError(f"--factor: a key is given twice: {keys}")
    if "seed" in keys:
        raise TuneError("--factor seed=...: seeds are what --seeds varies; pass --seeds K instead")
    preset, base_keys = load_base(base, sets)
    where = f"{base}: "
    try:
        Space(Path(base), preset, base_keys, []).config({}, data=settings.data)
    except ConfigError as e:
        raise TuneError(f"{where}{e}") from None
    params = [Param(k, "categorical", choices=v) for k, v in factors]
    params.append(Param("seed", "categorical", choices=list(range(seeds))))
    space = Space(Path(base), preset, base_keys, params)
    check_probes(space, "--factor ")
    levels = variant_levels(factors, factorial)
    ref = levels[0]
    enqueue = []
    for lv in levels:
        label = variant_label(lv, ref)
        for s in range(seeds):
            enqueue.append(({k: _encode(v) for k, v in lv.items()} | {"seed": s},
                            {"variant": label, "reference": lv == ref}))
    settings.trials = len(enqueue)
    settings.study_attrs = {"ablation": True, "factors": [[k, v] for k, v in factors], "seeds": seeds,
                            "factorial": factorial}
    settings.echo(f"ablation {settings.study}: {len(levels)} variants x {seeds} seeds = {len(enqueue)} runs")
    return run_study(space, settings, enqueue=enqueue)


# ---- statistics ------------------------------------------------------------------------------------------


def t_quantile(df: int, q: float = 0.975) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df))


@dataclass
class VariantStats:
    label: str
    reference: bool
    seeds: list[int] = field(default_factory=list)
    seed_means: list[float] = field(default_factory=list)  # mean test PSNR of each seed's run
    images: int = 0
    delta: float | None = None
    ci: float | None = None
    verdict: str = ""

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.seed_means) if self.seed_means else None

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.seed_means) if len(self.seed_means) > 1 else None


@dataclass
class Ablation:
    study: str
    variants: list[VariantStats]
    floor: float | None
    pooled_sd: float | None
    seeds: int
    missing: list[str] = field(default_factory=list)


def _per_image(run_dir: Path) -> dict[str, float] | None:
    try:
        data = json.loads((run_dir / "test.json").read_text())
    except (OSError, ValueError):
        return None
    rows = data.get("per_image") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        return None
    return {r["name"]: float(r["psnr"]) for r in rows if isinstance(r, dict) and "name" in r and "psnr" in r}


def is_ablation(study_dir: Path, storage: str | None, name: str) -> bool:
    optuna = optuna_module()
    st = open_storage(sqlalchemy_url(storage) if storage else None, study_dir, create=False)
    return bool(optuna.load_study(study_name=name, storage=st).user_attrs.get("ablation"))


def load_ablation(name: str, runs: Path, storage: str | None) -> Ablation:
    optuna = optuna_module()
    study_dir = runs / name
    st = open_storage(sqlalchemy_url(storage) if storage else None, study_dir, create=False)
    study = optuna.load_study(study_name=name, storage=st)
    runs_of: dict[str, list[tuple[int, dict[str, float]]]] = {}
    order: list[tuple[str, bool]] = []
    missing = []
    for t in sorted(counted(study.get_trials(deepcopy=False)), key=lambda t: t.number):
        label = t.user_attrs.get("variant")
        if label is None:
            continue
        if (label, bool(t.user_attrs.get("reference"))) not in order:
            order.append((label, bool(t.user_attrs.get("reference"))))
        if t.state.name != "COMPLETE":
            missing.append(f"trial {t.number} ({label}, seed {t.params.get('seed')}): {t.state.name}")
            continue
        per = _per_image(study_dir / t.user_attrs.get("run_dir", f"trial-{t.number:04d}"))
        if per is None:
            missing.append(f"trial {t.number} ({label}): no test.json")
            continue
        runs_of.setdefault(label, []).append((int(t.params.get("seed", 0)), per))
    stats = []
    for label, is_ref in order:
        runs_ = runs_of.get(label, [])
        stats.append(VariantStats(label, is_ref, seeds=[s for s, _ in runs_],
                                  seed_means=[statistics.fmean(p.values()) for _, p in runs_ if p]))
    floor, pooled, k = seed_noise_floor([v.seed_means for v in stats])
    ref = next((v for v in stats if v.reference), None)
    if ref is not None and runs_of.get(ref.label):
        ref_img = _image_means(runs_of[ref.label])
        for v in stats:
            if v is ref or not runs_of.get(v.label):
                continue
            v.delta, v.ci, v.images = paired_delta(ref_img, _image_means(runs_of[v.label]))
            v.verdict = verdict(v.delta, v.ci, floor)
        ref.images = len(ref_img)
    return Ablation(study=name, variants=stats, floor=floor, pooled_sd=pooled, seeds=k, missing=missing)


def seed_noise_floor(groups: list[list[float]]) -> tuple[float | None, float | None, int]:
    """(floor, pooled sd, seeds per variant) from each variant's per-seed mean test PSNR (module docstring)."""
    ss = sum(sum((m - statistics.fmean(g)) ** 2 for m in g) for g in groups if len(g) > 1)
    df = sum(len(g) - 1 for g in groups if len(g) > 1)
    pooled = math.sqrt(ss / df) if df > 0 else None
    k = min((len(g) for g in groups if g), default=0)
    floor = t_quantile(df) * pooled * math.sqrt(2 / k) if pooled is not None and k else None
    return floor, pooled, k


def paired_delta(ref: dict[str, float], var: dict[str, float]) -> tuple[float | None, float | None, int]:
    """(mean ΔPSNR, 95 % half-width, images) of ``var - ref`` paired per image (the images both scored)."""
    d = [var[n] - ref[n] for n in sorted(set(ref) & set(var))]
    if not d:
        return None, None, 0
    ci = t_quantile(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None
    return statistics.fmean(d), ci, len(d)


def verdict(delta: float | None, ci: float | None, floor: float | None) -> str:
    if delta is None:
        return "no common test images"
    if ci is None or floor is None:
        return "needs 2+ images and 2+ seeds to judge"
    if abs(delta) <= ci or abs(delta) <= floor:
        return "not distinguishable from seed noise"
    return "better than the reference" if delta > 0 else "worse than the reference"


def _image_means(runs_: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Per image, the mean test PSNR over the seeds (images every seed scored)."""
    names = set.intersection(*(set(p) for _, p in runs_))
    return {n: statistics.fmean(p[n] for _, p in runs_) for n in names}


def ablation_table(ab: Ablation) -> str:
    from nafnet_core.cli_common import fmt, text_table

    head = ["variant", "seeds", "test PSNR (mean ± sd over seeds)", "ΔPSNR vs reference", "95 % interval",
            "images", "verdict"]
    body = []
    for v in ab.variants:
        body.append([v.label, str(len(v.seed_means)),
                     "-" if v.mean is None else f"{v.mean:.3f} ± {fmt(v.sd, '.3f')}",
                     "(reference)" if v.reference else fmt(v.delta, "+.3f"),
                     "" if v.reference else ("-" if v.ci is None else f"±{v.ci:.3f}"), str(v.images),
                     "" if v.reference else v.verdict])
    lines = [text_table(head, body)]
    if ab.floor is not None:
        lines.append(f"seed-noise floor: ±{ab.floor:.3f} dB (95 % half-width of a difference of two {ab.seeds}-seed "
                     f"means; pooled sd of the per-seed means {ab.pooled_sd:.3f} dB)")
    else:
        lines.append("seed-noise floor: needs 2+ seeds of a variant")
    lines += [f"missing: {m}" for m in ab.missing]
    return "\n".join(lines)
