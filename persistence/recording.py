"""Recording an activity attempt's outcome: the hot path's three ways in.

* :func:`record_attempt`: lock the run, settle the attempt, append its event for the decision
  that follows in the same transaction (or keep a fan-out's result in its row);
* :func:`record_fanned`: a fan-out's non-final success in one autocommit statement;
* :func:`commit_guessed`: the outcome and a decision a cached generator took before the lock,
  in one guarded round trip.

:func:`harvest` moves a fan-out's kept results into the history before any decision.
"""

from __future__ import annotations

import logging
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection

from sdk import serde
from sdk.events import Decision, Event, RunStatus

from . import hot
from .runtime import Outbox, attempt_key, commit_plain, split_task_id
from .store import Store

log = logging.getLogger("baton.store")


def outcome(ok: bool, attempt: int, value: Any) -> tuple[str, dict[str, Any]]:
    """An attempt's outcome as an input event: (kind, payload)."""
    return ("activity_completed" if ok else "activity_failed"), {"attempt": attempt, "result" if ok else "error": value}


def record_attempt(conn: Connection, store: Store, tid: str, ok: bool, value: Any, now: datetime,
                   worker: str | None = None, started_at: datetime | None = None,
                   history_after: int | None = None, fans: dict[str, int] | None = None,
                   ) -> tuple[SimpleNamespace, Event | None] | None:
    """Record an attempt's outcome once, on the hot path.

    Returns the locked run (``last_seq`` including the new event, which waits in
    ``run.pending`` to be written with the decision's events in one statement) and the
    event, or None when there is nothing to decide: a late or duplicate result, or a
    success in the run's current fan-out with other slots still open (kept in the attempt's
    row, see :func:`harvest`). The last open slot of a fan-out returns the run with no event:
    the decision harvests them all. One statement reads the attempt and locks its run; the
    guarded update of the attempt's state is the idempotency check (it takes the attempt's
    row lock and sees its latest state), backed by the unique ``(run_id, key)`` index.
    ``worker`` (who ran it) and ``started_at`` are written unless a claim wrote them. With
    ``history_after``, the run's events after that seq come along as ``run.prefetched``.
    ``fans`` (run id -> step) learns which runs wait on a fan-out, for :func:`record_fanned`.
    """
    rid, _, _, attempt_n = split_task_id(tid)
    kind, payload = outcome(ok, attempt_n, value)
    kept = serde.dumps_known(payload, "event") if ok else None
    got = hot.record(conn, tid, rid, ok, now, worker, started_at, kept, history_after)
    if got is None:
        log.warning("baton: result for unknown task %s ignored", tid)
        return None
    row, settled, open_left, history = got
    if not settled or RunStatus(row["status"]).terminal:
        log.info("baton: late or duplicate result for %s ignored (attempt already %s, run %s)", tid,
                 row["task_state"], row["status"])
        return None
    if open_left is not None and open_left > 0:
        if fans is not None:
            fans[rid] = row["task_step"]
        return None  # kept in the attempt's row; the fan-out's last completion decides
    if fans is not None:
        fans.pop(rid, None)
    run = SimpleNamespace(**{c: row[c] for c in hot.HOT_RUN_COLUMNS})
    if row["last_seq"] > (history_after or 0):
        run.locals = row["locals"]  # the cached generator (if any) is behind: its locals are stale
    run.needs_advance = True
    run.pending = []
    if history is not None and history_after is not None:
        run.prefetched = (history_after, history)
    if open_left is not None:
        return run, None  # the last slot of a fan-out: its result is harvested with the others
    step, slot, attempt = row["task_step"], row["task_slot"], row["task_attempt"]
    run.last_seq += 1
    ev = Event(run.last_seq, kind, step, slot, payload, now, attempt_key(step, slot, attempt), row["task_task"])
    run.pending = [ev]
    return run, ev


def record_fanned(conn: Connection, tid: str, step: int, value: Any, now: datetime, worker: str | None,
                  started_at: datetime | None) -> str:
    """Record a success expected to belong to its run's current fan-out, in one round trip
    that also commits (PostgreSQL). Returns ``"kept"`` (other slots still open: nothing to
    decide), ``"last"`` (the fan-out is complete and the run flagged: advance it now),
    ``"duplicate"`` (already settled) or ``"other"`` (not the current fan-out: nothing was
    written; record it with :func:`record_attempt`)."""
    run_id, _, _, attempt = split_task_id(tid)
    _, payload = outcome(True, attempt, value)
    matched, settled, open_left = hot.record_fanned(conn, tid, run_id, step, now, worker, started_at,
                                                    serde.dumps_known(payload, "event"))
    if not matched:
        return "other"
    if not settled:
        log.info("baton: late or duplicate result for %s ignored", tid)
        return "duplicate"
    return "kept" if open_left else "last"


def harvest(conn: Connection, run: Any) -> None:
    """Move the results of the run's current fan-out kept in attempt rows into its history:
    appended (as ``run.pending``) before the run is decided, so that the engine sees every
    outcome its counter counted. Called by every decision on a locked run."""
    step = getattr(run, "fan_step", None)
    if step is None or step != run.step or run.status != RunStatus.RUNNING.value:
        return
    rows = hot.harvest(conn, run.run_id, step)
    if not rows:
        return
    pending: list[Event] = list(getattr(run, "pending", None) or [])
    for slot, attempt, task, result, at in rows:
        run.last_seq += 1
        pending.append(Event(run.last_seq, "activity_completed", step, slot, serde.loads(result), at,
                             attempt_key(step, slot, attempt), task))
    run.pending = pending
    run.needs_advance = True


def commit_guessed(conn: Connection, run_id: str, seq: int, tid: str, ok: bool, ev: Event, d: Decision,
                   now: datetime, publisher: str | None, started_at: datetime | None, known_locals: Any,
                   ) -> Outbox | None:
    """Record an attempt's outcome ``ev`` and commit the plain decision ``d`` a cached generator
    took *before* locking the run, assuming the run still at ``seq`` (as that generator left it)
    and the attempt open: PostgreSQL, one round trip. None if the guess was wrong: nothing
    written (the caller records it the usual way)."""
    run = SimpleNamespace(run_id=run_id, last_seq=ev.seq, known_locals=known_locals)
    guard = {"run_id": run_id, "seq": seq, "tid": tid, "state": "done" if ok else "failed", "now": now,
             "worker": publisher, "started": started_at}
    return commit_plain(conn, run, d, now, publisher, [ev], Outbox(), guard)
