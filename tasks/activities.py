"""Hooks around every activity a workflow yielded, in the pool process that runs it.

``task_postrun`` records the outcome and advances the run inline, in one transaction,
*before* Celery acknowledges the message (``acks_late``). If the store stays unreachable
past the retry window the process exits, so the message is redelivered rather than
acknowledged with its result lost.

Claiming an attempt (marking it ``started`` by this worker, so that the worker's death is
noticed and the attempt re-sent) costs a transaction. A task that ends within
``Baton(claim_after=...)`` (0.2 s) never needs it: its result is recorded first. So
``task_prerun`` only notes the start, and a claimer thread claims, in one batch, the tasks
still running after ``claim_after``. A task that dies unclaimed with its worker is re-sent
like a message the worker had fetched (see ``reclaim_dead_workers``). A task with a timeout
is claimed at once, arming its timer, and so is every task with ``claim_after=0``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery import signals

from persistence import recording as rec
from persistence import runtime as rt
from persistence.models import utcnow
from sdk import serde
from sdk.errors import SerializationError

from . import advance as adv
from . import eager
from .dispatch import HEADER_RUN, HEADER_TIMEOUT
from .faults import fault

if TYPE_CHECKING:
    from .wiring import Runtime

log = logging.getLogger("baton.activities")

_main_pid = os.getpid()


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


class Claimer:
    """Claims, in batches, the attempts this process has been running for ``claim_after`` s.

    An eager attempt (``tasks.eager``) has no message a worker holds while it runs, which is how
    the sweeper tells a long task from a lost one; so while it runs, its claim is renewed every
    ``lost_after / 4`` s (``published_at``, which the lost-task check counts from)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.after = runtime.baton.claim_after
        self.renew_every = runtime.baton.lost_after / 4
        self.running: dict[str, tuple[float, Any, str]] = {}  # task id -> (monotonic start, start, worker)
        self.claimed: set[str] = set()
        self.eager: dict[str, float] = {}  # running eager attempts -> monotonic time of their last claim
        self.wake = threading.Event()  # set while there is anything to claim or renew
        self.poke = threading.Event()  # cuts a sleep short: a start needs a claim before it ends
        self.until = 0.0  # monotonic end of the loop's current sleep (inf while it looks)
        self.pid = -1

    def started(self, task_id: str, worker: str, eager: bool = False, claimed: datetime | None = None) -> None:
        """Note a start; ``claimed``: the time it was already claimed with (then only renewed)."""
        if self.pid != os.getpid():  # first task in this (forked) process: start the thread here
            self.pid = os.getpid()
            self.running.clear()
            self.claimed.clear()
            self.eager.clear()
            threading.Thread(target=self.loop, name="baton-claimer", daemon=True).start()
        now = time.monotonic()
        if eager:
            self.eager[task_id] = now
        self.running[task_id] = (now, claimed or utcnow(), worker)
        if claimed is not None:
            self.claimed.add(task_id)
        if not self.wake.is_set():
            self.wake.set()
        elif self.until > now + self.after:  # asleep until a renewal, past this start's claim
            self.poke.set()

    def finished(self, task_id: str) -> Any:
        """When the task started (None if this process did not see it start)."""
        self.claimed.discard(task_id)
        self.eager.pop(task_id, None)
        entry = self.running.pop(task_id, None)
        return entry[1] if entry else None

    def _unclaimed(self) -> list[tuple[float, str]]:
        return [(v[0], tid) for tid, v in list(self.running.items()) if tid not in self.claimed]

    def _renewals(self) -> list[tuple[float, str]]:
        return [(t, tid) for tid, t in list(self.eager.items()) if tid in self.claimed]

    def loop(self) -> None:
        while True:
            self.wake.wait()
            self.until = float("inf")  # a start from here on pokes: the look below may miss it
            unclaimed, renewals = self._unclaimed(), self._renewals()
            if not unclaimed and not renewals:
                self.wake.clear()
                if self._unclaimed() or self._renewals():  # one started between the look and the clear
                    self.wake.set()
                continue
            now = time.monotonic()
            wait = min([t0 + self.after for t0, _ in unclaimed] + [t + self.renew_every for t, _ in renewals]) - now
            if wait > 0:
                if wait <= self.after:  # no start from now on can be due sooner
                    self.until = 0.0
                    time.sleep(wait + 0.001)
                else:  # waiting for a renewal: a start must cut it short
                    self.until = now + wait
                    self.poke.wait(wait + 0.001)
                    self.poke.clear()
                continue
            due = {tid: v for t0, tid in unclaimed if now - t0 >= self.after and (v := self.running.get(tid))}
            renew = [tid for t, tid in renewals if now - t >= self.renew_every]
            try:
                with self.runtime.store.tx() as conn:
                    at = utcnow()
                    for tid, (_, start, worker) in due.items():
                        rt.mark_started(conn, tid, worker, start, renewed=at if tid in self.eager else None)
                    if renew:
                        rt.renew_claims(conn, renew, at)
                self.claimed.update(tid for tid in due if tid in self.running)
                self.claimed.intersection_update(list(self.running))
                for tid in [*due, *renew]:
                    if tid in self.eager:
                        self.eager[tid] = now
            except Exception as exc:  # the store is down: try again shortly
                log.warning("baton: could not claim %d running attempt(s): %s", len(due) + len(renew), exc)
                time.sleep(max(self.after, 0.5))


