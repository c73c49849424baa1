"""Search over the training config on Optuna: ``python cli.py tune SPACE.yaml --study NAME``.

A study is a folder ``RUNS/NAME/`` holding the Optuna journal (``study.journal``, unless ``--storage`` names a
database) and one ordinary run directory per trial, ``trial-NNNN/`` (``config.json``, ``metrics.csv``,
checkpoints, TensorBoard), so ``python cli.py compare RUNS/NAME`` (or ``RUNS/NAME/*``) reads them. Each trial
trains in a subprocess of its own process group (``python cli.py train``, or ``torchrun`` with
``--gpus-per-trial``); the worker follows its ``metrics.csv``, reports every validation point to Optuna and
stops a pruned trial with SIGTERM (the trainer saves ``last.pt`` and exits cleanly). ``trial-NNNN/tune.json``
records the trial's state and the reason of a FAIL or PRUNE.

Workers: a second ``tune`` on the same study joins it; the trial cap (``--trials``) holds across workers (the
count and the ``ask`` run under one lock: a file lock for the journal, an advisory lock on PostgreSQL). A
worker killed mid-trial leaves its trial RUNNING: with the journal, the trial's lock file is free again (the
kernel drops a dead process's ``flock``); with a database, its heartbeats stop. The next worker to start a
trial marks it FAIL and re-queues its parameters, and the new trial resumes the same run directory from
``last.pt``. SIGINT/SIGTERM stop the current trial the same way (checkpoint saved, trial re-queued) and end
the worker.

The search space (YAML)::

    base: {preset: tiny, steps: 600, val_every: 100}   # any train config, as --set would give it
    space:
      lr: {low: 1.0e-4, high: 4.0e-3, log: true}
      model_args.width: {choices: [8, 12, 16]}
      dropout: {low: 0.0, high: 0.5, step: 0.1}
      model_args.heads: {choices: [1, 2], when: {model_args.block: cg}}   # only for one block kind
    pruner: asha                  # asha (asynchronous successive halving) | median
    budget: {parameters: 500000, gflop_256: 2.0, latency_ms: 30}   # constraints (a trial over one is not trained)
    latency: {size: 256x256}      # bench size of the deploy graph (latency_ms budget, --objective psnr,latency)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nafnet_core.errors import UserError
from nafnet_core.fileio import atomic_write_text

from .config import PRESETS as TRAIN_PRESETS
from .config import ConfigError, TrainConfig, build_config

#: What to install when Optuna is missing.
INSTALL_HINT = 'pip install -e ".[tune]"'
#: The journal file of a study (inside its folder) when no ``--storage`` is given.
JOURNAL_NAME = "study.journal"
#: Top-level keys of a space file.
SPACE_KEYS = ("base", "space", "pruner", "budget", "latency")
#: Budget keys: the parameter count, GFLOP at 256x256, and the deploy graph's latency (ms, ``latency.size``).
BUDGET_KEYS = ("parameters", "gflop_256", "latency_ms")
PRUNERS = ("asha", "median")
#: Keys that change the step grid (pruning compares validation points at equal steps of equal schedules).
SCHEDULE_KEYS = ("steps", "epochs", "val_every", "schedule", "warmup", "lr_min")
#: Seconds between two looks at a running trial's metrics.csv.
POLL_S = 0.5
#: Heartbeat interval and grace period of a database storage (seconds): a trial whose worker sent nothing for
#: the grace period is stale and re-queued.
HEARTBEAT_S, GRACE_S = 10, 120


class TuneError(UserError):
    """A space file, study or storage that is wrong; the message names it and says what to do."""


def optuna_module():
    """``optuna``, imported on first use; a missing extra is one line saying what to install."""
    try:
        import optuna
    except ImportError:
        raise TuneError(f"the tune commands need Optuna, which is not installed: {INSTALL_HINT}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# ---- the search space ---------------------------------------------------------------------------------


def _model_fields() -> dict[str, Any]:
    from nafnet_core.config import get_config

    return get_config("tiny").to_dict()


def _encode(value: Any) -> Any:
    """A categorical choice as Optuna stores it: scalars as they are, lists and mappings as JSON text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def _decode(value: Any, choices: list) -> Any:
    for c in choices:
        if _encode(c) == value:
            return c
    return value


