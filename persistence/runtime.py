"""Transactional operations of the runtime: commit a decision, record an attempt, fire a
timer, and the sweeper's queries. Each function runs inside a caller's transaction on a
locked run, and returns an :class:`Outbox` of messages to publish *after* the commit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, insert, or_, select, update

from sdk import checkpoint as cp
from sdk import serde
from sdk.events import Decision, Event, NewEvent, RunStatus

from . import hot
from .models import utcnow
from .store import (
    Store,
    checkpoints_t,
    events_t,
    runs,
    signals_t,
    tasks_t,
    timers_t,
    workers_t,
)

log = logging.getLogger("baton.store")


UNKNOWN: Any = object()  # "not known here" (as opposed to None, a known empty value)


@dataclass(slots=True)
class Outbox:
    """What to send once the transaction has committed (commit first, then publish)."""

    publish: list[dict[str, Any]] = field(default_factory=list)  # activity messages to send
    republish: list[str] = field(default_factory=list)  # task row ids to load and send again
    advance: list[str] = field(default_factory=list)  # run ids
    revoke: list[str] = field(default_factory=list)  # celery task ids
    terminate: list[str] = field(default_factory=list)  # celery task ids to kill (timed out)
    cancel_runs: list[tuple[str, str]] = field(default_factory=list)  # (run id, reason)
    last_seq: int = 0  # the run's last seq after the commit
    locals: Any = UNKNOWN  # the run's checkpointed locals after the commit, when this decision wrote them
    fan_step: int | None = None  # the step of the fan-out the run now waits on, if it does

    def merge(self, other: Outbox) -> None:
        self.publish += other.publish
        self.republish += other.republish
        self.advance += other.advance
        self.revoke += other.revoke
        self.terminate += other.terminate
        self.cancel_runs += other.cancel_runs


def task_id(run_id: str, step: int, slot: int, attempt: int) -> str:
    return f"{run_id}:{step}:{slot}:{attempt}"


def run_of_task(tid: str) -> str:
    return tid.rsplit(":", 3)[0]


def split_task_id(tid: str) -> tuple[str, int, int, int]:
    """(run id, step, slot, attempt) of a task id made by :func:`task_id`."""
    run_id, step, slot, attempt = tid.rsplit(":", 3)
    return run_id, int(step), int(slot), int(attempt)


def attempt_key(step: int, slot: int, attempt: int) -> str:
    """The idempotency key of an attempt's outcome event."""
    return f"att:{step}:{slot}:{attempt}"


def timer_key(step: int, slot: int) -> str:
    """The idempotency key of a timer's ``timer_fired`` event."""
    return f"timer:{step}:{slot}"


def message(tid: str, run_id: str, step: int, slot: int, attempt: int, task: str, args: Any, kwargs: Any,
            options: Any, timeout: float | None) -> dict[str, Any]:
    return {"id": tid, "run_id": run_id, "step": step, "slot": slot, "attempt": attempt, "task": task,
            "args": args, "kwargs": kwargs, "options": options, "timeout": timeout}


def row_message(row: Any) -> dict[str, Any]:
    return message(row.id, row.run_id, row.step, row.slot, row.attempt, row.task, serde.loads(row.args),
                   serde.loads(row.kwargs), serde.loads(row.options) or {}, row.timeout)


def next_run_id(run: Any) -> str:
    base = run.workflow_id
    gen = 1
    if run.run_id != base and "@" in run.run_id:
        try:
            gen = int(run.run_id.rsplit("@", 1)[1])
        except ValueError:
            gen = 1
    return f"{base}@{gen + 1}"


