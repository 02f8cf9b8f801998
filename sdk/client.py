"""``Baton(app)``: binds the SDK to a Celery app and a store, and steers runs.

Celery and the database are imported here lazily, inside ``Baton.__init__``, so that
``import sdk`` stays free of them (the replay engine must be importable alone).
"""

from __future__ import annotations

import builtins
import inspect
import os
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from . import serde
from .errors import (
    DefinitionError,
    WorkflowAlreadyStarted,
    WorkflowNotFound,
)
from .events import RunStatus
from .workflow import Workflow, WorkflowHandle

DEFAULT_DATABASE_URL = "sqlite:///baton.sqlite3"


def resolve_database_url(explicit: str | None, conf: Any) -> str:
    """The argument, else ``app.conf.baton_database_url``, else ``BATON_DATABASE_URL``, else SQLite."""
    if explicit:
        return explicit
    from_conf = conf.get("baton_database_url") if conf is not None else None
    return str(from_conf or os.environ.get("BATON_DATABASE_URL") or DEFAULT_DATABASE_URL)


class Baton:
    """Durable generator workflows on a Celery app.

    Args:
        app: the Celery app whose workers run activities and advance workflows.
        database_url: the store (see :func:`resolve_database_url` for the fallbacks).
        max_payload_bytes: refuse arguments, results and signal payloads above this size.
        cache_size: live generators kept per worker process (LRU).
        allow_pickle: accept an app configured to accept pickle (refused by default).
        sweep_interval: seconds between recovery sweeps in each worker.
        dead_after: seconds without a heartbeat before a worker is presumed dead.
        lost_after: seconds a published, unstarted activity may wait before it is re-sent.
        claim_after: seconds an activity runs before its worker claims it in the store (shorter
            ones are recorded without a claim: one transaction per step instead of two); 0 claims
            every activity as it starts.
        eager_steps: when recording an activity's result decides a next activity for the same
            queue, run it in the same worker process instead of publishing it, up to this many
            steps per delivered message (0, the default: every activity is a message). Of a
            fan-out, the process keeps its share (width / pool processes) and publishes the rest.
            Saves the broker hop and keeps the run's generator warm. Redis brokers only (the
            sweeper must read the queues to find a lost eager step). Their task events (for
            Flower) come from the pool process while the worker sends events (``-E`` or Flower's
            ``enable_events``); see ``docs/design.md``, *Eager steps*.
    """

    def __init__(
        self,
        app: Any,
        database_url: str | None = None,
        *,
        max_payload_bytes: int = serde.DEFAULT_MAX_PAYLOAD,
        cache_size: int = 1000,
        allow_pickle: bool = False,
        sweep_interval: float = 1.0,
        dead_after: float = 10.0,
        lost_after: float = 300.0,
        claim_after: float = 0.2,
        eager_steps: int = 0,
    ) -> None:
        self.app = app
        self.database_url = resolve_database_url(database_url, getattr(app, "conf", None))
        self.max_payload_bytes = max_payload_bytes
        self.cache_size = cache_size
        self.sweep_interval = sweep_interval
        self.dead_after = dead_after
        self.lost_after = lost_after
        if not 0 <= claim_after < min(lost_after, dead_after):
            raise ValueError(f"claim_after={claim_after} must be at least 0 and below lost_after ({lost_after}) "
                             f"and dead_after ({dead_after}): an unclaimed running activity looks lost")
        self.claim_after = claim_after
        if isinstance(eager_steps, bool) or not isinstance(eager_steps, int) or eager_steps < 0:
            raise ValueError(f"eager_steps={eager_steps!r} must be a whole number of steps, 0 or more "
                             "(0 publishes every activity)")
        self.eager_steps = eager_steps
        self.workflows: dict[str, Workflow] = {}
        from tasks.wiring import Runtime

        self.runtime = Runtime(self, allow_pickle=allow_pickle)

    # ------------------------------------------------------------ definitions
    def workflow(
        self, fn: Callable[..., Any] | None = None, *, name: str | None = None, redact: Iterable[str] = ()
    ) -> Any:
        """Register a generator function as a workflow (``@baton.workflow`` or with options).

        Args:
            name: the registered name (default: ``module.function``'s function name).
            redact: local variable names never written to checkpoints (secrets).
        """

        def register(f: Callable[..., Any]) -> Workflow:
            if not inspect.isgeneratorfunction(f):
                raise DefinitionError(
                    f"@baton.workflow needs a generator function, but {getattr(f, '__qualname__', f)!r} has no "
                    "yield; a workflow hands each step to Celery with `result = yield task.s(...)`"
                )
            wf_name = name or f.__name__
            if wf_name in self.workflows and self.workflows[wf_name].fn is not f:
                existing = self.workflows[wf_name].fn
                raise DefinitionError(
                    f"workflow name {wf_name!r} is already registered by {existing.__module__}."
                    f"{existing.__qualname__}; pass @baton.workflow(name='...') to tell them apart"
                )
            wf = Workflow(self, f, wf_name, frozenset(redact))
            self.workflows[wf_name] = wf
            return wf

        return register(fn) if fn is not None else register

    def definition(self, name: str) -> Workflow:
        try:
            return self.workflows[name]
        except KeyError:
            known = ", ".join(sorted(self.workflows)) or "none"
            raise WorkflowNotFound(
                f"no workflow named {name!r} is registered in this process (registered: {known}); "
                "import the module that defines it in the Celery app (include=[...])"
            ) from None

    # ------------------------------------------------------------ runs
    @property
    def store(self) -> Any:
        return self.runtime.store

    def get(self, workflow_id: str) -> WorkflowHandle:
        """A handle on an existing run; raises ``WorkflowNotFound``."""
        self.store.require_run(workflow_id)
        return WorkflowHandle(self, workflow_id)

    def list(self, status: str | None = None, workflow: str | None = None, limit: int = 50,
             offset: int = 0, search: str | None = None) -> builtins.list[WorkflowHandle]:
        """Runs, newest first, optionally filtered."""
        if status is not None and status not in {s.value for s in RunStatus}:
            raise ValueError(f"unknown status {status!r}; one of {', '.join(s.value for s in RunStatus)}")
        rows = self.store.list_runs(status=status, workflow=workflow, limit=limit, offset=offset, search=search)
        return [WorkflowHandle(self, r.run_id) for r in rows]

    def _start(self, wf: Workflow, args: builtins.list[Any], kwargs: dict[str, Any],
               workflow_id: str | None) -> WorkflowHandle:
        for arg_name, value in wf.argument_names(args, kwargs):
            serde.dumps(value, f"argument {arg_name!r} of workflow {wf.name!r}", self.max_payload_bytes)
        args_json = serde.dumps(args, "arguments", self.max_payload_bytes)
        kwargs_json = serde.dumps(kwargs, "arguments", self.max_payload_bytes)
        wid = workflow_id or f"{wf.name}-{uuid.uuid4().hex[:12]}"
        if not isinstance(wid, str) or not wid or len(wid) > 200 or any(c in wid for c in "/@:\n"):
            raise ValueError(f"workflow_id {wid!r} must be a non-empty string of at most 200 characters "
                             "without '/', '@', ':' or newlines (Baton derives child and task ids from it)")
        created = self.runtime.create_run(wid, wf.name, args_json, kwargs_json)
        if not created:
            row = self.store.latest_run(wid)
            if row is not None and row.workflow != wf.name:
                raise WorkflowAlreadyStarted(
                    f"workflow id {wid!r} already belongs to a run of {row.workflow!r}, not {wf.name!r}; "
                    "choose another workflow_id"
                )
        return WorkflowHandle(self, wid)

    def _signal(self, workflow_id: str, name: str, payload: Any) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError("a signal needs a non-empty name")
        text = serde.dumps(payload, f"payload of signal {name!r}", self.max_payload_bytes)
        self.runtime.signal(workflow_id, name, text)

    def _cancel(self, workflow_id: str, reason: str) -> bool:
        return bool(self.runtime.cancel(workflow_id, reason))

    def fork(self, workflow_id: str, at_step: int, new_id: str | None = None) -> WorkflowHandle:
        """A new run sharing the first ``at_step`` steps of ``workflow_id``; the original is untouched."""
        if not isinstance(at_step, int) or at_step < 0:
            raise ValueError(f"at_step must be an int >= 0, got {at_step!r}")
        fid = new_id or f"{workflow_id}-fork{at_step}-{uuid.uuid4().hex[:6]}"
        self.runtime.fork(workflow_id, at_step, fid)
        return WorkflowHandle(self, fid)

    def resume(self, workflow_id: str) -> WorkflowHandle:
        """Retry a blocked run (after a code fix); re-drives a running one. Ended runs raise."""
        self.runtime.resume(workflow_id)
        return WorkflowHandle(self, workflow_id)



