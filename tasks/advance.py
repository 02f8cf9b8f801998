"""Advance a run: lock it, replay (or continue the cached generator), commit, then publish.

One transaction holds the run's row lock from loading the history to writing the
decision, so two workers can never both decide the same step; the unique ``(run_id,
seq)`` index backs this up. Publishing happens only after the commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, OperationalError

from persistence import hot
from persistence import recording as rec
from persistence import runtime as rt
from persistence.models import utcnow
from sdk.errors import BatonError, WorkflowNotFound
from sdk.events import Decision, Event, RunStatus
from sdk.replay import InboxSignal, Instance, failure

from . import dispatch
from .faults import fault

if TYPE_CHECKING:
    from .wiring import Runtime

log = logging.getLogger("baton.advance")

DB_RETRY_SECONDS = 90.0  # how long a worker keeps retrying through a database outage
FANS_REMEMBERED = 10_000  # runs whose fan-out a process remembers (a hint: forgetting costs a round trip)


@dataclass
class Guessed:
    """A decision a cached generator took before the lock that the one-round-trip write does not
    carry (an ending, a child, a cancel, a signal wait): :func:`guess` hands it to the
    usual path, which commits it if the run is still exactly where the generator left it, instead
    of replaying the whole history into a new generator. Falsy, like any ``guess`` that committed
    nothing."""

    inst: Instance
    seq: int  # the run's last_seq the generator decided from
    event: Event  # the attempt's outcome it was fed
    decision: Decision
    now: datetime  # the clock it decided with
    known: Any  # the run's locals as last committed (rt.UNKNOWN if not known)
    empty_inbox: bool = False  # it waits on a signal, decided with no signal received yet

    def __bool__(self) -> bool:
        return False

    def fits(self, conn: Connection, run: Any, committed: int, pending: list[Event]) -> bool:
        """Whether the locked run is where the generator left it, with only this outcome appended
        (and, for a signal wait, still no signal waiting in its inbox)."""
        if committed != self.seq or run.decided_seq != self.seq or len(pending) != 1:
            return False
        e, g = pending[0], self.event
        if (e.seq, e.kind, e.step, e.slot, e.key, e.payload) != (g.seq, g.kind, g.step, g.slot, g.key, g.payload):
            return False
        return not (self.empty_inbox and rt.inbox(conn, run.run_id))


def advance(runtime: Runtime, run_id: str, before: Callable[[Connection], Any] | None = None,
            publisher: str | None = None, guessed: Guessed | None = None) -> None:
    """Advance ``run_id``; ``before(conn)`` runs first in the same transaction and returns
    ``(locked run, appended event or None)`` (or None: nothing to decide), e.g. to record an
    activity's result. ``guessed``: see :class:`Guessed` (used on the first try only)."""
    store = runtime.store
    deadline = time.monotonic() + DB_RETRY_SECONDS
    delay = 0.05
    while True:
        inst: Instance | None = None
        try:
            with store.tx() as conn:
                if before is not None:
                    got = before(conn)
                    if got is None:
                        return  # nothing to decide (a duplicate, or a fan-out's non-final result): commit
                    run = got[0]
                else:  # lock, and read what the cached generator lacks, in one round trip
                    after = runtime.cache.seq_of(run_id)
                    locked = hot.lock(conn, run_id, after)
                    if locked is None:
                        return
                    run = SimpleNamespace(**locked[0])
                    if locked[1] is not None:
                        run.prefetched = (after, locked[1])
                out, inst, status = _decide(runtime, conn, run, publisher, guessed)
            _committed(runtime, run_id, out, inst if status is RunStatus.RUNNING else None)
            return
        except (OperationalError, DBAPIError) as exc:
            runtime.cache.take(run_id)
            guessed = None
            if time.monotonic() > deadline:
                raise
            log.warning("baton: database error advancing %s, retrying in %.2fs: %s", run_id, delay,
                        str(exc).splitlines()[0])
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        except Exception:
            runtime.cache.take(run_id)
            raise


