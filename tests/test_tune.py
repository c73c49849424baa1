"""The tuner: space files, studies of real training subprocesses, pruning, faults, PostgreSQL workers, ablations."""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from train.config import build_config, parse_sets

optuna = pytest.importorskip("optuna", reason="the tune extra is not installed (pip install -e '.[tune]')")

from train.ablate import (  # noqa: E402
    paired_delta,
    parse_factor,
    seed_noise_floor,
    split_levels,
    variant_label,
    variant_levels,
    verdict,
)
from train.tune import TuneError, load_space  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: A trial in seconds: the tiny model, 32x32 crops, batch 4, two validation images.
TINY = {"preset": "tiny", "crop": 32, "batch": 4, "val_max": 2, "tensorboard": "off", "log_every": 5,
        "save_every": 5, "workers": 0}


def write_space(path: Path, base: dict, space: dict, **top) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"base": base, "space": space, **top}, sort_keys=False))
    return path


def cli(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)


def load(study_dir: Path, name: str):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    st = JournalStorage(JournalFileBackend(str(study_dir / "study.journal")))
    return optuna.load_study(study_name=name, storage=st)


# ---- space files ----------------------------------------------------------------------------------------

GOOD = {"lr": {"low": 1e-4, "high": 4e-3, "log": True}, "model_args.width": {"choices": [8, 12, 16]},
        "loss": {"choices": ["psnr", "l1", "charbonnier"]}, "dropout": {"low": 0.0, "high": 0.5, "step": 0.1},
        "model_args.enc_blk_nums": {"choices": [[1, 1, 1, 1], [1, 1, 2, 2]]},
        "model_args.block": {"choices": ["naf", "cg"]},
        "model_args.heads": {"choices": [1, 2], "when": {"model_args.block": "cg"}}}


def test_space_parses_kinds_and_conditions(tmp_path):
    sp = load_space(write_space(tmp_path / "s.yaml", {"preset": "tiny", "steps": 600, "val_every": 100}, GOOD))
    kinds = {p.key: p.kind for p in sp.params}
    assert kinds == {"lr": "float", "model_args.width": "categorical", "loss": "categorical", "dropout": "float",
                     "model_args.enc_blk_nums": "categorical", "model_args.block": "categorical",
                     "model_args.heads": "categorical"}
    heads = sp.params[-1]
    assert not heads.active(sp.current({"model_args.block": "naf"}))
    assert heads.active(sp.current({"model_args.block": "cg"}))
    # a trial's values sampled by Optuna build a valid config, and its --set lines give the same config
    study = optuna.create_study()
    for _ in range(6):
        t = study.ask()
        values = sp.sample(t)
        assert ("model_args.heads" in values) == (values["model_args.block"] == "cg")
        cfg = sp.config(values)
        again = build_config("tiny", sets=parse_sets([s.split("=", 1)[0].replace("--set ", "").strip("'") + "=" +
                                                       s.split("=", 1)[1].rstrip("'") for s in sp.set_lines(values)]))
        assert again.to_dict() == cfg.to_dict()
        study.tell(t, 1.0)


@pytest.mark.parametrize(("space", "base", "needle"), [
    ({"lrr": {"low": 1, "high": 2}}, {}, "space.lrr: not a train config key"),
    ({"model_args.widht": {"choices": [8]}}, {}, "space.model_args.widht: not a model option"),
    ({"lr": {"low": 1e-2, "high": 1e-3}}, {}, "space.lr: low (0.01) must be below high (0.001)"),
    ({"lr": {"low": 0.0, "high": 1e-3, "log": True}}, {}, "space.lr: a log range needs low > 0"),
    ({"loss": {"choices": ["psnr", "mse"]}}, {}, "space.loss: 'mse' does not give a valid config"),
    ({"dropout": {"low": 0.0, "high": 1.5}}, {}, "space.dropout: 1.5 does not give a valid config"),
    ({"steps": {"low": 100, "high": 200}}, {}, "space.steps: changes the schedule"),
    ({"lr": {"choices": []}}, {}, "space.lr: choices must be a non-empty list"),
    ({"lr": {"low": 1e-3}}, {}, "space.lr: give low and high"),
    ({"lr": {"low": 1e-4, "high": 1e-3, "stepp": 1}}, {}, "space.lr: unknown field(s) ['stepp']"),
    ({"model_args.heads": {"choices": [1, 2], "when": {"model_args.blok": "cg"}}}, {}, "when: 'model_args.blok'"),
    ({"lr": {"low": 1e-4, "high": 1e-3}}, {"batchh": 2}, "base: "),
    ({"lr": {"low": 1e-4, "high": 1e-3}}, {"preset": "nope"}, "base.preset 'nope'"),
])
def test_bad_space_is_one_line_naming_the_key(tmp_path, space, base, needle):
    path = write_space(tmp_path / "s.yaml", base, space)
    with pytest.raises(TuneError) as e:
        load_space(path)
    msg = str(e.value)
    assert needle in msg and str(path) in msg and "\n" not in msg


