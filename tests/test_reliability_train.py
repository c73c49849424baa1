"""Reliability of ``train``: bad inputs, kills at random points, signals, tampered state, configs.

Already covered in tests/test_train.py (not repeated here): SIGTERM saves last.pt and exits 0, one
SIGKILL then resume finishes all steps with a continuous metrics.csv, a non-finite loss stops with the
last good checkpoint kept, bad data fails before any step, exact resume.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from nafnet_core import load_checkpoint
from tests.reliability_cases import CASES, OK, deny_read, make_dataset, one_line_naming, unreadable_paths

ROOT = Path(__file__).resolve().parents[1]
SETS = ["--set", "crop=32", "--set", "batch=2", "--set", "val_max=1", "--set", "log_every=1", "--set", "workers=0"]


def _sets(**kw) -> list[str]:
    return [a for k, v in kw.items() for a in ("--set", f"{k}={v}")]


# ------------------------------------------------------------------------------------------- bad inputs

def test_bad_files_fail_before_any_step_each_named(tmp_path):
    """Every case in the train split at once: one error listing each bad or too-small file; no step runs."""
    root = make_dataset(tmp_path / "ds", CASES, test=False)
    runs = tmp_path / "runs"
    with deny_read(unreadable_paths(root)):
        res = CliRunner().invoke(main, ["train", "--preset", "tiny", "--data", str(root), "--runs", str(runs),
                                        "--no-progress", *SETS, *_sets(steps=2)])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert res.output.startswith("Error: dataset")
    for case in CASES:
        path = root / "train" / "blur" / case.file_name
        if case.small:
            assert one_line_naming(res.output, path, "smaller than the training crop 32"), case.name
        elif case.outcome == "error" and not case.header_ok:
            assert one_line_naming(res.output, path, case.message), case.name
        else:  # decodable, or bad only past the header (see the next test)
            assert str(path) not in res.output, case.name
    assert not (runs / "tiny" / "last.pt").exists()


@pytest.mark.parametrize("case", [c for c in CASES if c.header_ok], ids=[c.name for c in CASES if c.header_ok])
def test_file_bad_past_its_header_stops_with_last_saved(tmp_path, case):
    """The header pre-check passes it; the decode fails: one line naming the file, last.pt saved, exit 1."""
    root = make_dataset(tmp_path / "ds", [case], test=False)
    runs = tmp_path / "runs"
    res = CliRunner().invoke(main, ["train", "--preset", "tiny", "--data", str(root), "--runs", str(runs),
                                    "--no-progress", *SETS, *_sets(steps=50, cache="off")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, res.output
    assert any(str(root / "train" / kind / case.file_name) in lines[0] for kind in ("blur", "sharp")), res.output
    assert case.message in lines[0] and "then --resume" in lines[0]
    last = load_checkpoint(runs / "tiny" / "last.pt")  # the state before the bad batch, resumable
    assert f"at step {last.extra['step']}." in lines[0]


def test_unusual_but_valid_files_train(tmp_path):
    """16-bit, palette, gray, RGBA, CMYK, float TIFF and non-ASCII names: a short run trains on them all."""
    from train.config import build_config
    from train.loop import train

    cases = [c for c in OK if not c.small]
    root = make_dataset(tmp_path / "ds", cases, n_good=0)
    cfg = build_config("tiny", sets={"data": str(root), "crop": 32, "batch": len(cases), "steps": 2, "val_every": 2,
                                     "log_every": 1, "workers": 0, "crop_mode": "center"})
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.status == "done" and result.step == 2
    assert result.last_val["images"] == len(cases) // 2 + len(cases) % 2  # the val half of the test folder


def test_unscorable_validation_pair_stops_with_last_saved(tmp_path):
    """A validation image below the 11x11 SSIM window: one error naming it at the first validation, and
    last.pt saved at that step (the steps since the last save are kept)."""
    from PIL import Image

    from tests.reliability_cases import pixels
    from train.config import build_config
    from train.loop import TrainingError, train

    root = make_dataset(tmp_path / "ds", [], n_good=2)
    for kind in ("blur", "sharp"):  # sorts first: in the val half
        Image.fromarray(pixels(8, 8)).save(root / "test" / kind / "a0.png")
    cfg = build_config("tiny", sets={"data": str(root), "crop": 32, "batch": 2, "steps": 10, "val_every": 3,
                                     "save_every": 100, "workers": 0})
    with pytest.raises(TrainingError, match=r"a0.png: 8x8 is too small to score.*Saved .*last.pt at step 3"):
        train(cfg, tmp_path / "run", progress=False)
    assert load_checkpoint(tmp_path / "run" / "last.pt").extra["step"] == 3


# --------------------------------------------------------------------------------------- kills and signals

def _checkpoints_all_load(run_dir: Path) -> dict[str, int]:
    """Loads every checkpoint under its final name (never a partial one); returns name -> stored step."""
    steps = {}
    for path in sorted(run_dir.glob("*.pt")):
        steps[path.name] = load_checkpoint(path).extra["step"]
    return steps


def _run_until(proc: subprocess.Popen, run_dir: Path, min_step: int, timeout: float = 180) -> int:
    """Polls (loading every checkpoint each time) until last.pt holds ``min_step``; returns its step."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = _checkpoints_all_load(run_dir) if run_dir.exists() else {}
        if steps.get("last.pt", -1) >= min_step:
            return steps["last.pt"]
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"last.pt did not reach step {min_step} in {timeout} s")