def commit_decision(store: Store, conn: Connection, run: Any, d: Decision, now: datetime,
                    publisher: str | None = None) -> Outbox:
    """Persist one engine decision for a locked run; returns what to publish after commit.

    ``run.last_seq`` must include inputs appended earlier in this transaction; the run row
    is written once, at the end. ``publisher`` (this worker's id) is stamped on the new task
    rows: if it dies before they are published, the sweeper re-sends them.
    """
    out = Outbox()
    rid = run.run_id
    pending: list[Event] = getattr(run, "pending", None) or []
    run.pending = []
    if d.status is RunStatus.BLOCKED:
        if pending:
            conn.execute(insert(events_t), [event_row(rid, e) for e in pending])
        conn.execute(update(runs).where(runs.c.run_id == rid).values(
            status=RunStatus.BLOCKED.value, error=serde.dumps(d.error, "error", None), needs_advance=False,
            updated_at=now, last_seq=run.last_seq))
        return out
    if plain(d):
        done = commit_plain(conn, run, d, now, publisher, pending, out)
        assert done is not None  # unguarded
        return done
    terminal = d.status.terminal
    new_events = list(d.events)
    if terminal:
        payload: dict[str, Any] = {}
        kind = {RunStatus.COMPLETED: "completed", RunStatus.FAILED: "failed",
                RunStatus.CANCELLED: "cancelled", RunStatus.CONTINUED: "continued_as_new"}[d.status]
        if d.status is RunStatus.COMPLETED:
            payload = {"result": d.result}
        elif d.continue_as_new is not None:
            payload = {"args": d.continue_as_new[0], "kwargs": d.continue_as_new[1],
                       "next_run_id": next_run_id(run)}
        else:
            payload = {"error": d.error}
        new_events.append(NewEvent(kind, d.step, None, payload, key="end"))
    last = run.last_seq
    rows, last = _event_rows(rid, pending, new_events, last, now)
    if rows:
        conn.execute(insert(events_t), rows)
    for ev in new_events:
        if ev.kind == "signal_received":
            conn.execute(update(signals_t).where(signals_t.c.id == ev.payload["signal_id"])
                         .values(consumed_step=ev.step))
    if d.activities:
        conn.execute(insert(tasks_t), _task_rows(rid, d, now, publisher, out))
    if d.timers:
        conn.execute(insert(timers_t), [
            {"run_id": rid, "step": t.step, "slot": t.slot, "attempt": 0, "kind": t.kind, "fire_at": t.fire_at,
             "fired": False} for t in d.timers])
    for c in d.children:
        if store.get_run(c.run_id, conn) is None:
            store.create_run(conn, run_id=c.run_id, workflow_id=c.run_id, workflow=c.workflow,
                             args_json=serde.dumps(c.args, "child args", None),
                             kwargs_json=serde.dumps(c.kwargs, "child kwargs", None),
                             parent=(rid, c.step, c.slot))
        out.advance.append(c.run_id)
    for x in d.cancels:
        _cancel_leaf(conn, rid, x.step, x.slot, x.kind, x.child_run_id, out)
    base = _base_locals(conn, run) if d.checkpoints else None
    ck_rows = []
    for ck in d.checkpoints:
        change = cp.delta(base, ck.locals)
        ck_rows.append({"run_id": rid, "step": ck.step, "file": ck.position["file"][-1024:],
                        "line": ck.position["line"], "function": ck.position["function"][:255],
                        "locals_delta": serde.dumps_known(change, "locals"),
                        "waiting": serde.dumps_known(ck.waiting_on, "waiting"), "at": now})
        base = ck.locals
    if ck_rows:
        conn.execute(insert(checkpoints_t), ck_rows)
        out.locals = base
    values: dict[str, Any] = {"decided_seq": last, "last_seq": last, "needs_advance": False, "updated_at": now,
                              "step": d.step, "status": d.status.value,
                              "waiting": serde.dumps_known(d.waiting_on, "waiting"), **_fan(d)}
    if d.checkpoints:
        last_ck = d.checkpoints[-1]
        values["position"] = serde.dumps_known(last_ck.position, "position")
        values["locals"] = serde.dumps_known(last_ck.locals, "locals")
    if terminal:
        values["finished_at"] = now
        values["waiting"] = "[]"
        if d.status is RunStatus.COMPLETED:
            values["result"] = serde.dumps(d.result, "result", None)
        elif d.error is not None:
            values["error"] = serde.dumps(d.error, "error", None)
        _close_outstanding(conn, run, out, cancel_children=d.status is not RunStatus.COMPLETED)
        if d.status is RunStatus.CONTINUED and d.continue_as_new is not None:
            nxt = next_run_id(run)
            values["next_run_id"] = nxt
            parent = (run.parent_run_id, run.parent_step, run.parent_slot) if run.parent_run_id else None
            store.create_run(conn, run_id=nxt, workflow_id=run.workflow_id, workflow=run.workflow,
                             args_json=serde.dumps(d.continue_as_new[0], "args", None),
                             kwargs_json=serde.dumps(d.continue_as_new[1], "kwargs", None),
                             parent=parent, previous_run_id=rid)
            out.advance.append(nxt)
        elif run.parent_run_id:
            _notify_parent(store, conn, run, d, out)
    conn.execute(update(runs).where(runs.c.run_id == rid).values(**values))
    out.last_seq = last
    out.fan_step = values["fan_step"]
    return out