@dataclass
class Param:
    """One searched key: ``kind`` float | int | categorical, with its range or choices and its condition."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list = field(default_factory=list)
    when: dict[str, list] = field(default_factory=dict)

    def distribution(self):
        """The Optuna distribution of this key."""
        d = optuna_module().distributions
        if self.kind == "categorical":
            return d.CategoricalDistribution([_encode(c) for c in self.choices])
        if self.kind == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return d.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial) -> Any:
        """This key's value for ``trial`` (its fixed value when the trial was enqueued with it)."""
        if self.kind == "categorical":
            return _decode(trial.suggest_categorical(self.key, [_encode(c) for c in self.choices]), self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        value = trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)
        return round(value, 12) if self.step else value  # 0.30000000000000004 -> 0.3

    def probes(self) -> list:
        """The values the space file is checked with before any training: the ends, or every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def active(self, values: dict[str, Any]) -> bool:
        """Whether the condition holds for the values of the keys so far (base config and earlier keys)."""
        return all(values.get(k) in allowed for k, allowed in self.when.items())


def _number(where: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TuneError(f"{where}: {name} must be a number, got {value!r}")
    return value


def _parse_param(where: str, key: str, spec: Any, field_type: Any) -> Param:
    if not isinstance(spec, dict):
        raise TuneError(f"{where}: expected a mapping such as {{low: 1e-4, high: 1e-2, log: true}} or "
                        f"{{choices: [a, b]}}, got {spec!r}")
    unknown = sorted(set(spec) - {"low", "high", "log", "step", "choices", "when", "type"})
    if unknown:
        raise TuneError(f"{where}: unknown field(s) {unknown}; use low/high/log/step, choices, when, type")
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise TuneError(f"{where}: when must map keys to a value or a list of values, got {when!r}")
    when = {str(k): (v if isinstance(v, list) else [v]) for k, v in when.items()}
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) - {"choices", "when"}:
            raise TuneError(f"{where}: choices cannot be combined with low/high/log/step/type")
        if not isinstance(choices, list) or not choices:
            raise TuneError(f"{where}: choices must be a non-empty list, got {choices!r}")
        if len({json.dumps(c, sort_keys=True) for c in choices}) != len(choices):
            raise TuneError(f"{where}: choices repeat a value: {choices}")
        return Param(key, "categorical", choices=choices, when=when)
    if "low" not in spec or "high" not in spec:
        raise TuneError(f"{where}: give low and high (a range) or choices (a list)")
    low, high = _number(where, "low", spec["low"]), _number(where, "high", spec["high"])
    step = spec.get("step")
    if step is not None:
        step = _number(where, "step", step)
        if step <= 0:
            raise TuneError(f"{where}: step must be > 0, got {step}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise TuneError(f"{where}: log must be true or false, got {log!r}")
    kind = spec.get("type")
    if kind is None:
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, step) if v is not None)
        kind = "int" if ints and field_type is not float else "float"
    if kind not in ("int", "float"):
        raise TuneError(f"{where}: type must be int or float, got {kind!r}")
    if not low < high:
        raise TuneError(f"{where}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise TuneError(f"{where}: a log range needs low > 0, got {low}")
    if log and step is not None and (kind == "float" or step != 1):
        raise TuneError(f"{where}: log and step cannot be combined")
    if kind == "int" and not all(float(v).is_integer() for v in (low, high, step) if v is not None):
        raise TuneError(f"{where}: an int range needs whole low/high/step, got {low}, {high}, {step}")
    return Param(key, kind, low=low, high=high, log=log, step=step, when=when)


@dataclass
class Space:
    """A parsed space file: the base config (``preset`` + keys), the searched keys, pruner, budgets, latency size."""

    path: Path
    preset: str
    base: dict[str, Any]
    params: list[Param]
    pruner: str = "asha"
    budget: dict[str, float] = field(default_factory=dict)
    latency_size: tuple[int, int] = (256, 256)

    def fingerprint(self) -> str:
        """A digest of everything that defines the search (not of the file's formatting)."""
        data = {"preset": self.preset, "base": self.base, "params": [dataclasses.asdict(p) for p in self.params],
                "budget": self.budget, "latency_size": list(self.latency_size)}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def overrides(self, values: dict[str, Any]) -> dict[str, Any]:
        """The train config keys of a trial: the base keys, then the trial's values (``model_args.X`` merged)."""
        out = json.loads(json.dumps(self.base))
        preset_args = dict(TRAIN_PRESETS[self.preset].get("model_args", {}))
        for key, value in values.items():
            if key.startswith("model_args."):
                args = out.setdefault("model_args", preset_args)
                args[key.split(".", 1)[1]] = value
            else:
                out[key] = value
        return out

    def config(self, values: dict[str, Any], data: str | None = None) -> TrainConfig:
        sets = self.overrides(values)
        if data is not None:
            sets["data"] = data
        return build_config(self.preset, sets=sets)

    def current(self, values: dict[str, Any]) -> dict[str, Any]:
        """Every key's value (flat, ``model_args.X`` too) of the base config with ``values`` over it."""
        cfg = build_config(self.preset, sets=self.overrides(values)).to_dict()
        flat = {k: v for k, v in cfg.items() if k != "model_args"}
        flat.update({f"model_args.{k}": v for k, v in cfg["model_args"].items()})
        return flat | values

    def sample(self, trial) -> dict[str, Any]:
        """The trial's values of the keys whose condition holds, in file order."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.active(self.current(values)):
                values[p.key] = p.suggest(trial)
        return values

    def set_lines(self, values: dict[str, Any]) -> list[str]:
        """``--set`` arguments that give a trial's config on top of ``--preset``."""
        def text(v):
            return v if isinstance(v, str) else json.dumps(v).replace('"', "")

        out = []
        for k, v in self.overrides(values).items():
            if isinstance(v, dict):
                inner = ", ".join(f"{a}: {text(b)}" for a, b in v.items())
                out.append(f"--set '{k}={{{inner}}}'")
            else:
                out.append(f"--set {k}={text(v)}")
        return out


def load_space(path: str | Path, *, prune: bool = True) -> Space:
    """Reads and checks a space file; every problem is one line naming the file and the key, before any training.

    Args:
        path: the YAML file.
        prune: pruning will be on: keys that change the step grid may then not be searched.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise TuneError(f"{path}: cannot read the space file: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise TuneError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise TuneError(f"{path}: expected a mapping with base: and space:, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SPACE_KEYS))
    if unknown:
        raise TuneError(f"{path}: unknown top-level key(s) {unknown}; known: {', '.join(SPACE_KEYS)}")
    base = dict(data.get("base") or {})
    preset = base.pop("preset", "gopro")
    if preset not in TRAIN_PRESETS:
        raise TuneError(f"{path}: base.preset {preset!r} is not a training preset; one of {', '.join(TRAIN_PRESETS)}")
    try:
        build_config(preset, sets=base)
    except ConfigError as e:
        raise TuneError(f"{path}: base: {e}") from None
    if not isinstance(data.get("space"), dict) or not data["space"]:
        raise TuneError(f"{path}: space: needs at least one key to search, e.g. lr: {{low: 1.0e-4, high: 4.0e-3, "
                        "log: true}")
    import typing

    hints = typing.get_type_hints(TrainConfig)
    model_fields = _model_fields()
    params: list[Param] = []
    for key, spec in data["space"].items():
        key = str(key)
        where = f"{path}: space.{key}"
        if key.startswith("model_args."):
            name = key.split(".", 1)[1]
            if name not in model_fields:
                raise TuneError(f"{where}: not a model option; known: {', '.join(sorted(model_fields))}")
            field_type = type(model_fields[name])
        elif key in hints and key != "model_args":
            field_type = hints[key]
        else:
            known = ", ".join(sorted(set(hints) - {"model_args"}))
            raise TuneError(f"{where}: not a train config key; use one of {known} or model_args.OPTION")
        if prune and key in SCHEDULE_KEYS:
            raise TuneError(f"{where}: changes the schedule, so validation points would not line up between trials; "
                            "pruning compares equal schedules only: fix it in base: or pass --no-prune")
        if prune and key == "batch" and base.get("epochs"):
            raise TuneError(f"{where}: with epochs in base the batch changes the number of steps; pruning needs equal "
                            "schedules: set steps instead of epochs, or pass --no-prune")
        p = _parse_param(where, key, spec, field_type)
        for k in p.when:
            known_key = k in hints or (k.startswith("model_args.") and k.split(".", 1)[1] in model_fields)
            if k not in [q.key for q in params] and not known_key:
                raise TuneError(f"{where}: when: {k!r} is neither a config key nor an earlier key of space:")
        params.append(p)
    space = Space(path, preset, base, params)
    check_probes(space, f"{path}: space.")
    pruner = data.get("pruner", "asha")
    if pruner not in PRUNERS:
        raise TuneError(f"{path}: pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    budget = data.get("budget") or {}
    if not isinstance(budget, dict) or set(budget) - set(BUDGET_KEYS):
        raise TuneError(f"{path}: budget: keys are {', '.join(BUDGET_KEYS)}, got {budget!r}")
    for k, v in budget.items():
        if _number(f"{path}: budget.{k}", "the budget", v) <= 0:
            raise TuneError(f"{path}: budget.{k} must be > 0, got {v}")
    latency = data.get("latency") or {}
    if not isinstance(latency, dict) or set(latency) - {"size"}:
        raise TuneError(f"{path}: latency: takes size: HxW (e.g. 256x256), got {latency!r}")
    size = (256, 256)
    if "size" in latency:
        from nafnet_core.cli_common import parse_size

        try:
            size = parse_size(str(latency["size"]))
        except ValueError as e:
            raise TuneError(f"{path}: latency.size: {e}") from None
        if size[0] % 16 or size[1] % 16:
            raise TuneError(f"{path}: latency.size: sides must be multiples of 16, got {size[0]}x{size[1]}")
    return dataclasses.replace(space, pruner=pruner, budget=dict(budget), latency_size=size)


def check_probes(space: Space, where: str) -> None:
    """Every end of every range and every choice must make a valid config (with its condition true)."""
    for p in space.params:
        cond = {k: v[0] for k, v in p.when.items()}
        for value in p.probes():
            try:
                space.config({**cond, p.key: value})
            except ConfigError as e:
                raise TuneError(f"{where}{p.key}: {value!r} does not give a valid config: {e}") from None


# ---- storage, study, locks -------------------------------------------------------------------------


def study_dir_of(runs: str | Path, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise TuneError(f"--study {name!r}: a study name is a folder name under --runs, e.g. tiny-lr")
    return Path(runs) / name


def open_storage(url: str | None, study_dir: Path, *, create: bool, stale_callback: Callable | None = None):
    """The study's storage: the journal file in ``study_dir``, or the database at ``url`` (heartbeats on)."""
    optuna = optuna_module()
    if url is None:
        path = study_dir / JOURNAL_NAME
        if not create and not path.is_file():
            raise TuneError(f"{path}: no study here; start one with python cli.py tune SPACE.yaml --study "
                            f"{study_dir.name}, or pass --runs / --storage")
        study_dir.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))
    try:
        # Two workers starting on an empty database would both create Optuna's tables, and PostgreSQL refuses the
        # second CREATE TABLE (a duplicate type name): the schema is created under an advisory lock.
        with pg_advisory_lock(url, "nafnet-tune:schema"):
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                              heartbeat_stale_trial_callback=stale_callback)
    except Exception as e:  # noqa: BLE001 - the driver's error types vary; the message says what failed
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TuneError(f"--storage {_safe_url(url)}: cannot open the database: {first}") from None


