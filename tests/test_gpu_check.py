"""benchmarks/gpu_check.py: the GPU check's report, in its CPU smoke form and (on a GPU) its real form.

Run as a user runs it, ``python -m benchmarks.gpu_check`` from the repository root, in a subprocess; the
JSON on stdout is the report.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
#: Keys whose value is a measured figure: a positive finite number (the unit is in the key, see ``units``).
FIGURE_SUFFIXES = ("_ms", "_s", "_mib", "_db", "images_per_s", "speedup", "speedup_vs_fp32")


def run_check(*args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict | None]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return proc, (json.loads(proc.stdout) if proc.returncode == 0 else None)


def figures_of(item: dict, where: str) -> dict[str, float]:
    """The figures of one measured item (asserting each is positive and finite), or {} for a skipped one
    (asserting it says why)."""
    if "skipped" in item:
        assert isinstance(item["skipped"], str) and len(item["skipped"]) > 10, (where, item)
        return {}
    found = {}
    for key, value in item.items():
        if isinstance(value, dict):
            found |= {f"{key}.{k}": v for k, v in figures_of(value, f"{where}.{key}").items()}
        elif key.endswith(FIGURE_SUFFIXES):
            if value is None and item.get("nonfinite_values"):
                continue  # no difference or PSNR against outputs holding inf/NaN (asserted by the caller)
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (where, key, value)
            found[key] = value
    return found


def assert_report(report: dict, device: str) -> None:
    assert report["device"] == device
    assert report["machine"]["torch"] == torch.__version__ and "units" in report

    modes = report["train"]["modes"]
    assert set(modes) == {"fp32", "amp_bf16", "amp_fp16"}
    for mode, row in modes.items():
        figs = figures_of(row, f"train.{mode}")
        assert not figs or {"images_per_s", "step_median_ms", "peak_memory_mib"} <= set(figs), (mode, row)
    assert "images_per_s" in modes["fp32"], modes["fp32"]

    precisions = report["inference"]["precisions"]
    assert set(precisions) == {"fp32", "fp16", "bf16"}
    for precision, row in precisions.items():
        figs = figures_of(row, f"inference.{precision}")
        assert "skipped" in row or "eager_median_ms" in figs, row
        assert "skipped" in row or "skipped" in row["compiled"] or "compiled.median_ms" in figs, row

    cases = report["fp16"]["cases"]
    assert set(cases) == {"randomised", "stream_scaled"}
    for name, case in cases.items():
        figures_of(case, f"fp16.{name}")
        if "skipped" in case:
            continue
        for side in ("placed", "plain_half"):
            row = case[side]
            assert {"max_abs_diff", "psnr_db", "nonfinite_values"} <= set(row), row
            if row["nonfinite_values"] == 0:
                assert 0 < row["max_abs_diff"] < 0.1 and row["psnr_db"] > 30, (name, side, row)
            else:
                assert row["max_abs_diff"] is None and "overflowed" in row["note"], row
        assert case["placed"]["nonfinite_values"] == 0, case  # the placement keeps FP16 in range
    assert cases["stream_scaled"]["fp32_stream_stages"], cases["stream_scaled"]  # the placement acted
    assert cases["stream_scaled"]["plain_half"]["nonfinite_values"] > 0  # and it had to

    budget = report["budget"]
    assert budget["used_s"] <= budget["budget_s"] + 120  # one part may overrun; the budget is checked between parts
    assert set(budget["sections"]) == {"train_s", "fp16_s", "inference_s"}


def test_cpu_tiny_report_has_every_section(tmp_path):
    out = tmp_path / "report.json"
    proc, report = run_check("--device", "cpu", "--tiny", "--json", str(out), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text()) == report  # the file holds what stdout printed
    assert_report(report, "cpu")
    assert "CUDA-only" in report["train"]["modes"]["amp_fp16"]["skipped"]  # the project's own rule, quoted
    assert all("torch.compile on a CPU" in row["compiled"]["skipped"]
               for row in report["inference"]["precisions"].values())
    # Its time (15 s on 2 idle cores, about 60 s when other suites share them) is bounded by the timeout
    # above, not asserted: on a shared machine a timing assertion fails for the neighbours' load.


def test_bad_options_are_one_line(tmp_path):
    proc, _ = run_check("--device", "cpu", "--tiny", "--json", str(tmp_path / "no" / "such" / "r.json"), timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    proc, _ = run_check("--device", "cpu", "--budget-s", "0", timeout=60)
    assert proc.returncode == 2 and "--budget-s 0" in proc.stderr and proc.stderr.strip().count("\n") == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no CUDA GPU is visible")
def test_cuda_without_a_gpu_is_one_line():
    proc, _ = run_check("--tiny", timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA GPU" in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_report_of_width32(tmp_path):
    """The real check: width32, batch 8 of 256x256, 720x1280, within the default budget."""
    out = tmp_path / "gpu_check.json"
    proc, report = run_check("--json", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_report(report, "cuda")
    assert report["machine"]["gpu"] == torch.cuda.get_device_name(0) and report["machine"]["cuda"]
    modes = report["train"]["modes"]
    assert all("images_per_s" in row for row in modes.values()), modes  # every precision trains on a GPU
    assert report["train"]["batch"] == 8 and report["inference"]["size"] == "720x1280"