def test_bad_space_stops_the_command_before_any_work(tmp_path):
    path = write_space(tmp_path / "s.yaml", {"preset": "tiny"}, {"loss": {"choices": ["psnr", "mse"]}})
    r = cli("tune", str(path), "--study", "x", "--runs", str(tmp_path / "runs"))
    assert r.returncode == 1
    assert "space.loss: 'mse' does not give a valid config" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_spent_time_budget_starts_no_trial(tmp_path):
    """--hours: no trial starts once the budget is spent (here at once); the baseline stays queued for the next
    start, and nothing failed, so the exit code is 0."""
    path = write_space(tmp_path / "s.yaml", {**TINY, "steps": 10, "val_every": 5}, {"lr": {"low": 1e-3, "high": 4e-3}})
    r = cli("tune", str(path), "--study", "h", "--runs", str(tmp_path / "runs"), "--hours", "1e-9")
    assert r.returncode == 0, r.stderr
    assert "time budget of 1e-09 h reached: no new trial" in r.stderr
    trials = load(tmp_path / "runs" / "h", "h").get_trials()
    assert [t.state.name for t in trials] == ["WAITING"] and trials[0].user_attrs["baseline"]
    assert not list((tmp_path / "runs" / "h").glob("trial-*"))


def test_missing_optuna_is_one_line_with_the_install_hint(monkeypatch):
    import train.tune as tune

    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(TuneError, match=r'pip install -e "\.\[tune\]"'):
        tune.optuna_module()