def _event_rows(rid: str, pending: list[Event], new: list[NewEvent], last: int, now: datetime,
                ) -> tuple[list[dict[str, Any]], int]:
    """Rows for the inputs appended in this transaction and the decision's new events (numbered
    after ``last``); returns them and the run's new last seq."""
    rows = [event_row(rid, e) for e in pending]
    for e in new:
        last += 1
        rows.append({"run_id": rid, "seq": last, "kind": e.kind, "step": e.step, "slot": e.slot, "name": e.name,
                     "key": e.key, "payload": serde.dumps(e.payload, "event", None), "at": now})
    return rows, last


def _task_rows(rid: str, d: Decision, now: datetime, publisher: str | None, out: Outbox) -> list[dict[str, Any]]:
    """The decision's new attempt rows (the outbox); those due now also go to ``out.publish``."""
    rows = []
    for a in d.activities:
        tid = task_id(rid, a.step, a.slot, a.attempt)
        inline = a.not_before is None or a.not_before <= now
        rows.append({"id": tid, "run_id": rid, "step": a.step, "slot": a.slot, "attempt": a.attempt,
                     "task": a.task,
                     "args": a.args_json if a.args_json is not None else serde.dumps(a.args, "args", None),
                     "kwargs": a.kwargs_json if a.kwargs_json is not None else serde.dumps(a.kwargs, "kwargs", None),
                     "options": serde.dumps(a.options, "options", None), "timeout": a.timeout,
                     "state": "scheduled", "worker": publisher, "dispatches": 1 if inline else 0,
                     "not_before": a.not_before, "created_at": now, "published_at": now if inline else None})
        if inline:
            out.publish.append(message(tid, rid, a.step, a.slot, a.attempt, a.task, a.args, a.kwargs,
                                       a.options, a.timeout))
    return rows


def _fan(d: Decision) -> dict[str, int | None]:
    """The run's fan-in counter after this decision (NULL unless it waits on a fan-out)."""
    return {"fan_step": d.fan[0], "fan_open": d.fan[1]} if d.fan else {"fan_step": None, "fan_open": None}


def plain(d: Decision) -> bool:
    """A decision of the hot path: the run goes on, with new steps, activities and timers at most."""
    return (d.status is RunStatus.RUNNING and not d.children and not d.cancels
            and all(e.kind != "signal_received" for e in d.events))


def commit_plain(conn: Connection, run: Any, d: Decision, now: datetime, publisher: str | None,
                  pending: list[Event], out: Outbox, guard: dict[str, Any] | None = None) -> Outbox | None:
    """``commit_decision`` for a plain decision, in driver SQL (:mod:`persistence.hot`); it commits.
    With ``guard``, see :func:`persistence.recording.commit_guessed`."""
    rid = run.run_id
    last = run.last_seq
    events, last = _event_rows(rid, pending, d.events, last, now)
    tasks = _task_rows(rid, d, now, publisher, out)
    checkpoints = []
    values: dict[str, Any] = {"run_id": rid, "decided_seq": last, "last_seq": last, "needs_advance": False,
                              "updated_at": now, "step": d.step, "status": d.status.value,
                              "waiting": serde.dumps_known(d.waiting_on, "waiting"), **_fan(d)}
    if d.checkpoints:
        base = _base_locals(conn, run)
        for ck in d.checkpoints:
            checkpoints.append({"run_id": rid, "step": ck.step, "file": ck.position["file"][-1024:],
                                "line": ck.position["line"], "function": ck.position["function"][:255],
                                "locals_delta": serde.dumps_known(cp.delta(base, ck.locals), "locals"),
                                "waiting": serde.dumps_known(ck.waiting_on, "waiting"), "at": now})
            base = ck.locals
        out.locals = base
        values["position"] = serde.dumps_known(d.checkpoints[-1].position, "position")
        values["locals"] = serde.dumps_known(base, "locals")
    timers = [{"run_id": rid, "step": t.step, "slot": t.slot, "attempt": 0, "kind": t.kind, "fire_at": t.fire_at,
               "fired": False} for t in d.timers]
    if not hot.write(conn, events, tasks, checkpoints, values, guard, timers):
        return None
    out.last_seq = last
    out.fan_step = values["fan_step"]
    return out


