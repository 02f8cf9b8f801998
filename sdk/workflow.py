"""User-facing objects: a workflow definition and a handle on a run."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from . import checkpoint as cp
from .commands import Child
from .errors import Cancelled, NonDeterminismError, WorkflowFailed
from .events import Checkpoint, Event, RunStatus

if TYPE_CHECKING:
    from .client import Baton


def _aware(value: Any) -> Any:
    """SQLite hands back naive datetimes; everything Baton writes is UTC."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class Workflow:
    """A registered generator workflow. Made by ``@baton.workflow``."""

    def __init__(self, baton: Baton, fn: Callable[..., Any], name: str, redact: frozenset[str]) -> None:
        self.baton = baton
        self.fn = fn
        self.name = name
        self.redact = redact
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Workflow {self.name}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the generator function itself (handy in unit tests of workflow logic)."""
        return self.fn(*args, **kwargs)

    def s(self, *args: Any, **kwargs: Any) -> Child:
        """A child-run command: yield it from another workflow to run this one as its child."""
        return Child(self.name, tuple(args), dict(kwargs))

    def start(self, *args: Any, workflow_id: str | None = None, **kwargs: Any) -> WorkflowHandle:
        """Start a run, or return the existing one with this ``workflow_id``.

        Raises:
            SerializationError: an argument JSON cannot carry (named), or one over the size limit.
            WorkflowAlreadyStarted: ``workflow_id`` belongs to a run of another workflow.
        """
        return self.baton._start(self, list(args), dict(kwargs), workflow_id)

    def argument_names(self, args: list[Any], kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
        """(name, value) for each argument, for error messages that name the bad one."""
        try:
            bound = inspect.signature(self.fn).bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"workflow {self.name!r}: {exc}") from None
        return list(bound.arguments.items())


@dataclass(frozen=True)
class HandleInfo:
    run_id: str
    status: RunStatus


class WorkflowHandle:
    """A handle on a workflow id; it follows continue-as-new chains to the newest run."""

    def __init__(self, baton: Baton, workflow_id: str) -> None:
        self.baton = baton
        self.id = workflow_id

    def __repr__(self) -> str:
        return f"<WorkflowHandle {self.id}>"

    def _row(self) -> Any:
        return self.baton.store.require_run(self.id)

    @property
    def run_id(self) -> str:
        """The id of the newest run in this workflow id's chain."""
        return str(self._row().run_id)

    @property
    def workflow(self) -> str:
        return str(self._row().workflow)

    def status(self) -> str:
        """``running``, ``completed``, ``failed``, ``cancelled`` or ``blocked``."""
        return str(self._row().status)

    def result(self, timeout: float | None = None, poll: float = 0.05) -> Any:
        """Wait for the run's end and return its value.

        Raises:
            WorkflowFailed: the run failed (``.cause`` has type, message, traceback).
            Cancelled: the run was cancelled.
            NonDeterminismError: the run is blocked (fix the code, then ``baton.resume``).
            TimeoutError: ``timeout`` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        from . import serde

        while True:
            row = self._row()
            status = RunStatus(row.status)
            if status is RunStatus.COMPLETED:
                return serde.loads(row.result)
            if status is RunStatus.FAILED:
                cause = serde.loads(row.error) or {}
                raise WorkflowFailed(f"run {row.run_id} failed: {cause.get('type')}: {cause.get('message')}",
                                     cause)
            if status is RunStatus.CANCELLED:
                cause = serde.loads(row.error) or {}
                raise Cancelled(cause.get("message", "cancelled"))
            if status is RunStatus.BLOCKED:
                cause = serde.loads(row.error) or {}
                raise NonDeterminismError(cause.get("message", f"run {row.run_id} is blocked"),
                                          run_id=row.run_id, step=int(cause.get("step") or 0))
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {row.run_id} still {status.value} after {timeout}s "
                                   f"(step {row.step}); it goes on, call result() again to keep waiting")
            time.sleep(poll)

    def signal(self, name: str, payload: Any = None) -> None:
        """Send a signal; a ``wait_signal(name)`` takes it, now or later (signals are buffered)."""
        self.baton._signal(self.id, name, payload)

    def cancel(self, reason: str = "") -> bool:
        """Throw ``Cancelled`` into the run at its current yield; False if it had already ended."""
        return self.baton._cancel(self.id, reason)

    def checkpoint(self) -> Checkpoint | None:
        """Position, locals and what the run waits on at its latest yield (None before the first)."""
        from . import serde

        row = self._row()
        if not row.step:
            return None
        return Checkpoint(step=row.step, position=serde.loads(row.position) or {},
                          locals=serde.loads(row.locals) or {}, waiting_on=serde.loads(row.waiting) or [],
                          at=_aware(row.updated_at))

    def checkpoints(self) -> list[Checkpoint]:
        """Every step's checkpoint, locals rebuilt from the stored deltas."""
        from . import serde

        out: list[Checkpoint] = []
        state: dict[str, Any] = {}
        for r in self.baton.store.checkpoint_rows(self.run_id):
            state = cp.apply_delta(state, serde.loads(r.locals_delta))
            out.append(Checkpoint(step=r.step, position={"file": r.file, "line": r.line, "function": r.function},
                                  locals=dict(state), waiting_on=serde.loads(r.waiting), at=_aware(r.at)))
        return out

    def history(self) -> list[Event]:
        """The newest run's recorded events, in order."""
        events: list[Event] = self.baton.store.events(self.run_id)
        return events

    def children(self) -> list[WorkflowHandle]:
        return [WorkflowHandle(self.baton, r.run_id) for r in self.baton.store.list_runs(parent=self.run_id,
                                                                                         limit=10_000)]

    def diagnose(self) -> list[str]:
        """Why a running run may not be moving: steps no live worker can run, an unknown workflow."""
        from . import serde

        row = self._row()
        if row.status != RunStatus.RUNNING.value:
            return []
        store = self.baton.store
        workers = store.workers()
        if not workers:
            return ["no worker is alive: start one with `celery -A <app> worker`"]
        names = store.registered_names()
        notes = []
        if f"workflow:{row.workflow}" not in names:
            notes.append(f"no live worker has workflow {row.workflow!r} registered; start a worker whose app "
                         "imports the module that defines it")
        for w in serde.loads(row.waiting) or []:
            if w.get("kind") == "activity" and w.get("name") not in names:
                notes.append(f"step {row.step} waits on task {w.get('name')!r}, which no live worker has "
                             "registered; start a worker that imports it (the run resumes by itself)")
        return notes

    def info(self) -> dict[str, Any]:
        """Everything the dashboard and CLI show of the run, as plain data."""
        from . import serde

        row = self._row()
        started: datetime | None = _aware(row.created_at)
        return {
            "id": self.id, "run_id": row.run_id, "workflow": row.workflow, "status": row.status,
            "args": serde.loads(row.args), "kwargs": serde.loads(row.kwargs),
            "result": serde.loads(row.result), "error": serde.loads(row.error), "step": row.step,
            "position": serde.loads(row.position), "locals": serde.loads(row.locals),
            "waiting": serde.loads(row.waiting) or [], "parent_run_id": row.parent_run_id,
            "previous_run_id": row.previous_run_id, "next_run_id": row.next_run_id,
            "forked_from": row.forked_from, "fork_step": row.fork_step,
            "created_at": started, "updated_at": _aware(row.updated_at), "finished_at": _aware(row.finished_at),
            "diagnosis": self.diagnose(),
        }