def _safe_url(url: str) -> str:
    """``url`` without its password."""
    import re

    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def sqlalchemy_url(url: str) -> str:
    """A ``postgresql://`` URL with the psycopg 3 driver named (the one the tune extra installs)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


@contextlib.contextmanager
def _flock(path: Path, *, block: bool = True) -> Iterator[bool]:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
            got = True
        except BlockingIOError:
            got = False
        yield got
    finally:
        os.close(fd)


@contextlib.contextmanager
def cap_lock(url: str | None, study_dir: Path, study_name: str) -> Iterator[None]:
    """Held while a worker counts the trials and asks for the next: the cap then holds across workers."""
    if url is None:
        with _flock(study_dir / ".ask.lock"):
            yield
        return
    # Other databases: the count and the ask are separate transactions (the cap can overshoot by one).
    with pg_advisory_lock(url, f"nafnet-tune:{study_name}"):
        yield


@contextlib.contextmanager
def pg_advisory_lock(url: str, name: str) -> Iterator[None]:
    """A PostgreSQL session advisory lock keyed by ``name``, held on its own connection; a no-op elsewhere."""
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy

    key = int(hashlib.sha256(name.encode()).hexdigest()[:15], 16)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


def superseded(trials) -> dict[int, int]:
    """Trial number -> the number of the trial that re-ran it (a requeue after a kill or a stop)."""
    return {t.user_attrs["resume_of"]: t.number for t in trials if isinstance(t.user_attrs.get("resume_of"), int)}


def counted(trials) -> list:
    """The trials that count towards the cap: all but those re-run by a later trial."""
    gone = superseded(trials)
    return [t for t in trials if t.number not in gone]


# ---- one trial's run directory ---------------------------------------------------------------------------


def cli_command() -> list[str]:
    """How to run this project's command line in a subprocess (``cli.py`` beside the ``train`` package)."""
    cli = Path(__file__).resolve().parent.parent / "cli.py"
    return [sys.executable, str(cli)] if cli.is_file() else [sys.executable, "-m", "cli"]