def test_tune_help_has_examples():
    from click.testing import CliRunner

    from cli import main

    for args in (["tune", "--help"], ["tune", "run", "--help"], ["tune", "report", "--help"],
                 ["tune", "ablate", "--help"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0 and "Example" in r.output, args


# ---- ablation statistics ---------------------------------------------------------------------------------------


def test_factor_parsing_and_variants():
    assert split_levels("[1,1],[2,2]") == ["[1,1]", "[2,2]"]
    assert parse_factor("dropout=0,0.5") == ("dropout", [0, 0.5])
    assert parse_factor("model_args.enc_blk_nums=[1,1,1,1],[1,1,2,2]")[1] == [[1, 1, 1, 1], [1, 1, 2, 2]]
    with pytest.raises(TuneError, match="at least two levels"):
        parse_factor("dropout=0")
    f = [("dropout", [0, 0.5]), ("crop_mode", ["resize", "random"])]
    ofat = variant_levels(f, factorial=False)
    assert ofat == [{"dropout": 0, "crop_mode": "resize"}, {"dropout": 0.5, "crop_mode": "resize"},
                    {"dropout": 0, "crop_mode": "random"}]
    assert len(variant_levels(f, factorial=True)) == 4
    assert variant_label(ofat[1], ofat[0]) == "dropout=0.5"


def test_paired_interval_and_seed_floor_against_hand_computation():
    from scipy.stats import t

    ref = {"a": 20.0, "b": 22.0, "c": 25.0, "d": 21.0}
    var = {"a": 20.5, "b": 22.7, "c": 25.4, "d": 21.6, "e": 30.0}  # e: not scored by the reference
    delta, ci, n = paired_delta(ref, var)
    d = [0.5, 0.7, 0.4, 0.6]
    mean = sum(d) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    assert n == 4
    assert delta == pytest.approx(0.55, abs=1e-12)
    assert ci == pytest.approx(t.ppf(0.975, 3) * sd / 2, rel=1e-9)
    groups = [[21.0, 21.2, 20.9], [21.5, 21.4, 21.9]]
    floor, pooled, k = seed_noise_floor(groups)
    ss = sum((x - sum(g) / 3) ** 2 for g in groups for x in g)
    assert k == 3
    assert pooled == pytest.approx(math.sqrt(ss / 4), rel=1e-12)
    assert floor == pytest.approx(t.ppf(0.975, 4) * pooled * math.sqrt(2 / 3), rel=1e-9)
    assert verdict(0.55, ci, 0.3) == "better than the reference"
    assert verdict(0.2, 0.1, 0.3) == "not distinguishable from seed noise"  # within the floor
    assert verdict(-0.5, 0.6, 0.1) == "not distinguishable from seed noise"  # interval covers zero
    assert verdict(-0.5, 0.1, 0.1) == "worse than the reference"


# ---- studies of real training runs --------------------------------------------------------------------------


def _trial_dirs(study_dir: Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(study_dir / "trial-*")))


@pytest.mark.slow
def test_study_runs_trials_as_runs_prunes_reports_and_continues(tmp_path):
    """Baseline first, every trial an ordinary run directory, a hopeless trial pruned at the first validation
    (lr 1e-6..1e-5 with dropout 0.5 against the baseline's 4e-3), report and compare read them, a rerun with a
    larger cap continues."""
    space = write_space(tmp_path / "s.yaml", {**TINY, "steps": 20, "val_every": 10},
                        {"dropout": {"choices": [0.5]}, "lr": {"low": 1e-6, "high": 1e-5, "log": True}})
    runs = tmp_path / "runs"
    r = cli("tune", str(space), "--study", "s", "--runs", str(runs), "--trials", "2", "--seed", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    sd = runs / "s"
    study = load(sd, "s")
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1]
    assert trials[0].user_attrs["baseline"] and trials[0].params == {}
    assert trials[0].state.name == "COMPLETE"
    assert trials[1].state.name == "PRUNED", r.stderr[-3000:]
    for t, d in zip(trials, _trial_dirs(sd)):
        assert d.name == f"trial-{t.number:04d}"
        for f in ("config.json", "metrics.csv", "last.pt", "tune.json", "train.log"):
            assert (d / f).is_file(), (d, f)
    marker = json.loads((sd / "trial-0001" / "tune.json").read_text())
    assert marker["state"] == "pruned" and marker["reason"].startswith("pruned at step 10")
    assert marker["steps"] == 10
    cfg1 = json.loads((sd / "trial-0001" / "config.json").read_text())
    assert cfg1["dropout"] == 0.5 and cfg1["steps"] == 20
    # the best value is the best validation PSNR in the run's metrics.csv
    with open(sd / "trial-0000" / "metrics.csv", newline="") as f:
        vals = [float(row["val_psnr"]) for row in csv.DictReader(f) if row["kind"] == "val"]
    assert trials[0].values[0] == pytest.approx(max(vals), abs=1e-9)

    rep = cli("tune", "report", "s", "--runs", str(runs), "--json", str(tmp_path / "rep.json"))
    assert rep.returncode == 0, rep.stderr
    assert "PRUNED" in rep.stdout and "pruned at step 10" in rep.stdout
    assert "python cli.py train --preset tiny" in rep.stdout and "optuna-dashboard" in rep.stdout
    assert "10 saved" in rep.stdout  # 20 + 10 steps run instead of 20 + 20
    assert (sd / "best.yaml").is_file() and (sd / "history.png").stat().st_size > 1000
    best = json.loads((tmp_path / "rep.json").read_text())
    assert best["best"] == [0]
    for args in ([str(sd)], glob.glob(str(sd / "*"))):  # the study folder, or a shell glob of it
        cmp_ = cli("compare", *args)
        assert cmp_.returncode == 0, cmp_.stderr
        assert "trial-0000" in cmp_.stdout and "trial-0001" in cmp_.stdout

    # a second start with a larger cap continues the same study: one more trial
    r2 = cli("tune", str(space), "--study", "s", "--runs", str(runs), "--trials", "3", "--seed", "0")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert len(load(sd, "s").get_trials()) == 3
    # another space file on the same study is refused
    other = write_space(tmp_path / "o.yaml", {**TINY, "steps": 20, "val_every": 10}, {"lr": {"choices": [1e-3]}})
    r3 = cli("tune", str(other), "--study", "s", "--runs", str(runs))
    assert r3.returncode == 1 and "was started from another search space" in r3.stderr


@pytest.mark.slow
def test_every_trial_failing_exits_nonzero_with_the_reason(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    space = write_space(tmp_path / "s.yaml", {**TINY, "steps": 10, "val_every": 5, "data": str(empty)},
                        {"lr": {"low": 1e-3, "high": 4e-3}})
    r = cli("tune", str(space), "--study", "f", "--runs", str(tmp_path / "runs"), "--trials", "2")
    assert r.returncode == 1
    assert "every trial of study f failed (2)" in r.stderr and str(empty) in r.stderr
    study = load(tmp_path / "runs" / "f", "f")
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "FAIL"]
    assert all(str(empty) in t.user_attrs["fail_reason"] for t in study.get_trials())
    assert all(t.values is None for t in study.get_trials())


def _wait_for_checkpoint(path: Path, proc: subprocess.Popen, step_at_least: int, timeout: float = 300) -> int:
    import torch

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "worker ended early"
        if path.exists():
            try:
                step = torch.load(path, weights_only=True)["extra"]["step"]
            except Exception:  # noqa: BLE001 - being renamed into place
                step = -1
            if step >= step_at_least:
                return step
        time.sleep(0.2)
    raise AssertionError(f"no {path} at step >= {step_at_least} within {timeout} s")


def _resumed_step(log: Path) -> int | None:
    for line in log.read_text().splitlines():
        if line.startswith("resumed ") and " at step " in line:
            return int(line.split(" at step ")[1].split("/")[0])
    return None


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill9", "sigterm"])
def test_stopped_worker_requeues_the_trial_and_it_resumes_from_last_pt(tmp_path, how):
    """kill -9 of the worker (its trainer checkpoints on the parent's death) or SIGTERM (a clean stop, exit 143):
    the next start re-queues the trial with the same parameters and resumes its run directory from last.pt."""
    space = write_space(tmp_path / "s.yaml", {**TINY, "steps": 60, "val_every": 30, "save_every": 5},
                        {"lr": {"low": 1e-3, "high": 4e-3, "log": True}})
    runs = tmp_path / "runs"
    args = [sys.executable, str(ROOT / "cli.py"), "tune", str(space), "--study", "k", "--runs", str(runs),
            "--trials", "2", "--no-prune", "--seed", "1"]
    # trial 0 is the baseline; stop the worker during trial 1 (it has parameters)
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(runs / "k" / "trial-0001" / "last.pt", proc, 10)
        os.kill(proc.pid, signal.SIGKILL if how == "kill9" else signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    if how == "sigterm":
        assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
        assert "stopped by SIGTERM" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    before = load(runs / "k", "k").get_trials()
    params_1 = before[1].params
    assert params_1
    r = cli("tune", str(space), "--study", "k", "--runs", str(runs), "--trials", "2", "--no-prune", "--seed", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    trials = load(runs / "k", "k").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    resumed = trials[2]
    assert resumed.user_attrs["resume_of"] == 1 and resumed.params == params_1
    assert resumed.user_attrs["run_dir"] == "trial-0001"
    log = runs / "k" / "trial-0001" / "train.log"
    step = _resumed_step(log)
    assert step is not None and step >= 10, log.read_text()[-2000:]  # resumed, not restarted
    assert json.loads((runs / "k" / "trial-0001" / "tune.json").read_text())["state"] == "complete"
    assert not (runs / "k" / "trial-0002").exists()  # no second run directory for the same trial
    rep = cli("tune", "report", "k", "--runs", str(runs))
    assert "REQUEUED" in rep.stdout and "resumed as trial 2" in rep.stdout


# ---- two workers on a real PostgreSQL server ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture
def postgres():
    """A PostgreSQL server in a temp folder on a free loopback port (as `nobody` when run as root: initdb
    refuses root); stopped by its PID in teardown."""
    pg = _pg_bin()
    if pg is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)")
    pytest.importorskip("psycopg", reason="psycopg comes with the tune extra")
    tmp = Path(tempfile.mkdtemp(prefix="nafnet-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(tmp, "nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    port = _free_port()
    data = tmp / "data"
    subprocess.run([*as_user, str(pg / "initdb"), "-D", str(data), "-A", "trust", "-U", "tune"], check=True,
                   capture_output=True)
    subprocess.run([*as_user, str(pg / "pg_ctl"), "-D", str(data), "-l", str(tmp / "log"), "-w", "-o",
                    f"-k {tmp} -c listen_addresses=127.0.0.1 -p {port}", "start"], check=True, capture_output=True)
    pid = int((data / "postmaster.pid").read_text().split()[0])
    try:
        yield f"postgresql://tune@127.0.0.1:{port}/postgres"
    finally:
        os.kill(pid, signal.SIGINT)  # fast shutdown
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        shutil.rmtree(tmp, ignore_errors=True)


_OPEN_STORAGE = """
import sys, time
from pathlib import Path
from train.tune import open_storage, sqlalchemy_url
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
open_storage(sqlalchemy_url(sys.argv[1]), Path(sys.argv[3]), create=True)
"""


@pytest.mark.slow
def test_workers_opening_an_empty_database_at_once_all_succeed(tmp_path, postgres):
    # Each process creates Optuna's schema unless another holds the schema lock; released together.
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_STORAGE, postgres, str(go), str(tmp_path / f"s{i}")],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    time.sleep(3)  # every process imported optuna and waits on the file
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1][-1500:] for o in outs]


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study_without_running_a_trial_twice(tmp_path, postgres):
    space = write_space(tmp_path / "s.yaml", {**TINY, "steps": 10, "val_every": 5},
                        {"lr": {"low": 1e-3, "high": 4e-3, "log": True}})
    runs = tmp_path / "runs"
    args = [sys.executable, str(ROOT / "cli.py"), "tune", str(space), "--study", "pg", "--runs", str(runs),
            "--trials", "5", "--storage", postgres, "--no-prune"]
    workers = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1][-2000:] for o in outs]
    study = optuna.load_study(study_name="pg", storage=postgres.replace("postgresql://", "postgresql+psycopg://"))
    trials = study.get_trials()
    assert len(trials) == 5  # the cap holds across the workers
    assert all(t.state.name == "COMPLETE" for t in trials)
    workers_seen = {t.user_attrs["worker"] for t in trials}
    assert len(workers_seen) == 2  # both did work
    dirs = _trial_dirs(runs / "pg")
    assert [d.name for d in dirs] == [f"trial-{n:04d}" for n in range(5)]
    for d in dirs:  # each trial trained exactly once
        assert d.joinpath("train.log").read_text().count("$ ") == 1
    rep = cli("tune", "report", "pg", "--runs", str(runs), "--storage", postgres)
    assert rep.returncode == 0 and "5 COMPLETE" in rep.stdout


