"""The runtime's error type has its own module (runtime/errors.py) and stays importable from its old places; the
import directions themselves are import-linter contracts (pyproject.toml, tests/test_layout.py)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_runner_error_is_one_class_importable_from_its_old_places():
    import runtime
    import runtime.errors
    import runtime.runners
    import runtime.trt
    from nafnet_core.errors import UserError

    assert runtime.RunnerError is runtime.runners.RunnerError is runtime.trt.RunnerError is runtime.errors.RunnerError
    assert issubclass(runtime.errors.RunnerError, UserError)