def _base_locals(conn: Connection, run: Any) -> Any:
    """The locals of the run's last checkpoint: known to a warm instance, else read."""
    known = getattr(run, "known_locals", UNKNOWN)
    if known is not UNKNOWN:
        return known
    raw = run.locals if hasattr(run, "locals") else \
        conn.execute(select(runs.c.locals).where(runs.c.run_id == run.run_id)).scalar()
    return serde.loads(raw) if raw else None


def _cancel_leaf(conn: Connection, rid: str, step: int, slot: int, kind: str, child: str | None,
                 out: Outbox) -> None:
    if kind == "activity":
        ids = [r.id for r in conn.execute(select(tasks_t.c.id).where(
            tasks_t.c.run_id == rid, tasks_t.c.step == step, tasks_t.c.slot == slot,
            tasks_t.c.state.in_(("scheduled", "started"))))]
        if ids:
            conn.execute(update(tasks_t).where(tasks_t.c.id.in_(ids)).values(state="cancelled", finished_at=utcnow()))
            out.revoke += ids
        conn.execute(update(timers_t).where(timers_t.c.run_id == rid, timers_t.c.step == step,
                                            timers_t.c.slot == slot).values(fired=True))
    elif kind in ("timer", "signal"):
        conn.execute(update(timers_t).where(timers_t.c.run_id == rid, timers_t.c.step == step,
                                            timers_t.c.slot == slot).values(fired=True))
    elif kind == "child" and child:
        out.cancel_runs.append((child, "parent's race was won by another branch"))


def _close_outstanding(conn: Connection, run: Any, out: Outbox, cancel_children: bool) -> None:
    rid = run.run_id
    ids = [r.id for r in conn.execute(select(tasks_t.c.id).where(
        tasks_t.c.run_id == rid, tasks_t.c.state.in_(("scheduled", "started"))))]
    if ids:
        conn.execute(update(tasks_t).where(tasks_t.c.id.in_(ids)).values(state="cancelled", finished_at=utcnow()))
        out.revoke += ids
    conn.execute(update(timers_t).where(timers_t.c.run_id == rid, timers_t.c.fired.is_(False)).values(fired=True))
    if cancel_children:
        for row in conn.execute(select(runs.c.run_id).where(runs.c.parent_run_id == rid,
                                                            runs.c.status == RunStatus.RUNNING.value)):
            out.cancel_runs.append((row.run_id, f"parent run {rid} ended"))


def _notify_parent(store: Store, conn: Connection, run: Any, d: Decision, out: Outbox) -> None:
    parent = store.lock_run(conn, run.parent_run_id)
    if parent is None:
        return
    chain_root = run.workflow_id
    if d.status is RunStatus.COMPLETED:
        kind, payload = "child_completed", {"result": d.result, "child": chain_root}
    else:
        kind, payload = "child_failed", {"error": d.error or {}, "child": chain_root}
    if store.append_input(conn, parent, kind, step=run.parent_step, slot=run.parent_slot, payload=payload,
                          key=f"child:{run.parent_step}:{run.parent_slot}", name=run.workflow):
        out.advance.append(parent.run_id)


def event_row(run_id: str, e: Event) -> dict[str, Any]:
    """An input's row: its payload was checked where it entered (a result, a signal) or built here."""
    return {"run_id": run_id, "seq": e.seq, "kind": e.kind, "step": e.step, "slot": e.slot, "name": e.name,
            "key": e.key, "payload": serde.dumps_known(e.payload, "event"), "at": e.at}