def _committed(runtime: Runtime, run_id: str, out: rt.Outbox, inst: Instance | None) -> None:
    """After a decision's commit: remember the run's fan-out, keep its live generator (None if
    the run is no longer running), then publish (a broker down leaves the sweeper to re-send)."""
    if out.fan_step is not None:
        if len(runtime.fans) >= FANS_REMEMBERED:
            runtime.fans.clear()
        runtime.fans[run_id] = out.fan_step
    else:
        runtime.fans.pop(run_id, None)
    if inst is not None:
        inst.seq = out.last_seq
        if out.locals is not rt.UNKNOWN:
            inst.host["locals"] = out.locals
        runtime.cache.put(run_id, inst)
    fault("after_commit")
    try:
        dispatch.send(runtime, out)
    except Exception as exc:  # the broker is down: the commit stands, the sweeper re-sends
        log.warning("baton: publishing for %s failed, the sweeper will re-send: %s", run_id, exc)
        dispatch.defer(runtime, [m["id"] for m in out.publish])


def _decide(runtime: Runtime, conn: Connection, run: Any, publisher: str | None,
            guessed: Guessed | None = None) -> tuple[rt.Outbox, Instance | None, RunStatus]:
    store = runtime.store
    status = RunStatus(run.status)
    if status.terminal or status is RunStatus.BLOCKED:
        rt.keep_inputs(conn, run, utcnow())  # a blocked run keeps its results for when it is resumed
        return rt.Outbox(), None, status
    if not run.needs_advance and run.decided_seq >= run.last_seq:
        return rt.Outbox(), None, status
    try:
        defn = runtime.definition(run.workflow)
    except WorkflowNotFound as exc:
        # Another worker may have the code; keep the run flagged so the sweeper re-drives it.
        log.error("baton: cannot advance run %s: %s", run.run_id, exc)
        rt.keep_inputs(conn, run, utcnow())
        store.touch_run(conn, run.run_id, run.last_seq)
        return rt.Outbox(), None, status
    rec.harvest(conn, run)  # a fan-out's results kept in attempt rows join the history first
    pending: list[Event] = getattr(run, "pending", None) or []  # appended in this transaction, not yet written
    committed = pending[0].seq - 1 if pending else run.last_seq  # the last event already in the store
    if guessed is not None and guessed.inst.definition is defn and guessed.fits(conn, run, committed, pending):
        runtime.cache.take(run.run_id)
        run.pending = [guessed.event]  # the outcome exactly as the generator saw it (its time too)
        if guessed.known is not rt.UNKNOWN:
            run.known_locals = guessed.known
        decision = guessed.decision
        out = rt.commit_decision(store, conn, run, decision, guessed.now, publisher)
        return out, guessed.inst, decision.status
    inst = runtime.cache.take(run.run_id)
    if inst is None or inst.poisoned or inst.finished or inst.seq > committed or inst.definition is not defn:
        inst = Instance(defn, run.run_id, runtime.baton.max_payload_bytes)
    if inst.seq == committed and inst.seq > 0:
        events = pending  # cache hit: the only new events are those this transaction appends
        known = inst.host.get("locals", rt.UNKNOWN)
        if known is not rt.UNKNOWN:
            run.known_locals = known  # so the checkpoint delta needs no read of the run's locals
    else:
        pre = getattr(run, "prefetched", None)  # read with the record, for the cached instance's seq
        stored = pre[1] if pre is not None and pre[0] == inst.seq else store.events(run.run_id, after=inst.seq,
                                                                                   conn=conn)
        events = stored + [e for e in pending if e.seq > inst.seq]
    now = utcnow()  # after the history read: the decision's clock (timers, backoffs, event times)
    try:
        decision = inst.activate(events, now=now, decided_seq=run.decided_seq,
                                 inbox=lambda: [InboxSignal(i, n, p) for i, n, p in rt.inbox(conn, run.run_id)])
    except BatonError as exc:  # a corrupt history: block the run visibly rather than retry forever
        inst.poisoned = True
        decision = Decision(status=RunStatus.BLOCKED, error=failure(exc))
    if decision.status is RunStatus.BLOCKED:
        log.error("baton: run %s blocked: %s", run.run_id, (decision.error or {}).get("message"))
    out = rt.commit_decision(store, conn, run, decision, now, publisher)
    return out, inst, decision.status


