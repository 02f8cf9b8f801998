"""Baton's error tree: one root, a few leaves, messages that name the thing and the fix.

Failures cross process boundaries as data (type name, message, traceback text), never
as pickled exceptions, so every error here can be rebuilt from plain JSON.
"""

from __future__ import annotations

from typing import Any


class BatonError(Exception):
    """Root of every error Baton raises on purpose."""


class DefinitionError(BatonError):
    """A workflow definition is unusable: not a generator, duplicate or unknown name."""


class SerializationError(BatonError, TypeError):
    """A value that JSON cannot carry, or one over the payload size limit.

    Raised where the value was passed, naming it (``argument 'x'``, ``result of step 3``).
    """


class NonDeterminismError(BatonError):
    """The replayed generator diverged from its recorded history.

    The run is marked "blocked" (never failed): restore the code, or guard the change
    with ``patched()``, then call ``baton.resume(id)``.
    """

    def __init__(
        self,
        message: str,
        *,
        run_id: str = "",
        step: int = 0,
        recorded: Any = None,
        new: Any = None,
        file: str = "",
        line: int = 0,
    ) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.step = step
        self.recorded = recorded
        self.new = new
        self.file = file
        self.line = line


class ActivityError(BatonError):
    """A task yielded by a workflow failed (after its retries, if any).

    Attributes:
        task_name: the Celery task name.
        error_type: the exception's type name in the worker.
        message: the exception's message.
        traceback: the formatted traceback text from the worker.
    """

    def __init__(self, task_name: str, error_type: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{task_name} failed: {error_type}: {message}")
        self.task_name = task_name
        self.error_type = error_type
        self.message = message
        self.traceback = traceback


class SignalTimeout(BatonError):
    """``wait_signal(name, timeout=...)`` elapsed with no signal of that name."""

    def __init__(self, name: str, timeout: float) -> None:
        super().__init__(f"no signal {name!r} arrived within {timeout:g}s")
        self.name = name
        self.timeout = timeout


class WorkflowFailed(BatonError):
    """A run (or a child run) ended in failure.

    Attributes:
        cause: a dict with the failure's ``type``, ``message`` and ``traceback``.
    """

    def __init__(self, message: str, cause: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.cause = cause or {}


class WorkflowNotFound(BatonError, LookupError):
    """No run with this id, or no workflow with this name is registered."""


class WorkflowAlreadyStarted(BatonError):
    """A run with this workflow id exists and belongs to a different workflow."""


class StoreError(BatonError):
    """The store is unusable (e.g. its schema is older than this code)."""


# Cancelled deliberately derives from BaseException, not BatonError: it is thrown into
# the user's generator, and a user's ``except Exception:`` must not swallow it (the same
# reasoning as asyncio.CancelledError and KeyboardInterrupt).
class Cancelled(BaseException):
    """The run was cancelled; thrown into the generator at its current yield."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or "cancelled")
        self.reason = reason


def error_from_dict(data: dict[str, Any], task_name: str = "") -> BatonError:
    """Rebuild the user-facing error for a recorded failure payload."""
    kind = data.get("type", "Exception")
    message = data.get("message", "")
    if data.get("kind") == "child":
        return WorkflowFailed(f"child run {data.get('child', '?')} failed: {kind}: {message}", data)
    if data.get("kind") == "signal_timeout":
        return SignalTimeout(data.get("name", "?"), float(data.get("timeout", 0)))
    return ActivityError(task_name or data.get("task", "?"), kind, message, data.get("traceback", ""))
