"""The runtime's modules import in one direction: the error type has its own module (runtime/errors.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _runtime_imports(module: str) -> set[str]:
    """Sibling runtime modules that ``runtime/<module>.py`` imports, at top level or inside functions."""
    tree = ast.parse((ROOT / "runtime" / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x
                found |= {a.name for a in node.names}
            elif node.module and node.module.startswith("runtime."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("runtime.")}
    return found


def test_runners_and_trt_do_not_import_each_other():
    assert "runners" not in _runtime_imports("trt")
    assert "errors" in _runtime_imports("trt") and "errors" in _runtime_imports("runners")
    assert _runtime_imports("errors") == set()


def test_runner_error_is_one_class_importable_from_its_old_places():
    import runtime
    import runtime.errors
    import runtime.runners
    import runtime.trt
    from nafnet_core.errors import UserError

    assert runtime.RunnerError is runtime.runners.RunnerError is runtime.trt.RunnerError is runtime.errors.RunnerError
    assert issubclass(runtime.errors.RunnerError, UserError)