def record(runtime: Runtime, task_id: str, task_name: str, ok: bool, value: Any, publisher: str,
           started_at: Any, *, try_guess: bool = True, hand_over: bool = True) -> None:
    """Record an attempt's outcome and advance its run: in one round trip when this process's
    cached generator can decide (:func:`guess`, PostgreSQL), else the usual path (lock, record,
    decide, commit), which gets the generator's decision when :func:`guess` hands one over.
    Database errors past the usual path's retries propagate: the caller must not ack then.
    ``try_guess`` / ``hand_over`` off: the older, slower ways (for ``bench/hotpath.py``)."""
    run_id = rt.run_of_task(task_id)
    guessed: Guessed | None = None
    if try_guess and not runtime.store.sqlite:
        try:
            got = guess(runtime, task_id, task_name, ok, value, publisher, started_at)
            if got is True:
                return
            if isinstance(got, Guessed) and hand_over:
                guessed = got
        except Exception as exc:  # the usual path retries, and its guard sees whether this one committed
            runtime.cache.take(run_id)
            log.warning("baton: recording %s in one round trip failed, taking the usual path: %s", task_id, exc)
    # What the cached generator (or the one that guessed) lacks, read with the record.
    after = guessed.seq if guessed is not None else runtime.cache.seq_of(run_id)

    def before(conn: Connection) -> Any:
        return rec.record_attempt(conn, runtime.store, task_id, ok, value, utcnow(), publisher, started_at, after,
                                  runtime.fans)

    advance(runtime, run_id, before=before, publisher=publisher, guessed=guessed)


def guess(runtime: Runtime, task_id: str, task_name: str, ok: bool, value: Any, publisher: str,
          started_at: Any) -> bool | Guessed:
    """Record an attempt's outcome and advance its run in one round trip (PostgreSQL), when this
    process's cached generator waits on exactly that attempt: it decides *before* the lock, and
    the commit checks, in the statement that locks the run, that the run is still where the
    generator left it (same ``last_seq``, running) and the attempt still open. True if so.

    False leaves everything to the usual path: nothing was written, and the generator (which
    may have moved on) is dropped from the cache, so the usual path replays. When the decision
    is not plain (an ending, a child, a cancel), or waits on a signal (decided as if
    none had arrived: only the lock can tell), nothing is written either, and a (falsy)
    :class:`Guessed` hands the decision and its generator to the usual path, which commits it
    if it still holds, without replaying.
    """
    run_id, step, slot, attempt = rt.split_task_id(task_id)
    inst = runtime.cache.items.get(run_id)
    known = inst.host.get("locals", rt.UNKNOWN) if inst is not None else rt.UNKNOWN
    if inst is None or known is rt.UNKNOWN or not inst.awaits_only(step, slot, attempt):
        return False
    try:
        if runtime.definition(inst.definition.name) is not inst.definition:
            return False
    except WorkflowNotFound:
        return False
    runtime.cache.take(run_id)
    seq, now = inst.seq, utcnow()
    kind, payload = rec.outcome(ok, attempt, value)
    ev = Event(seq + 1, kind, step, slot, payload, now, rt.attempt_key(step, slot, attempt), task_name)

    asked: list[bool] = []

    def empty_inbox() -> list[InboxSignal]:
        asked.append(True)
        return []  # assumed empty: checked under the run's lock before the decision is used

    try:
        decision = inst.activate([ev], now=now, decided_seq=seq, inbox=empty_inbox)
    except BatonError:
        return False
    if asked or decision.status is not RunStatus.RUNNING or not rt.plain(decision):
        return Guessed(inst, seq, ev, decision, now, known, empty_inbox=bool(asked))
    with runtime.store.tx() as conn:
        out = rec.commit_guessed(conn, run_id, seq, task_id, ok, ev, decision, now, publisher, started_at, known)
    if out is None:
        return False
    _committed(runtime, run_id, out, inst)
    return True
