"""Recovery without beat: a thread in every worker's main process.

Each tick writes this worker's heartbeat; the worker holding the ``sweeper`` lease then
fires due timers, re-dispatches attempts held by dead workers (stale heartbeat) and those
they committed but may not have published, re-sends messages presumed lost, and re-drives runs
whose advance was lost. Every action is idempotent, so a lease handed over mid-tick costs
at most a duplicate message.

A thread, not the worker's event-loop timer, so that a solo-pool worker busy in a long
task still proves it is alive; being alive but stuck is what step timeouts are for.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from celery import signals

from persistence import runtime as rt
from persistence import timers
from persistence.models import utcnow

from . import dispatch
from .activities import worker_id

if TYPE_CHECKING:
    from .wiring import Runtime

log = logging.getLogger("baton.sweeper")

STALE_RUN_GRACE = 10.0  # seconds a run may wait for its advance before it is re-driven
# Children left running by a parent that ended (its cancel lost in a crash) are rare, and looking
# for them costs a lookup per running child: at a worker's first sweep, then every 30 s.
ORPHAN_CHECK_SECONDS = 30.0


class Sweeper:
    def __init__(self, runtime: Runtime, hostname: str, consumer: Any = None) -> None:
        self.runtime = runtime
        self.hostname = hostname
        self.consumer = consumer
        self.id = worker_id(hostname)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="baton-sweeper", daemon=True)
        self.recoveries = 0
        self.next_orphan_check = 0.0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)
        try:
            self.runtime.store.forget_worker(self.id)
        except Exception as exc:
            log.warning("baton: could not remove heartbeat of %s: %s", self.id, exc)

    def loop(self) -> None:
        interval = self.runtime.baton.sweep_interval
        wait = 0.0  # beat at once: a worker may take tasks before its first interval is up
        while not self.stop_event.wait(wait):
            wait = interval
            try:
                self.tick()
            except Exception as exc:  # a database outage must not kill the thread
                log.warning("baton: sweep failed: %s", str(exc).splitlines()[0] if str(exc) else exc)

    def tick(self) -> None:
        self.runtime.follow_events(self.consumer)
        store = self.runtime.store
        app = self.runtime.app
        names = [n for n in app.tasks if not n.startswith("celery.")]
        names += [f"workflow:{w}" for w in self.runtime.baton.workflows]
        store.heartbeat(self.id, self.hostname, os.getpid(), names)
        now = utcnow()
        lease = timedelta(seconds=max(3 * self.runtime.baton.sweep_interval, 3.0))
        if store.take_lease("sweeper", self.id, now + lease, now):
            self.sweep(now)

    def sweep(self, now: Any) -> rt.Outbox:
        baton = self.runtime.baton
        store = self.runtime.store
        self.fire_timers(now)
        out = rt.Outbox()
        with store.tx() as conn:
            dead, redo, maybe = rt.reclaim_dead_workers(conn, now, baton.dead_after)
        if maybe:
            queued = dispatch.queued_task_ids(self.runtime, maybe)
            redo += [m.id for m in maybe if m.id not in queued]
        if dead:
            log.warning("baton: worker(s) %s stopped heartbeating; re-dispatching %d attempt(s)",
                        ", ".join(dead), len(redo))
        out.republish += redo
        with store.read() as conn:
            retries, old = rt.tasks_to_publish(conn, now, baton.lost_after)
        out.republish += retries
        if old:
            queued = dispatch.queued_task_ids(self.runtime, old)
            out.republish += [r.id for r in old if r.id not in queued]
            still = [r.id for r in old if r.id in queued]
            if still:  # merely waiting in a long queue: look again after another lost_after
                with store.tx() as conn:
                    rt.seen_queued(conn, still, now)
        # Started long ago, and the message neither queued nor held unacknowledged by any worker:
        # nothing will deliver it again (a pool child died and Celery's requeue was lost).
        # Only a Redis broker can tell; elsewhere nothing is reset.
        with store.read() as conn:
            stalled = [r for r in rt.stalled_started(conn, now, baton.lost_after)
                       if dispatch.acked_late(self.runtime.app, r.task)]
        if stalled and dispatch.can_list_queues(self.runtime):
            held = dispatch.queued_task_ids(self.runtime, stalled, unacked=True)
            gone = [r.id for r in stalled if r.id not in held]
            if len(gone) < len(stalled):
                with store.tx() as conn:
                    rt.seen_held(conn, [r.id for r in stalled if r.id in held], now)
            if gone:
                with store.tx() as conn:
                    gone = rt.reset_started(conn, gone)
                if gone:
                    log.warning("baton: attempt(s) %s started, but their message is gone from the broker; "
                                "re-dispatching", ", ".join(gone))
                    redo += gone
                    out.republish += gone
        with store.tx() as conn:
            stale = rt.stale_runs(conn, now, STALE_RUN_GRACE)
        out.advance += stale
        if time.monotonic() >= self.next_orphan_check:
            self.next_orphan_check = time.monotonic() + ORPHAN_CHECK_SECONDS
            with store.read() as conn:
                out.cancel_runs += [(r, "its parent run ended") for r in rt.orphaned_children(conn)]
        self.recoveries += len(redo) + len(stale)
        out.republish = list(dict.fromkeys(out.republish))
        dispatch.send(self.runtime, out)
        return out

    def fire_timers(self, now: Any) -> int:  # timers settled
        """Fire due timers, a batch per transaction, waking each batch's runs once it commits;
        for one sweep interval at most (the sweeps that follow drain a burst of thousands)."""
        store = self.runtime.store
        budget = time.monotonic() + self.runtime.baton.sweep_interval
        total = 0
        while True:
            woken = rt.Outbox()
            with store.tx() as conn:
                looked, settled = timers.fire_due(store, conn, now, woken)
            dispatch.send(self.runtime, woken)
            total += settled
            if looked < timers.BATCH or not settled or time.monotonic() > budget:
                return total


def install(runtime: Runtime) -> None:
    holder: dict[str, Sweeper] = {}

    def ready(sender: Any = None, **_: Any) -> None:
        app = getattr(sender, "app", None)
        if app is not None and app is not runtime.app:
            return
        hostname = str(getattr(sender, "hostname", None) or "worker")
        sweeper = Sweeper(runtime, hostname, sender)
        holder["s"] = sweeper
        sweeper.start()

    def shutdown(**_: Any) -> None:
        sweeper = holder.pop("s", None)
        if sweeper is not None:
            sweeper.stop()

    signals.worker_ready.connect(ready, weak=False)
    signals.worker_shutdown.connect(shutdown, weak=False)