def keep_inputs(conn: Connection, run: Any, now: datetime) -> None:
    """Write inputs appended in this transaction (``run.pending``) without deciding: the run
    stays flagged, so whoever can decide (a resume, the sweeper) sees them."""
    pending = getattr(run, "pending", None)
    if not pending:
        return
    conn.execute(insert(events_t), [event_row(run.run_id, e) for e in pending])
    run.pending = []
    conn.execute(update(runs).where(runs.c.run_id == run.run_id).values(
        last_seq=run.last_seq, needs_advance=True, advance_requested_at=now, updated_at=now))


def fire_timer(store: Store, conn: Connection, timer_id: int, out: Outbox) -> bool:
    """Fire one due timer (once): append its input to the run. True if it fired."""
    t = conn.execute(select(timers_t).where(timers_t.c.id == timer_id)).first()
    if t is None or t.fired:
        return False
    run = store.lock_run(conn, t.run_id)
    n = conn.execute(update(timers_t).where(timers_t.c.id == timer_id, timers_t.c.fired.is_(False))
                     .values(fired=True)).rowcount
    if n == 0 or run is None:
        return False
    if t.kind == "attempt_timeout":
        tid = task_id(t.run_id, t.step, t.slot, t.attempt)
        task = conn.execute(select(tasks_t).where(tasks_t.c.id == tid)).first()
        if task is None or task.state in hot.SETTLED:
            return False
        error = {"type": "TimeoutError", "task": task.task, "traceback": "",
                 "message": f"attempt {t.attempt} of {task.task} exceeded its {task.timeout:g}s timeout"}
        ok = store.append_input(conn, run, "activity_failed", step=t.step, slot=t.slot,
                                payload={"attempt": t.attempt, "error": error, "timed_out": True},
                                key=attempt_key(t.step, t.slot, t.attempt), name=task.task)
        conn.execute(update(tasks_t).where(tasks_t.c.id == tid).values(state="failed", finished_at=utcnow()))
        out.terminate.append(tid)
    else:
        ok = store.append_input(conn, run, "timer_fired", step=t.step, slot=t.slot, payload={"kind": t.kind},
                                key=timer_key(t.step, t.slot))
    if ok:
        out.advance.append(t.run_id)
    return ok


# ---------------------------------------------------------------- sweeper queries


def reclaim_dead_workers(conn: Connection, now: datetime, dead_after: float
                         ) -> tuple[list[str], list[str], list[Any]]:
    """Forget workers whose heartbeat is stale.

    Returns (those workers, attempts to send again, attempts that may have died with them).
    Certain: the attempts they had started, and those they committed but perhaps never
    published. Possible: attempts published before they died and not started since; a
    message fetched but not yet started dies with its worker (the caller checks which of
    these are still queued in the broker). An attempt a dead worker published and a live one
    is running unclaimed (shorter than ``claim_after`` so far) is among the "certain" ones:
    it runs twice, and its second result is ignored. The updates are guarded by state, so
    a result recorded between this select and its update is never undone (the churn chaos
    test caught that race).
    """
    cutoff = now - timedelta(seconds=dead_after)
    rows = conn.execute(select(workers_t.c.id, workers_t.c.last_beat).where(workers_t.c.last_beat < cutoff)).all()
    # A worker killed before its first heartbeat has no row at all: its attempts are orphans.
    orphans = [r.id for r in conn.execute(select(tasks_t.c.id).where(
        tasks_t.c.state == "started", tasks_t.c.started_at < cutoff,
        tasks_t.c.worker.not_in(select(workers_t.c.id))))]
    if orphans:  # guarded: an attempt settled since the select (its result recorded) stays settled
        conn.execute(update(tasks_t).where(tasks_t.c.id.in_(orphans), tasks_t.c.state == "started")
                     .values(state="scheduled", worker=None))
    if not rows:
        return [], orphans, []
    dead = [r.id for r in rows]
    # Anything published a moment ago or earlier may have been fetched by a dead worker (its
    # last beat can predate its last fetch); the caller drops those still queued.
    settled = now - timedelta(seconds=1)
    ids = [r.id for r in conn.execute(select(tasks_t.c.id).where(
        tasks_t.c.worker.in_(dead), tasks_t.c.state.in_(("started", "scheduled")),
        or_(tasks_t.c.not_before.is_(None), tasks_t.c.published_at.is_not(None))))]
    if ids:  # guarded as above: a result recorded meanwhile (by a live worker) must not be undone
        conn.execute(update(tasks_t).where(tasks_t.c.id.in_(ids), tasks_t.c.state.in_(("started", "scheduled")))
                     .values(state="scheduled", worker=None))
    maybe = list(conn.execute(select(tasks_t.c.id, tasks_t.c.options).where(
        tasks_t.c.state == "scheduled", tasks_t.c.published_at.is_not(None), tasks_t.c.published_at <= settled,
        tasks_t.c.id.not_in(ids) if ids else tasks_t.c.id.is_not(None))))
    conn.execute(workers_t.delete().where(workers_t.c.id.in_(dead)))
    return dead, ids + orphans, maybe


