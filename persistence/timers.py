"""Firing due timers in batches: one transaction and a handful of statements per batch.

Thousands of runs that slept the same hour fall due together. Fired one transaction each
(read the timer, lock its run, mark it, check for a duplicate, bump the run's seq, insert
the event, flag the run, commit: about 5 ms per timer here), a sweep a second fired about
100 a second and the last run of a burst of 3,000 woke half a minute late. A batch locks
its runs in one statement, skipping any a worker holds at that moment (they are due again
at the next sweep, and waiting on them could deadlock against a worker that locks a child
and then its parent), and writes the events and the runs' new ``last_seq`` in one statement
each. An ``attempt_timeout`` timer (rare: a step overran its timeout) takes the one-by-one
path, which also fails the attempt and kills its task.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from sdk import serde
from sdk.events import RunStatus

from .models import utcnow
from .runtime import Outbox, fire_timer, timer_key
from .store import Store, events_t, runs, timers_t

BATCH = 200  # timers per transaction


def fire_due(store: Store, conn: Connection, now: datetime, out: Outbox, limit: int = BATCH) -> tuple[int, int]:
    """Fire up to ``limit`` timers due at ``now``; returns (timers looked at, timers no longer
    due). The runs to wake are added to ``out.advance``.

    A timer whose run a worker has locked is left for the next call; one whose run has ended
    or is gone is marked fired and wakes nothing.
    """
    due = conn.execute(
        select(timers_t.c.id, timers_t.c.run_id, timers_t.c.step, timers_t.c.slot, timers_t.c.kind)
        .where(timers_t.c.fired.is_(False), timers_t.c.fire_at <= now)
        .order_by(timers_t.c.fire_at, timers_t.c.id).limit(limit)).all()
    if not due:
        return 0, 0
    wanted = sorted({t.run_id for t in due})
    locked = {r.run_id: r for r in conn.execute(
        select(runs.c.run_id, runs.c.status, runs.c.last_seq).where(runs.c.run_id.in_(wanted))
        .order_by(runs.c.run_id).with_for_update(skip_locked=True))}
    settled = 0
    absent = set(wanted) - set(locked)
    if absent:  # locked by a worker (next time), or gone (mark its timers fired: nothing to wake)
        present = set(conn.execute(select(runs.c.run_id).where(runs.c.run_id.in_(absent))).scalars())
        gone = [t.id for t in due if t.run_id in absent - present]
        if gone:
            conn.execute(update(timers_t).where(timers_t.c.id.in_(gone)).values(fired=True))
            settled += len(gone)
    appended = 0
    plain = []
    for t in due:
        if t.run_id not in locked:
            continue
        if t.kind == "attempt_timeout":
            appended += fire_timer(store, conn, t.id, out)
            settled += 1
        else:
            plain.append(t)
    if not plain:
        return len(due), settled
    if appended:  # an attempt's timeout appended to its run: read the seqs again
        locked.update({r.run_id: r for r in conn.execute(
            select(runs.c.run_id, runs.c.status, runs.c.last_seq).where(runs.c.run_id.in_(wanted)))
            if r.run_id in locked})
    marked = set(conn.execute(update(timers_t).where(timers_t.c.id.in_([t.id for t in plain]),
                                                     timers_t.c.fired.is_(False))
                              .values(fired=True).returning(timers_t.c.id)).scalars())
    settled += len(marked)
    live = [t for t in plain if t.id in marked and not RunStatus(locked[t.run_id].status).terminal]
    if not live:
        return len(due), settled
    keys = {timer_key(t.step, t.slot) for t in live}
    seen = {(r.run_id, r.key) for r in conn.execute(
        select(events_t.c.run_id, events_t.c.key)
        .where(events_t.c.run_id.in_({t.run_id for t in live}), events_t.c.key.in_(keys)))}
    last = {rid: int(r.last_seq) for rid, r in locked.items()}
    at = utcnow()
    rows: list[dict[str, Any]] = []
    for t in live:
        key = timer_key(t.step, t.slot)
        if (t.run_id, key) in seen:
            continue
        seen.add((t.run_id, key))
        last[t.run_id] += 1
        rows.append({"run_id": t.run_id, "seq": last[t.run_id], "kind": "timer_fired", "step": t.step,
                     "slot": t.slot, "name": "", "key": key, "at": at,
                     "payload": serde.dumps({"kind": t.kind}, "event", None)})
    if not rows:
        return len(due), settled
    conn.execute(insert(events_t), rows)
    woken = list(dict.fromkeys(r["run_id"] for r in rows))
    conn.execute(update(runs).where(runs.c.run_id == bindparam("rid")).values(
        last_seq=bindparam("seq"), needs_advance=True, advance_requested_at=at, updated_at=at),
        [{"rid": rid, "seq": last[rid]} for rid in woken])
    out.advance += woken
    return len(due), settled
