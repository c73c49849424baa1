"""The measurement scripts of benchmarks/: each one's command line answers --help, and their cheap parts run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("variants", "serve", "video", "official_step", "export_cost", "tiling")


#: Runs each script as ``python -m`` does (runpy, ``__main__``) with ``--help``, all in one interpreter (one torch
#: import instead of six), printing one JSON line per script: its exit code and what it printed.
_HELP_ALL = """
import contextlib, io, json, runpy, sys
for name in sys.argv[1:]:
    sys.argv = ["-m", "--help"]
    out, code = io.StringIO(), None
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
    print(json.dumps({"name": name, "code": code, "out": out.getvalue()}))
"""


@pytest.fixture(scope="module")
def helps() -> dict[str, dict]:
    proc = subprocess.run([sys.executable, "-c", _HELP_ALL, *SCRIPTS], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_answers_help_from_the_repository_root(helps, name):
    assert helps[name]["code"] == 0, helps[name]
    assert helps[name]["out"].startswith(f"usage: python -m benchmarks.{name}"), helps[name]["out"]


def test_official_step_names_a_checkout_without_basicsr(tmp_path):
    from benchmarks.official_step import load_official
    from nafnet_core.errors import UserError

    with pytest.raises(UserError, match="no basicsr/models/archs/NAFNet_arch.py; pass the root of a checkout"):
        load_official(tmp_path)