def tasks_to_publish(conn: Connection, now: datetime, lost_after: float,
                     limit: int = 500) -> tuple[list[str], list[Any]]:
    """(retries whose backoff has passed, attempts published long ago that nobody started).

    The second are candidates for a message lost with the broker's memory; the caller drops
    those still waiting in a queue.
    """
    due = select(tasks_t.c.id).where(tasks_t.c.state == "scheduled", tasks_t.c.published_at.is_(None),
                                     tasks_t.c.not_before <= now).limit(limit)
    old = select(tasks_t.c.id, tasks_t.c.options).where(
        tasks_t.c.state == "scheduled", tasks_t.c.published_at <= now - timedelta(seconds=lost_after)).limit(limit)
    return [r.id for r in conn.execute(due)], list(conn.execute(old))


def stalled_started(conn: Connection, now: datetime, lost_after: float, limit: int = 500) -> list[Any]:
    """Attempts started ``lost_after`` ago or more (by any worker, alive or not): candidates for
    a message the broker no longer holds, e.g. a pool child died and Celery's requeue was lost.
    The caller keeps those whose message is still queued or fetched and unacknowledged."""
    cutoff = now - timedelta(seconds=lost_after)
    return list(conn.execute(select(tasks_t.c.id, tasks_t.c.options, tasks_t.c.task).where(
        tasks_t.c.state == "started", tasks_t.c.started_at <= cutoff,
        or_(tasks_t.c.published_at.is_(None), tasks_t.c.published_at <= cutoff)).limit(limit)))


def seen_held(conn: Connection, ids: list[str], now: datetime) -> None:
    """Started attempts whose message a worker still holds: look again after another lost_after."""
    conn.execute(update(tasks_t).where(tasks_t.c.id.in_(ids), tasks_t.c.state == "started")
                 .values(published_at=now))


def open_attempts(conn: Connection, run_id: str) -> list[Any]:
    """A run's attempts sent and not settled: started, or scheduled and published."""
    return list(conn.execute(select(tasks_t.c.id, tasks_t.c.state, tasks_t.c.options).where(
        tasks_t.c.run_id == run_id, or_(tasks_t.c.state == "started", and_(
            tasks_t.c.state == "scheduled", tasks_t.c.published_at.is_not(None))))))


def reset_started(conn: Connection, ids: list[str]) -> list[str]:
    """Hand back to the sweeper those of ``ids`` still ``started`` (none settled since); returns them."""
    if not ids:
        return []
    found = [r.id for r in conn.execute(select(tasks_t.c.id).where(tasks_t.c.id.in_(ids),
                                                                   tasks_t.c.state == "started"))]
    if found:
        conn.execute(update(tasks_t).where(tasks_t.c.id.in_(found)).values(state="scheduled", worker=None))
    return found


def stale_runs(conn: Connection, now: datetime, grace: float, limit: int = 200) -> list[str]:
    """Running runs with inputs no committed advance has seen (a lost advance message)."""
    cutoff = now - timedelta(seconds=grace)
    q = select(runs.c.run_id).where(runs.c.status == RunStatus.RUNNING.value, runs.c.needs_advance.is_(True),
                                    runs.c.advance_requested_at <= cutoff).limit(limit)
    ids = [r.run_id for r in conn.execute(q)]
    if ids:
        conn.execute(update(runs).where(runs.c.run_id.in_(ids)).values(advance_requested_at=now))
    return ids