def _set_death_signal() -> None:
    """In the child: SIGTERM when the worker dies (Linux), so a killed worker's trial checkpoints and stops."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def read_val_points(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, val PSNR, val SSIM) of every validation row of ``run_dir/metrics.csv`` so far."""
    path = run_dir / "metrics.csv"
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return []
    out = []
    for r in rows:
        if r.get("kind") != "val":
            continue
        try:
            step, p = int(r["step"]), float(r["val_psnr"])
            s = float(r.get("val_ssim") or "nan")
        except (KeyError, TypeError, ValueError):
            continue
        out.append((step, p, s))
    return out


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.csv"
    try:
        with open(path, newline="") as f:
            steps = [int(r["step"]) for r in csv.DictReader(f) if str(r.get("step", "")).isdigit()]
    except OSError:
        return 0
    return max(steps, default=0)


def write_marker(run_dir: Path, **record) -> None:
    """``run_dir/tune.json``: the trial's study, number, state and reason, rewritten atomically."""
    path = run_dir / "tune.json"
    old = {}
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(path.read_text())
    try:
        atomic_write_text(path, json.dumps(old | record, indent=1, default=str) + "\n")
    except OSError as e:
        raise TuneError(f"{path}: cannot write the trial record: {e.strerror}") from None


def _reason(log: Path) -> str:
    """The one-line reason of a failed training: its ``Error:`` line, else its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"training exited and {log} cannot be read"
    for ln in reversed(lines):
        if ln.startswith("Error:") or ln.startswith("error:"):
            return ln.split(":", 1)[1].strip()
    return lines[-1][:300] if lines else "training exited without output"


def _wait_for_free(run_dir: Path, timeout: float = 180.0) -> None:
    """Waits until no process holds ``run_dir`` (a killed worker's trainer still saving its checkpoint)."""
    import fcntl

    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(run_dir, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TuneError(f"{run_dir}: still held by another process after {timeout:.0f} s; stop it and "
                                "start the worker again") from None
        finally:
            os.close(fd)
        time.sleep(0.5)


# ---- the worker ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """How one trial ended: state COMPLETE | PRUNED | FAIL | INTERRUPTED, its values and its record."""

    state: str
    values: list[float] | None = None
    reason: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkerSummary:
    """What one worker did, and the study's state when it ended."""

    ran: list[tuple[int, str, str]] = field(default_factory=list)  # (trial number, state, reason or value)
    stopped_by: str | None = None
    study_complete: int = 0
    study_failed: list[tuple[int, str]] = field(default_factory=list)
    study_trials: int = 0

    @property
    def all_failed(self) -> bool:
        return self.study_trials > 0 and self.study_complete == 0 and bool(self.study_failed)


@dataclass
class TuneSettings:
    """Everything a worker needs besides the space."""

    study: str
    runs: Path = Path("runs")
    storage: str | None = None
    trials: int = 16
    hours: float | None = None
    objectives: tuple[str, ...] = ("psnr",)
    prune: bool = True
    data: str | None = None
    device: str | None = None
    gpus_per_trial: int = 0
    seed: int | None = None
    evaluate_test: bool = False  # ablations: score each trial's best.pt on the test split (test.json)
    baseline: bool = True
    study_attrs: dict = field(default_factory=dict)  # recorded when the study is created (an ablation's levels)
    echo: Callable[[str], None] = print

    @property
    def study_dir(self) -> Path:
        return study_dir_of(self.runs, self.study)

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1


class Worker:
    """One worker of a study: asks for trials until the cap, the time budget or a stop signal, runs each as a
    training subprocess and tells Optuna how it ended."""

    def __init__(self, space: Space, settings: TuneSettings, *, enqueue: list[tuple[dict, dict]] | None = None):
        self.space, self.s = space, settings
        self.enqueue = enqueue or []
        self.stop_signal: str | None = None
        self.proc: subprocess.Popen | None = None
        self.optuna = optuna_module()
        self.url = sqlalchemy_url(settings.storage) if settings.storage else None

    def say(self, msg: str) -> None:
        self.s.echo(msg)

    # -- study ------------------------------------------------------------------------------------------

    def open_study(self):
        optuna, s = self.optuna, self.s
        self.storage = open_storage(self.url, s.study_dir, create=True, stale_callback=self._requeue_stale_rdb)
        s.study_dir.mkdir(parents=True, exist_ok=True)
        directions = ["maximize", "minimize"] if s.multi else ["maximize"]
        with _quiet_experimental(optuna):
            sampler = optuna.samplers.TPESampler(seed=s.seed, multivariate=True, group=True)
        if not s.prune or s.multi:
            pruner = optuna.pruners.NopPruner()
        elif self.space.pruner == "median":
            pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
        else:
            first = int(self.space.config({}).val_every)
            pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
        with cap_lock(self.url, s.study_dir, s.study), _quiet_experimental(optuna):
            study = optuna.create_study(study_name=s.study, storage=self.storage, directions=directions,
                                        sampler=sampler, pruner=pruner, load_if_exists=True)
            attrs = study.user_attrs
            mine = {"space": self.space.fingerprint(), "objectives": list(s.objectives), "preset": self.space.preset}
            if "space" not in attrs:
                for k, v in mine.items():
                    study.set_user_attr(k, v)
                study.set_user_attr("space_file", str(self.space.path))
                study.set_user_attr("base", self.space.base)
                study.set_user_attr("prune", s.prune and not s.multi)
                for k, v in s.study_attrs.items():
                    study.set_user_attr(k, v)
            else:
                if attrs["space"] != mine["space"]:
                    raise TuneError(f"study {s.study!r} was started from another search space "
                                    f"({attrs.get('space_file', '?')}); give that file, or another --study")
                if list(attrs.get("objectives", ["psnr"])) != list(s.objectives):
                    raise TuneError(f"study {s.study!r} optimises {','.join(attrs['objectives'])}; pass --objective "
                                    f"{','.join(attrs['objectives'])} or another --study")
            if not study.trials:
                if s.baseline:
                    study.enqueue_trial({}, user_attrs={"baseline": True})
                for params, user_attrs in self.enqueue:
                    study.enqueue_trial(params, user_attrs=user_attrs)
        self.study = study
        return study

    # -- stale trials ------------------------------------------------------------------------------------

    def _requeue(self, frozen, reason: str) -> None:
        attrs = {"resume_of": frozen.number, "run_dir": frozen.user_attrs.get("run_dir",
                                                                                 f"trial-{frozen.number:04d}")}
        for k in ("baseline", "variant"):
            if k in frozen.user_attrs:
                attrs[k] = frozen.user_attrs[k]
        self.study.enqueue_trial(dict(frozen.params), user_attrs=attrs)
        self.say(f"trial {frozen.number}: {reason}; re-queued with the same parameters to resume "
                 f"{attrs['run_dir']}/last.pt")

    def _requeue_stale_rdb(self, study, frozen) -> None:
        self.study = study
        self._requeue(frozen, "its worker stopped sending heartbeats")

    def requeue_stale(self) -> None:
        """Journal: RUNNING trials whose lock file nobody holds belong to a dead worker: FAIL and re-queue them.
        Database: :func:`optuna.storages.fail_stale_trials` (heartbeats) does the same."""
        TrialState = self.optuna.trial.TrialState
        if self.url is not None:
            self.optuna.storages.fail_stale_trials(self.study)
            return
        locks = self.s.study_dir / ".locks"
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            path = locks / f"trial-{t.number:04d}.lock"
            if not path.exists():
                continue  # asked, lock not yet taken (never outside the cap lock) or another host's
            with _flock(path, block=False) as free:
                if not free:
                    continue
                reason = "its worker died while it ran"
                sid = self.storage.get_study_id_from_name(self.s.study)
                tid = self.storage.get_trial_id_from_study_id_trial_number(sid, t.number)
                self.storage.set_trial_user_attr(tid, "fail_reason", f"{reason}; re-queued")
                self.storage.set_trial_state_values(tid, TrialState.FAIL)
                self._requeue(t, reason)

    # -- the loop ----------------------------------------------------------------------------------------

    def run(self) -> WorkerSummary:
        s = self.s
        self.open_study()
        summary = WorkerSummary()
        deadline = None if s.hours is None else time.monotonic() + s.hours * 3600
        (s.study_dir / ".locks").mkdir(exist_ok=True)
        TrialState = self.optuna.trial.TrialState
        with _stop_signals(self):
            while self.stop_signal is None:
                if deadline is not None and time.monotonic() > deadline:
                    self.say(f"time budget of {s.hours} h reached: no new trial")
                    break
                with cap_lock(self.url, s.study_dir, s.study):
                    self.requeue_stale()
                    # waiting trials (the baseline, a re-queued one) are asked for first; they count once started
                    n = sum(t.state != TrialState.WAITING for t in counted(self.study.get_trials(deepcopy=False)))
                    if n >= s.trials:
                        break
                    trial = self.study.ask()
                    if self.url is not None:
                        self.storage.record_heartbeat(trial._trial_id)
                    lock_path = s.study_dir / ".locks" / f"trial-{trial.number:04d}.lock"
                    lock = _flock(lock_path)
                    lock.__enter__()
                try:
                    outcome = self.run_trial(trial)
                except BaseException as e:  # a broken study folder or storage: record it, then stop
                    self.tell(trial, Outcome("FAIL", reason=str(e).splitlines()[0] if str(e) else type(e).__name__))
                    raise
                finally:
                    lock.__exit__(None, None, None)
                self.tell(trial, outcome)
                summary.ran.append((trial.number, outcome.state, outcome.reason or
                                    ", ".join(f"{v:.3f}" for v in outcome.values or [])))
                if outcome.state == "INTERRUPTED":
                    break
        summary.stopped_by = self.stop_signal
        trials = counted(self.study.get_trials(deepcopy=False))
        summary.study_trials = len(trials)
        summary.study_complete = sum(t.state == TrialState.COMPLETE for t in trials)
        summary.study_failed = [(t.number, t.user_attrs.get("fail_reason", "?")) for t in trials
                                if t.state == TrialState.FAIL]
        return summary

    def tell(self, trial, outcome: Outcome) -> None:
        TrialState = self.optuna.trial.TrialState
        for k, v in outcome.attrs.items():
            trial.set_user_attr(k, v)
        if outcome.state == "COMPLETE":
            self.study.tell(trial, outcome.values)
        elif outcome.state == "PRUNED":
            trial.set_user_attr("prune_reason", outcome.reason)
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            if outcome.state == "INTERRUPTED":
                self._requeue(self.storage.get_trial(trial._trial_id), outcome.reason)
            trial.set_user_attr("fail_reason", outcome.reason)
            self.study.tell(trial, state=TrialState.FAIL)

    # -- one trial ----------------------------------------------------------------------------------------

    def run_trial(self, trial) -> Outcome:
        s, space = self.s, self.space
        attrs = trial.user_attrs
        t0 = time.time()
        values = {} if attrs.get("baseline") else space.sample(trial)
        run_name = attrs.get("run_dir") or f"trial-{trial.number:04d}"
        run_dir = s.study_dir / run_name
        trial.set_user_attr("run_dir", run_name)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("set", space.set_lines(values))
        resume_of = attrs.get("resume_of")
        label = f"trial {trial.number}" + (" (baseline)" if attrs.get("baseline") else "") + \
            (f" (resumes trial {resume_of})" if resume_of is not None else "")
        self.say(f"{label}: {' '.join(space.set_lines(values)) or 'the base config'}")

        def done(state: str, reason: str = "", vals: list[float] | None = None, **extra) -> Outcome:
            rec = {"steps": last_step(run_dir), "seconds": round(time.time() - t0, 1), **extra}
            if run_dir.is_dir():
                write_marker(run_dir, state=state.lower(), reason=reason, value=vals, **rec)
            self.say(f"trial {trial.number}: {state}" + (f" ({reason})" if reason else "") +
                     (f", val PSNR {vals[0]:.3f} dB" if vals else ""))
            return Outcome(state, vals, reason, rec)

        try:
            cfg = space.config(values, data=s.data)
        except ConfigError as e:
            return done("FAIL", f"invalid config: {e}")
        # cost and budgets, before any training
        cost = self.cost(cfg, trial)
        over = [f"{k} {cost[k]:g} > {v:g}" for k, v in space.budget.items() if cost.get(k) is not None and cost[k] > v]
        if resume_of is not None and not run_dir.is_dir():
            return done("FAIL", f"{run_dir}: the run directory of trial {resume_of} was removed; cannot resume it")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TuneError(f"{run_dir}: cannot create the trial's run directory: {e.strerror}") from None
        write_marker(run_dir, study=s.study, trial=trial.number, params=values, baseline=bool(attrs.get("baseline")),
                     state="running", reason="", resume_of=resume_of, **cost)
        if over:
            return done("PRUNED", "over budget: " + ", ".join(over), **cost)
        resume = (run_dir / "last.pt").exists()
        outcome = self.train(trial, cfg, run_dir, resume, done)
        if outcome.state == "COMPLETE" and s.evaluate_test:
            err = self.evaluate_test(run_dir)
            if err:
                return done("FAIL", err)
        if s.multi and outcome.state == "COMPLETE":
            if cost.get("latency_ms") is None:
                return done("FAIL", "no latency measured for the deploy graph")
            outcome.values = [outcome.values[0], cost["latency_ms"]]
        outcome.attrs.update(cost)
        return outcome

    def cost(self, cfg: TrainConfig, trial) -> dict[str, Any]:
        """Parameters, GFLOP at 256x256 and (when a budget or the objective needs it) the deploy latency."""
        from .compare import _model_config, _model_cost

        mcfg = _model_config(cfg.to_dict())
        params, g256, _ = _model_cost(mcfg)
        out: dict[str, Any] = {"parameters": params, "gflop_256": g256}
        if self.s.multi or "latency_ms" in self.space.budget:
            from .latency import deploy_latency

            lat = deploy_latency(cfg, self.space.latency_size, cli_command(), echo=self.say)
            out |= {"latency_ms": lat["ms"], "latency_backend": lat["backend"],
                    "latency_size": "x".join(map(str, self.space.latency_size))}
        return out

    def _command(self, cfg: TrainConfig, run_dir: Path, resume: bool) -> tuple[list[str], dict[str, str]]:
        s = self.s
        env = dict(os.environ)
        base = cli_command()
        if s.gpus_per_trial > 1:
            base = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={s.gpus_per_trial}", base[-1] if base[1] != "-m" else "cli.py"]
        cmd = [*base, "train", "--runs", str(s.study_dir), "--name", run_dir.name, "--no-progress"]
        if resume:
            cmd.append("--resume")
        else:
            cfg_file = run_dir / "trial-config.json"
            atomic_write_text(cfg_file, json.dumps(cfg.to_dict(), indent=1) + "\n")
            cmd += ["--config", str(cfg_file)]
        if s.device:
            cmd += ["--device", s.device]
        return cmd, env

    def train(self, trial, cfg: TrainConfig, run_dir: Path, resume: bool, done) -> Outcome:
        s = self.s
        if resume:
            _wait_for_free(run_dir)
        cmd, env = self._command(cfg, run_dir, resume)
        log_path = run_dir / "train.log"
        seen: set[int] = set()
        last = cfg.steps if cfg.epochs is None else math.inf  # the final step (epochs: known to the trainer only)
        pruned_at: tuple[int, float] | None = None
        storage = self.storage
        beat = time.monotonic()
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            self.proc = proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True, preexec_fn=_set_death_signal)
            try:
                while True:
                    finished = proc.poll() is not None
                    if self.url is not None and time.monotonic() - beat > HEARTBEAT_S / 2:
                        storage.record_heartbeat(trial._trial_id)
                        beat = time.monotonic()
                    if not s.multi and pruned_at is None:
                        for step, p, _ in read_val_points(run_dir):
                            if step in seen:
                                continue
                            seen.add(step)
                            if not math.isfinite(p):
                                continue
                            trial.report(p, step)
                            # the last validation ends the run: pruning there would save nothing and discard a score
                            if s.prune and not finished and step < last and trial.should_prune():
                                pruned_at = (step, p)
                                self._terminate(proc)
                                break
                    if finished:
                        break
                    if self.stop_signal is not None:
                        self._terminate(proc)
                    time.sleep(POLL_S)
            finally:
                if proc.poll() is None:
                    self._terminate(proc)
                self.proc = None
        rc = proc.returncode
        points = read_val_points(run_dir)
        steps = last_step(run_dir)
        if pruned_at is not None:
            return done("PRUNED", f"pruned at step {pruned_at[0]} (val PSNR {pruned_at[1]:.3f} dB)")
        if self.stop_signal is not None:
            return done("INTERRUPTED", f"stopped by {self.stop_signal} at step {steps} (last.pt saved)")
        if rc != 0:
            return done("FAIL", _reason(log_path) + (f" (exit code {rc})" if rc > 0 else f" (signal {-rc})"))
        summary = _summary_line(log_path)
        if summary.startswith("interrupted"):
            return done("FAIL", f"training was stopped from outside the worker: {summary}")
        finite = [(st, p, ss) for st, p, ss in points if math.isfinite(p)]
        if not finite:
            return done("FAIL", "no finite validation PSNR in metrics.csv")
        best = max(finite, key=lambda x: x[1])
        return done("COMPLETE", "", [best[1]], best_step=best[0], best_ssim=best[2])

    def _terminate(self, proc: subprocess.Popen, grace: float = 120.0) -> None:
        """SIGTERM to the trial's process group (the trainer saves last.pt and exits), SIGKILL after ``grace``."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def evaluate_test(self, run_dir: Path) -> str:
        """Scores ``best.pt`` on the test split into ``test.json`` (per-image PSNR); returns an error or ''."""
        cmd = [*cli_command(), "eval", str(run_dir / "best.pt"), "--split", "test", "--json",
               str(run_dir / "test.json")]
        if self.s.device:
            cmd += ["--device", self.s.device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            return "test evaluation failed: " + (lines[-1] if lines else f"exit code {proc.returncode}")
        return ""


def _summary_line(log: Path) -> str:
    with contextlib.suppress(OSError):
        for ln in reversed(log.read_text(errors="replace").splitlines()):
            if ln.startswith(("done:", "interrupted:", "early_stop:", "stopped_at:")):
                return ln
    return ""


@contextlib.contextmanager
def _quiet_experimental(optuna) -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


@contextlib.contextmanager
def _stop_signals(worker: Worker) -> Iterator[None]:
    """SIGINT/SIGTERM: the running trial is stopped cleanly (SIGTERM to its process group) and the worker ends."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        worker.stop_signal = signal.Signals(signum).name
        if worker.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.proc.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def run_study(space: Space, settings: TuneSettings, **kw) -> WorkerSummary:
    """Runs one worker of the study ``settings.study`` until the cap, the time budget or a stop signal."""
    return Worker(space, settings, **kw).run()
