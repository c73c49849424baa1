"""The runtime's error type, in a module of its own so that every runtime module can import it.

``runtime.runners`` (the Runner classes) and ``runtime.trt`` (the thin TensorRT layer the TensorRT
runner loads) both raise it; neither has to import the other for it. ``runtime.runners.RunnerError``
and ``runtime.RunnerError`` remain importable (re-exported).
"""

from __future__ import annotations

from nafnet_core.errors import UserError


class RunnerError(UserError):
    """A backend that cannot run here or a model it cannot run; the message says what to do."""


__all__ = ["RunnerError"]