def on_prerun(runtime: Runtime, task_id: str, task: Any, headers: dict[str, Any]) -> None:
    me = worker_id(str(task.request.hostname or "unknown"))
    timeout = headers.get(HEADER_TIMEOUT)
    is_eager = eager.running()
    if not timeout and runtime.baton.claim_after > 0:
        runtime.claimer.started(task_id, me, is_eager)
        return
    store = runtime.store
    now = utcnow()
    try:
        with store.tx() as conn:
            if rt.mark_started(conn, task_id, me, now, renewed=now if is_eager else None) and timeout:
                rt.add_attempt_timeout(conn, task_id, float(timeout), now)
    except Exception as exc:  # the run still completes: the result is recorded in postrun
        log.warning("baton: could not mark %s started: %s", task_id, exc)
    if is_eager:  # renew its claim while it runs
        runtime.claimer.started(task_id, me, eager=True, claimed=now)


def on_postrun(runtime: Runtime, task_id: str, task: Any, retval: Any, state: str) -> None:
    started_at = runtime.claimer.finished(task_id)
    if state not in ("SUCCESS", "FAILURE"):
        return  # RETRY / IGNORED / REJECTED: Celery will deliver it again, or it was never ours
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
    me = worker_id(str(task.request.hostname or "unknown"))
    run_id = rt.run_of_task(task_id)
    fault("before_record")

    def record() -> None:
        if not store.sqlite and ok and _fanned(runtime, task_id, run_id, value, me, started_at):
            return
        try:
            adv.record(runtime, task_id, task.name, ok, value, me, started_at)
        except Exception:
            # Never let Celery ack a message whose result we could not record: die, and the
            # message is redelivered (and the sweeper re-dispatches the attempt).
            log.critical("baton: could not record the result of %s; exiting so it is redelivered", task_id,
                         exc_info=True)
            logging.shutdown()
            os._exit(70)

    eager.drive(runtime, task, run_id, record)  # with eager_steps, then runs the next activities it kept here
    fault("after_publish")  # recorded and published, not yet acknowledged


def _fanned(runtime: Runtime, task_id: str, run_id: str, value: Any, me: str, started_at: Any) -> bool:
    """Record a success of the fan-out its run waits on (as this process last saw it) in one
    round trip; True if that settled it. False sends it down the usual path: another step, or
    a database error (the usual path retries, and its guard sees whether this one committed)."""
    step = rt.split_task_id(task_id)[1]
    if runtime.fans.get(run_id) != step:
        return False
    try:
        with runtime.store.single() as conn:
            outcome = rec.record_fanned(conn, task_id, step, value, utcnow(), me, started_at)
    except Exception as exc:
        log.warning("baton: recording %s in its fan-out failed, taking the usual path: %s", task_id, exc)
        return False
    if outcome == "other":
        runtime.fans.pop(run_id, None)
        return False
    if outcome == "last":
        runtime.fans.pop(run_id, None)
        fault("after_fan_in")
        try:  # committed with the run flagged: if this fails, the sweeper decides it
            adv.advance(runtime, run_id, publisher=me)
        except Exception as exc:
            log.warning("baton: advancing %s after its fan-out failed; the sweeper will: %s", run_id, exc)
    return True