def orphaned_children(conn: Connection, limit: int = 100) -> list[str]:
    """Running children whose parent has ended without them (a cancel lost in a crash).

    Driven from the running children, each parent looked up by its key: the cost follows the
    work in flight, not the failed and cancelled runs the store has ever held (a join sorted
    all of those: 35 ms a sweep at 25,000)."""
    parent = runs.alias("parent")
    parent_status = select(parent.c.status).where(parent.c.run_id == runs.c.parent_run_id).scalar_subquery()
    q = select(runs.c.run_id).where(
        runs.c.status == RunStatus.RUNNING.value, runs.c.parent_run_id.is_not(None),
        parent_status.in_((RunStatus.CANCELLED.value, RunStatus.FAILED.value))).limit(limit)
    return [r.run_id for r in conn.execute(q)]


def mark_published(conn: Connection, ids: list[str], now: datetime) -> None:
    if ids:
        # "started" too: a fast worker may have taken the message before this bookkeeping ran
        conn.execute(update(tasks_t).where(tasks_t.c.id.in_(ids), tasks_t.c.state.in_(("scheduled", "started")))
                     .values(published_at=now, dispatches=tasks_t.c.dispatches + 1))


def seen_queued(conn: Connection, ids: list[str], now: datetime) -> None:
    conn.execute(update(tasks_t).where(tasks_t.c.id.in_(ids), tasks_t.c.state == "scheduled")
                 .values(published_at=now))


def mark_started(conn: Connection, tid: str, worker: str, now: datetime, renewed: datetime | None = None) -> bool:
    """Claim an attempt for a worker; False if it is finished, cancelled or unknown. ``renewed``:
    an eager attempt's claim time (see :func:`renew_claims`)."""
    values: dict[str, Any] = {"state": "started", "worker": worker, "started_at": now}
    if renewed is not None:
        values["published_at"] = renewed
    n = conn.execute(update(tasks_t).where(tasks_t.c.id == tid, tasks_t.c.state.in_(("scheduled", "started")))
                     .values(**values)).rowcount
    return bool(n)


def renew_claims(conn: Connection, ids: list[str], now: datetime) -> None:
    """Eager attempts still running here: no message is held for them, so the lost-task check
    (:func:`stalled_started`, counting from ``published_at``) must see them renewed instead."""
    conn.execute(update(tasks_t).where(tasks_t.c.id.in_(ids), tasks_t.c.state == "started")
                 .values(published_at=now))


def add_attempt_timeout(conn: Connection, tid: str, timeout: float, now: datetime) -> None:
    """Arm the per-attempt timeout of a task that just started (once per attempt)."""
    run_id, step, slot, attempt = tid.rsplit(":", 3)
    exists = conn.execute(select(timers_t.c.id).where(
        timers_t.c.run_id == run_id, timers_t.c.step == int(step), timers_t.c.slot == int(slot),
        timers_t.c.attempt == int(attempt), timers_t.c.kind == "attempt_timeout")).first()
    if exists is None:
        conn.execute(insert(timers_t).values(run_id=run_id, step=int(step), slot=int(slot), attempt=int(attempt),
                                             kind="attempt_timeout", fire_at=now + timedelta(seconds=timeout),
                                             fired=False))


def inbox(conn: Connection, run_id: str) -> list[tuple[int, str, Any]]:
    q = select(signals_t.c.id, signals_t.c.name, signals_t.c.payload).where(
        signals_t.c.run_id == run_id, signals_t.c.consumed_step.is_(None)).order_by(signals_t.c.id)
    return [(int(r.id), r.name, serde.loads(r.payload)) for r in conn.execute(q)]


def history_prefix(events: list[Event], at_step: int) -> list[Event]:
    """The events a fork at ``at_step`` keeps: its start and everything of steps 1..k."""
    keep: list[Event] = []
    for e in events:
        if e.kind == "started" or (e.step is not None and e.step <= at_step and e.kind not in
                                   ("completed", "failed", "cancelled", "continued_as_new")):
            keep.append(e)
    return [Event(i + 1, e.kind, e.step, e.slot, e.payload, e.at, e.key, e.name) for i, e in enumerate(keep)]