@pytest.mark.slow
def test_kill9_at_random_points_then_resume(tmp_path):
    """SIGINT once, then SIGKILL at 3 seeded-random moments (checkpoints are written every step, so some
    kills land mid-write); after each, every checkpoint on disk loads; the final resume ends at the right
    step with a continuous metrics.csv."""
    total = 60
    root = make_dataset(tmp_path / "ds", [], n_good=4)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, str(ROOT / "cli.py"), "train", "--data", str(root), "--runs", str(tmp_path),
            "--name", "k", "--no-progress"]
    run_dir = tmp_path / "k"
    fresh = base + ["--preset", "tiny", *SETS, *_sets(steps=total, save_every=1, val_every=15)]
    rng = random.Random(6)
    stderr = subprocess.PIPE

    # SIGINT (Ctrl-C): saves last.pt and exits 0.
    p = subprocess.Popen(fresh, env=env, stderr=stderr, text=True, cwd=tmp_path)
    _run_until(p, run_dir, 2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    assert "SIGINT received: saved" in err
    step = _checkpoints_all_load(run_dir)["last.pt"]

    kills = []
    for _ in range(3):
        p = subprocess.Popen(base + ["--resume"], env=env, stderr=stderr, text=True, cwd=tmp_path)
        _run_until(p, run_dir, step + 1)  # training again (not still starting up)
        deadline = time.time() + rng.uniform(0.0, 1.0)
        while time.time() < deadline:
            _checkpoints_all_load(run_dir)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        steps = _checkpoints_all_load(run_dir)  # after the kill: every file under its final name loads
        assert steps["last.pt"] > step
        step = steps["last.pt"]
        kills.append(step)
        assert step < total, "the run finished before it could be killed; lower the delays"

    r = subprocess.run(base + ["--resume"], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed {run_dir / 'last.pt'} at step {step}/{total}" in r.stderr
    assert r.stdout.startswith(f"done: step {total}/{total}")
    steps = _checkpoints_all_load(run_dir)
    assert steps["last.pt"] == total and "best.pt" in steps
    rows = [line.split(",") for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows if r[2] == "train"] == list(range(1, total + 1)), kills
    assert [int(r[0]) for r in rows if r[2] == "val"] == list(range(15, total + 1, 15))
    assert not list(run_dir.glob(".*.part"))  # resume removed what the kills left behind


# ------------------------------------------------------------------------------- two trainers, one run dir

@pytest.fixture
def procs():
    """Every process a test starts; all are killed and reaped at teardown, whatever the test did."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)


@pytest.mark.slow
def test_second_trainer_on_a_held_run_dir_stops_and_a_dead_holders_lock_is_taken_over(tmp_path, procs):
    """A live ``train`` holds its run directory: a second one (``--resume`` or a fresh start) stops before
    any work with one line naming the holder's PID, and the holder trains on undisturbed. After a
    ``kill -9`` of the holder, a new ``train --resume`` takes the stale lock over and trains."""
    root = make_dataset(tmp_path / "ds", [], n_good=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, str(ROOT / "cli.py"), "train", "--data", str(root), "--runs", str(tmp_path),
            "--name", "r", "--no-progress"]
    run_dir = tmp_path / "r"
    holder = subprocess.Popen(base + ["--preset", "tiny", *SETS, *_sets(steps=100_000, save_every=1,
                                                                       val_every=100_000)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    procs.append(holder)
    _run_until(holder, run_dir, 1)
    assert (run_dir / ".holder.pid").read_text().split() == [str(holder.pid)]

    for extra in (["--resume"], ["--preset", "tiny", *SETS]):
        second = subprocess.Popen(base + extra, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=tmp_path)
        procs.append(second)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 1, (extra, out, err[-2000:])
        lines = [line for line in (out + err).splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"Error: {run_dir}: in use by another running process "
                                                        f"(PID {holder.pid}); two trainers"), (extra, lines)
    _run_until(holder, run_dir, _checkpoints_all_load(run_dir)["last.pt"] + 1)  # the holder trains on

    holder.kill()  # SIGKILL: no clean-up runs, the PID file stays; the kernel drops the lock
    holder.communicate(timeout=60)
    assert (run_dir / ".holder.pid").read_text().split() == [str(holder.pid)]
    killed_at = _checkpoints_all_load(run_dir)["last.pt"]
    heir = subprocess.Popen(base + ["--resume"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    procs.append(heir)
    _run_until(heir, run_dir, killed_at + 2)
    assert (run_dir / ".holder.pid").read_text().split() == [str(heir.pid)]
    heir.send_signal(signal.SIGTERM)
    _, err = heir.communicate(timeout=120)
    assert heir.returncode == 0, err[-2000:]
    assert f"{run_dir}: took over the run directory from PID {holder.pid}, which is no longer running" in err
    assert "SIGTERM received: saved" in err
    assert not (run_dir / ".holder.pid").exists()  # a clean exit releases it


def test_train_refuses_a_run_dir_held_in_this_process(tmp_path):
    """The library call too (not only the CLI): the held folder is named with the holder's PID, nothing runs.
    ``infer`` (which shares the same folder lock) writing into a training run directory is refused the same
    way after a bounded wait, instead of blocking until the training ends."""
    from nafnet_core.fileio import FolderBusyError, exclusive_folder, output_folder
    from train.config import build_config
    from train.loop import train

    run_dir = tmp_path / "run"
    with exclusive_folder(run_dir, advice="x"):
        busy = rf"{run_dir}: in use by another running process \(PID {os.getpid()}\)"
        with pytest.raises(FolderBusyError, match=busy):
            train(build_config("tiny", sets={"data": str(tmp_path / "nowhere")}), run_dir, progress=False)
        assert sorted(p.name for p in run_dir.iterdir()) == [".holder.pid"]
        t0 = time.monotonic()
        with pytest.raises(FolderBusyError, match=rf"in use by another running process \(PID {os.getpid()}\); wait"):
            with output_folder(run_dir):
                pass
        assert time.monotonic() - t0 < 30
    assert not run_dir.exists()  # created by the lock, left empty: removed again


# ------------------------------------------------------------------------------------ tampered state, config

def test_resume_refuses_a_malicious_last_pt(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    with open(run / "last.pt", "wb") as f:
        pickle.dump({"extra": Evil()}, f, protocol=2)
    res = CliRunner().invoke(main, ["train", "--runs", str(tmp_path / "runs"), "--name", "x", "--resume"])
    assert res.exit_code == 1 and "refused to load" in res.output and "Traceback" not in res.output
    assert not marker.exists()


@pytest.mark.parametrize("text,fragment", [
    ("lr: !!python/object/apply:os.system ['touch {marker}']\n", "not valid YAML"),
    ("!!python/object/new:os.system ['touch {marker}']\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping"),
    ("lr: [unclosed\n", "not valid YAML"),
    ("", None),  # an empty file is an empty mapping
], ids=["python_tag_value", "python_tag_root", "list", "syntax", "empty"])
def test_config_files_load_with_the_safe_loader(tmp_path, text, fragment):
    from train.config import ConfigError, build_config

    marker = tmp_path / "pwned"
    path = tmp_path / "c.yaml"
    path.write_text(text.format(marker=marker))
    if fragment is None:
        assert build_config("tiny", file=path).model == "tiny"
    else:
        with pytest.raises(ConfigError, match=fragment):
            build_config("tiny", file=path)
    assert not marker.exists()


def test_set_values_are_never_constructed_as_objects(tmp_path):
    from train.config import ConfigError, build_config, parse_sets

    assert build_config("tiny", sets=parse_sets(["cache=off", "val_tlc=false"])).cache == "off"  # not False

    marker = tmp_path / "pwned"
    sets = parse_sets([f"lr=!!python/object/apply:os.system ['touch {marker}']"])
    with pytest.raises(ConfigError, match="lr must be float"):
        build_config("tiny", sets=sets)
    assert not marker.exists()