# ---- ablation end to end ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ablation_runs_variants_over_seeds_and_reports_paired_intervals(tmp_path):
    base = tmp_path / "base.yaml"
    import yaml

    base.write_text(yaml.safe_dump({**TINY, "steps": 10, "val_every": 10}))
    r = cli("tune", "ablate", str(base), "--factor", "dropout=0,0.5", "--seeds", "2", "--study", "ab", "--runs",
            str(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr[-3000:]
    study = load(tmp_path / "runs" / "ab", "ab")
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    assert sorted((t.params["dropout"], t.params["seed"]) for t in trials) == [(0, 0), (0, 1), (0.5, 0), (0.5, 1)]
    for t in trials:
        test = json.loads((tmp_path / "runs" / "ab" / t.user_attrs["run_dir"] / "test.json").read_text())
        assert test["split"] == "test" and len(test["per_image"]) >= 2
    assert "reference (dropout=0)" in r.stdout and "dropout=0.5" in r.stdout
    assert "seed-noise floor: ±" in r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("dropout=0.5"))
    assert "±" in line and ("distinguishable" in line or "reference" in line)


# ---- latency objective ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_latency_objective_gives_a_pareto_front_with_one_measurement_per_architecture(tmp_path):
    space = write_space(tmp_path / "s.yaml", {**TINY, "steps": 10, "val_every": 5},
                        {"model_args.width": {"choices": [8]}, "lr": {"low": 1e-3, "high": 4e-3}},
                        latency={"size": "64x64"})
    cache = tmp_path / "latency.json"
    env = {**os.environ, "NAFNET_LATENCY_CACHE": str(cache)}
    r = cli("tune", str(space), "--study", "p", "--runs", str(tmp_path / "runs"), "--trials", "3",
            "--objective", "psnr,latency", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("latency: exporting and benchmarking") == 1  # trials 1 and 2: the same architecture
    entries = json.loads(cache.read_text())
    assert len(entries) == 1
    (entry,) = entries.values()
    assert entry["ms"] > 0 and entry["size"] == "64x64" and entry["backend"].split()[0] in ("onnxrt", "openvino")
    trials = load(tmp_path / "runs" / "p", "p").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert [len(t.values) for t in trials] == [2, 2, 2]
    assert all(t.values[1] == pytest.approx(entry["ms"]) for t in trials)  # same width 8 and crop: one graph
    rep = cli("tune", "report", "p", "--runs", str(tmp_path / "runs"))
    assert rep.returncode == 0 and "Pareto trial" in rep.stdout
    assert (tmp_path / "runs" / "p" / "pareto.png").stat().st_size > 1000
