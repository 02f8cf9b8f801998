"""Publishing, always after the commit that made it necessary.

Activities go out under their own task name, with Baton's ids in message headers (for
the worker hooks) and mirrored in ``kwargsrepr`` so Flower shows and searches them.
Every publish is safe to repeat: task ids are deterministic per attempt, and results
are recorded once per attempt key.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from persistence import runtime as rt
from persistence.models import utcnow
from persistence.store import tasks_t
from sdk import serde

from .faults import fault

if TYPE_CHECKING:
    from .wiring import Runtime

log = logging.getLogger("baton.dispatch")

HEADER_RUN = "baton_run"
HEADER_STEP = "baton_step"


def publish_tasks(runtime: Runtime, ids: list[str]) -> int:
    """Publish activity attempts by row id and mark them published; returns how many went out."""
    if not ids:
        return 0
    store = runtime.store
    with store.read() as conn:
        rows = list(conn.execute(select(tasks_t).where(tasks_t.c.id.in_(ids))))
    sent: list[str] = []
    for row in rows:
        if row.state not in ("scheduled", "published"):
            continue
        args = serde.loads(row.args)
        kwargs = serde.loads(row.kwargs)
        options: dict[str, Any] = dict(serde.loads(row.options) or {})
        if row.attempt > 1:
            options.pop("countdown", None)  # a retry waits on not_before, not on the broker
        shown = {**kwargs, "baton_run": row.run_id, "baton_step": row.step}
        if row.slot:
            shown["baton_slot"] = row.slot
        if row.attempt > 1:
            shown["baton_attempt"] = row.attempt
        runtime.app.send_task(
            row.task, args=args, kwargs=kwargs, task_id=row.id,
            headers={HEADER_RUN: row.run_id, HEADER_STEP: row.step, "baton_slot": row.slot,
                     "baton_attempt": row.attempt},
            argsrepr=repr(tuple(args)), kwargsrepr=repr(shown), **options,
        )
        sent.append(row.id)
        if len(sent) == len(rows) // 2:
            fault("mid_fanout_publish")
    if sent:
        with store.tx() as conn:
            rt.mark_published(conn, sent, utcnow())
    return len(sent)


def advance_runs(runtime: Runtime, run_ids: list[str]) -> None:
    for run_id in dict.fromkeys(run_ids):
        runtime.advance_task.apply_async((run_id,), kwargsrepr=repr({"baton_run": run_id}))


def revoke(runtime: Runtime, ids: list[str], terminate: bool = False) -> None:
    if not ids:
        return
    try:
        runtime.app.control.revoke(ids, terminate=terminate, signal="SIGKILL" if terminate else "SIGTERM")
    except Exception as exc:  # revocation is an optimisation: late results are ignored anyway
        log.warning("baton: could not revoke %d task(s): %s", len(ids), exc)


def send(runtime: Runtime, out: rt.Outbox) -> None:
    """Carry out an outbox after its transaction committed."""
    from .wiring import cancel_run

    publish_tasks(runtime, out.publish)
    revoke(runtime, out.revoke)
    revoke(runtime, out.terminate, terminate=True)
    more = rt.Outbox()
    for run_id, reason in out.cancel_runs:
        cancel_run(runtime.store, run_id, reason, more)
    advance_runs(runtime, out.advance + more.advance)
    if more.publish or more.revoke or more.cancel_runs:
        send(runtime, rt.Outbox(publish=more.publish, revoke=more.revoke, cancel_runs=more.cancel_runs))
