"""Hooks around every activity a workflow yielded, in the pool process that runs it.

``task_prerun`` claims the attempt for this worker (so its death can be noticed) and arms
the attempt's timeout; ``task_postrun`` records the outcome and advances the run inline,
in one transaction, *before* Celery acknowledges the message (``acks_late``). If the
store stays unreachable past the retry window the process exits, so the message is
redelivered rather than acknowledged with its result lost.
"""

from __future__ import annotations

import logging
import os
import traceback
from typing import TYPE_CHECKING, Any

from celery import signals
from sqlalchemy import Connection

from persistence import runtime as rt
from persistence.models import utcnow
from sdk import serde
from sdk.errors import SerializationError

from . import advance as adv
from .dispatch import HEADER_RUN, HEADER_TIMEOUT
from .faults import fault

if TYPE_CHECKING:
    from .wiring import Runtime

log = logging.getLogger("baton.activities")

_main_pid = os.getpid()
_duplicates: set[str] = set()


def worker_id(hostname: str) -> str:
    """``hostname/pid of the worker's main process``: the key of its heartbeat row."""
    return f"{hostname}/{_main_pid}"


def _remember_main_pid(**_: Any) -> None:
    global _main_pid
    _main_pid = os.getpid()


def baton_headers(task: Any) -> dict[str, Any] | None:
    request = getattr(task, "request", None)
    if request is None:
        return None
    headers = getattr(request, "headers", None) or {}
    if HEADER_RUN in headers:
        return dict(headers)
    run = request.get(HEADER_RUN) if hasattr(request, "get") else None
    if run:
        return {HEADER_RUN: run}
    return None


def connect(runtime: Runtime) -> None:
    signals.worker_init.connect(_remember_main_pid, weak=False)

    def prerun(sender: Any = None, task_id: str = "", task: Any = None, **_: Any) -> None:
        if task is None or task.app is not runtime.app:
            return
        headers = baton_headers(task)
        if headers is not None:
            on_prerun(runtime, task_id, task, headers)

    def postrun(sender: Any = None, task_id: str = "", task: Any = None, retval: Any = None,
                state: str = "", **_: Any) -> None:
        if task is None or task.app is not runtime.app or baton_headers(task) is None:
            return
        on_postrun(runtime, task_id, task, retval, state)

    signals.task_prerun.connect(prerun, weak=False)
    signals.task_postrun.connect(postrun, weak=False)


def on_prerun(runtime: Runtime, task_id: str, task: Any, headers: dict[str, Any]) -> None:
    store = runtime.store
    me = worker_id(str(task.request.hostname or "unknown"))
    now = utcnow()
    timeout = headers.get(HEADER_TIMEOUT)
    try:
        with store.tx() as conn:
            if not rt.mark_started(conn, task_id, me, now):
                _duplicates.add(task_id)
                return
            if timeout:
                rt.add_attempt_timeout(conn, task_id, float(timeout), now)
    except Exception as exc:  # the run still completes: the result is recorded in postrun
        log.warning("baton: could not mark %s started: %s", task_id, exc)


def on_postrun(runtime: Runtime, task_id: str, task: Any, retval: Any, state: str) -> None:
    if state not in ("SUCCESS", "FAILURE"):
        return  # RETRY / IGNORED / REJECTED: Celery will deliver it again, or it was never ours
    if task_id in _duplicates:
        _duplicates.discard(task_id)
        log.info("baton: %s ran again after its attempt was settled; result ignored", task_id)
        return
    ok = state == "SUCCESS"
    value: Any
    if ok:
        try:
            serde.dumps(retval, f"return value of task {task.name!r} ({task_id})", runtime.baton.max_payload_bytes)
            value = retval
        except SerializationError as exc:
            ok, value = False, {"type": "SerializationError", "message": str(exc), "traceback": ""}
    else:
        err = retval if isinstance(retval, BaseException) else None
        value = {
            "type": type(err).__name__ if err else "Exception",
            "message": str(err) if err else repr(retval),
            "traceback": "".join(traceback.format_exception(err)) if err else "",
            "task": task.name,
        }
    store = runtime.store

    def record(conn: Connection) -> Any:
        return rt.record_attempt(conn, store, task_id, ok, value, utcnow())

    fault("before_record")
    try:
        adv.advance(runtime, rt.run_of_task(task_id), before=record,
                    publisher=worker_id(str(task.request.hostname or "unknown")))
    except Exception:
        # Never let Celery ack a message whose result we could not record: die, and the
        # message is redelivered (and the sweeper re-dispatches the attempt).
        log.critical("baton: could not record the result of %s; exiting so it is redelivered", task_id,
                     exc_info=True)
        logging.shutdown()
        os._exit(70)
    fault("after_publish")  # recorded and published, not yet acknowledged
