"""Eager steps: a run's next activity run by the pool process that just decided it.

With ``Baton(eager_steps=N)``, when recording an activity's result (or a ``baton.advance``
task: a run's first decision, a timer, a signal) decides a next activity
that this very worker would be handed anyway (the same queue, no delay, no limits Celery
enforces per message), the pool process runs it at once, through Celery's own tracer (the
task's signals, result backend and ``self.retry()`` behave as for a delivered message),
instead of publishing it and waiting for the broker to hand it to whichever process is free.
Its attempt row is committed first, exactly as for a publish, so nothing about durability
changes; what it saves is the broker round trip, the consumer's work for one message, and
the catch-up a process pays when the step lands where the run's generator is not cached.

At most ``N`` steps ride on one delivered message (the *carrier*), and none is started after
``EAGER_SECONDS`` under it, so one run cannot keep a process from the queue. Of a fan-out, the
process keeps its share among its worker's pool processes and publishes the rest at once; if a
kept task runs past ``RELEASE_AFTER``, a thread publishes the kept ones behind it, and so does
the process itself when it finds the queue dry between two of them (eager steps pay off only
for short tasks, and a longer one must not serialise its siblings while other processes idle).
The carrier stays unacknowledged until the chain ends (``acks_late``); a redelivery of it is
a duplicate result, dropped. An eager attempt has no message of its own, so recovery is:

* the whole worker dies: its heartbeat stops and the sweeper re-sends the attempt, as for
  any attempt the dead worker published or started;
* the pool process dies, its worker alive: Celery requeues the carrier at once, and its
  redelivery re-sends the run's attempts that no queue or ``unacked`` entry holds
  (:func:`_rescue`); failing that, the sweeper re-sends the attempt after ``lost_after``.
  While the process lives, its claimer refreshes the claimed attempt's ``published_at``, so a
  long eager task is never taken for lost. Only a Redis broker (the embedded one included)
  lets Baton tell, so on any other broker there are no eager steps.

Flower lists tasks from the events the consumer sends for the messages it receives; an eager
task is not one, so while the worker sends task events (``-E``, ``worker_send_task_events``, or
Flower's ``enable_events``, mirrored from the main process: ``Runtime.follow_events``) the pool
process sends them itself (received, started, then succeeded, failed or retried). What it
gives up: ``revoke(terminate=True)`` cannot reach an eager task (it runs to its end; its result
is ignored if the run moved on). Hence opt-in, and never for tasks with a Baton timeout, Celery time or rate limits, a
countdown or eta, or another queue.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from celery import states
from celery.app.trace import trace_task
from celery.utils.saferepr import saferepr as safe_repr

if TYPE_CHECKING:
    from collections.abc import Callable

    from .wiring import Runtime

log = logging.getLogger("baton.eager")

EAGER_SECONDS = 1.0  # no eager step starts later than this after its carrier's own ended
RELEASE_AFTER = 0.05  # a fan-out's kept activities go out as messages if the one ahead runs longer
LOOK_EVERY = 0.01  # between a share's steps, this often: is the queue dry (other processes idle)?
HEADER_CARRIER = "baton_carrier"  # in an eager task's request: the id of the message it rode on
_DELAYS = ("countdown", "eta", "expires")
_ROUTING = ("queue", "exchange", "routing_key")


class _Chain(threading.local):
    """The eager chain this thread is in: set while a delivered activity's result is recorded."""

    active = False  # a decision committed now may keep its next activities here
    pending: list[dict[str, Any]] | None = None  # activities kept, not started (guarded by _lock)
    current: str | None = None  # the eager attempt running now
    steps = 0
    t0 = 0.0
    looked = 0.0  # when a kept share last looked at its queue (inf: a single step, never)
    carrier: Any = None  # the delivered task's request
    queue: str | None = None  # the queue it came from


chain = _Chain()
_lock = threading.Lock()  # a chain's pending list, shared with the release thread


def running() -> bool:
    """Whether the task starting now in this thread is an eager one."""
    return chain.current is not None


def drive(runtime: Runtime, task: Any, run_id: str, record: Callable[[], None]) -> None:
    """Record a delivered activity's result (or advance ``run_id``), then run the eager steps its
    decisions keep. A redelivered message may be the carrier of a chain whose pool process died:
    then the run's attempts that no message holds are re-sent now (see :func:`_rescue`)."""
    from .dispatch import can_list_queues

    if chain.active or runtime.baton.eager_steps <= 0 or not can_list_queues(runtime) \
            or not _fits_carrier(runtime, task):
        record()  # (only a broker whose queues the sweeper can read lets it find a lost eager step)
        return
    request = task.request
    chain.active, chain.pending, chain.steps, chain.t0 = True, None, 0, time.monotonic()
    delivery = getattr(request, "delivery_info", None) or {}
    chain.carrier, chain.queue = request, delivery.get("routing_key")
    try:
        record()
        if not chain.pending and delivery.get("redelivered"):
            _rescue(runtime, run_id, str(getattr(request, "id", "")))
        while (msg := _next(runtime)) is not None:
            chain.steps += 1
            try:
                _run(runtime, msg)
            finally:
                _release.disarm()
    finally:
        with _lock:  # kept but not started: past the time bound, or a recording raised after keeping
            left, chain.pending = chain.pending, None
        chain.active, chain.current, chain.carrier = False, None, None
        if left:
            _publish(runtime, left)


def _next(runtime: Runtime) -> dict[str, Any] | None:
    """The next kept activity to start, if it may still start; while more wait behind it, the
    release thread sends those as messages should this one run long (see :class:`_Release`).

    A share is kept because the other processes have the fan-out's messages to run meanwhile;
    once its queue runs dry they are idle (or busy elsewhere), and the rest of the share goes
    out as messages, so it is not left to this one process (looked at every ``LOOK_EVERY``)."""
    now = time.monotonic()
    if chain.pending and now - chain.looked >= LOOK_EVERY:
        from .dispatch import waiting

        chain.looked = now
        if not waiting(runtime, chain.queue):
            with _lock:
                taken = _drain(chain.pending)
            if taken:
                _publish(runtime, taken)
    with _lock:
        if not chain.pending or time.monotonic() - chain.t0 > EAGER_SECONDS:
            return None
        msg = chain.pending.pop(0)
        if chain.pending:
            _release.arm(runtime, chain.pending)
        return msg


def _drain(pending: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Take every kept activity not started (``_lock`` held): they are to be published."""
    taken = pending[:]
    pending.clear()
    return taken


def _rescue(runtime: Runtime, run_id: str, carrier_id: str) -> None:
    """Re-send the run's sent, unsettled attempts that neither a queue nor ``unacked`` holds.

    Celery requeues the message of a pool process that died (``task_reject_on_worker_lost``) at
    once, marked redelivered; if that process was running eager steps, they (of this same run)
    have no message anywhere and would otherwise wait ``lost_after``. What another live process
    holds of this run unseen is re-sent too: kept steps of a fan-out's share while one of the
    fan-out's messages is redelivered, or a step whose carrier a broker-side restore handed out
    again (Redis' visibility timeout, a lost connection). Those then run twice, which activities
    allow (at least once; the second result is ignored). Best effort: the sweeper's own check
    stays behind it."""
    from persistence import runtime as rt

    from .dispatch import queued_task_ids, republish

    try:
        store = runtime.store
        with store.read() as conn:
            rows = [r for r in rt.open_attempts(conn, run_id) if r.id != carrier_id]
        if not rows:
            return
        held = queued_task_ids(runtime, rows, unacked=True)
        lost = [r for r in rows if r.id not in held]
        if not lost:
            return
        with store.tx() as conn:
            rt.reset_started(conn, [r.id for r in lost if r.state == "started"])
        sent = republish(runtime, [r.id for r in lost])
        log.warning("baton: %s was delivered again; re-sent %d attempt(s) of run %s that no message held "
                    "(an eager step lost with its pool process)", carrier_id, sent, run_id)
    except Exception as exc:  # the sweeper re-sends them after lost_after
        log.warning("baton: could not look for eager steps lost with %s: %s", carrier_id, exc)


def keep(runtime: Runtime, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Called with a decision's committed activities before they are published: keeps those this
    process will run eagerly and returns the rest, to publish.

    A single next activity is kept whole. Of a fan-out, this process keeps its share among its
    worker's pool processes (the last ones, so the published ones go first), within the chain's
    step budget; the rest go out as messages for the other processes at once."""
    if not chain.active or chain.pending:
        return messages
    budget = runtime.baton.eager_steps - chain.steps
    if budget <= 0 or time.monotonic() - chain.t0 > EAGER_SECONDS:
        return messages
    share = min(budget, max(1, len(messages) // max(1, runtime.concurrency)))
    kept: list[dict[str, Any]] = []
    for msg in reversed(messages):
        if len(kept) == share:
            break
        if _eligible(runtime, msg):
            kept.append(msg)
    if not kept:
        return messages
    kept.reverse()
    with _lock:
        chain.pending = kept
    chain.looked = time.monotonic() if len(messages) > 1 else float("inf")
    ids = {msg["id"] for msg in kept}
    return [msg for msg in messages if msg["id"] not in ids]


def _fits_carrier(runtime: Runtime, task: Any) -> bool:
    """A carrier's job must not be ended by Celery's per-job time limits while its chain runs."""
    conf = runtime.app.conf
    if conf.task_time_limit or conf.task_soft_time_limit:
        return False
    return not (getattr(task, "time_limit", None) or getattr(task, "soft_time_limit", None)
                or any(getattr(task.request, "timelimit", None) or ()))


def _eligible(runtime: Runtime, msg: dict[str, Any]) -> bool:
    if msg["timeout"]:
        return False  # a Baton timeout ends an attempt by terminating its job
    from .dispatch import acked_late

    task = runtime.app.tasks.get(msg["task"])
    if task is None or task.rate_limit or task.time_limit or task.soft_time_limit:
        return False
    if not acked_late(runtime.app, msg["task"]):
        return False  # the sweeper's lost-task check only covers late-acked tasks
    options = msg["options"] or {}
    if any(options.get(k) for k in _DELAYS) or options.get("time_limit") or options.get("soft_time_limit"):
        return False
    return _queue_of(runtime, msg["task"], msg["args"], msg["kwargs"], options) == chain.queue


def _queue_of(runtime: Runtime, name: str, args: Any, kwargs: Any, options: dict[str, Any]) -> str | None:
    """The queue a publish of this activity would go to (Celery's router, as ``send_task`` uses it)."""
    app = runtime.app
    if not app.conf.task_routes and not any(options.get(k) for k in _ROUTING):
        return str(app.conf.task_default_queue)
    try:
        route = app.amqp.router.route(dict(options), name, args, kwargs)
    except Exception:  # an unknown queue: let the publish report it
        return None
    queue = route.get("queue")
    if queue is None:
        return None
    key = route.get("routing_key") or getattr(queue, "routing_key", None) or getattr(queue, "name", None)
    return str(key) if key else None


def _run(runtime: Runtime, msg: dict[str, Any]) -> None:
    """Run one kept activity as a delivered message would run: Celery's tracer, our hooks, and
    the task events the consumer would have sent (when the worker sends them: ``-E``)."""
    from .dispatch import headers_of, shown  # dispatch imports this module

    carrier = chain.carrier
    headers = headers_of(msg)
    hostname = getattr(carrier, "hostname", None)
    # The carrier's id is an attribute, not a header: a `self.retry()` (a real message) copies headers.
    request = {**headers, HEADER_CARRIER: getattr(carrier, "id", None), "id": msg["id"], "task": msg["task"],
               "headers": headers, "retries": 0,
               "delivery_info": {**(getattr(carrier, "delivery_info", None) or {}), "redelivered": False},
               "hostname": hostname,
               "is_eager": False, "args": msg["args"], "kwargs": msg["kwargs"],
               "root_id": getattr(carrier, "root_id", None) or msg["id"], "parent_id": getattr(carrier, "id", None)}
    task = runtime.app.tasks[msg["task"]]
    events = _events(runtime, hostname) if runtime.task_events else None
    if events is not None:  # what the consumer would have sent for a delivered message, so Flower lists it
        argsrepr, kwargsrepr = shown(msg)
        _send_event(events, "task-received", uuid=msg["id"], name=msg["task"], args=argsrepr, kwargs=kwargsrepr,
                    root_id=request["root_id"], parent_id=request["parent_id"], retries=0, eta=None, expires=None)
        _send_event(events, "task-started", uuid=msg["id"], pid=os.getpid())
    chain.current = msg["id"]
    try:
        outcome = trace_task(task, msg["id"], msg["args"], msg["kwargs"], request, app=runtime.app,
                             hostname=hostname)
    except Exception as exc:  # the tracer reports a task's own errors; this is Celery failing around it
        log.error("baton: running %s eagerly failed (%s); the sweeper re-sends it after lost_after", msg["id"], exc)
        return
    finally:
        chain.current = None
    if events is not None:
        returned, info, runtime_s, text = outcome
        if info is None:
            _send_event(events, "task-succeeded", uuid=msg["id"], result=text, runtime=runtime_s)
        elif info.state == states.FAILURE:
            _send_event(events, "task-failed", uuid=msg["id"], exception=safe_repr(info.retval),
                        traceback=getattr(returned, "traceback", None))
        elif info.state == states.RETRY:
            _send_event(events, "task-retried", uuid=msg["id"], exception=safe_repr(info.retval))


_dispatchers: dict[int, Any] = {}  # per process: an event dispatcher on its own connection


def _events(runtime: Runtime, hostname: Any) -> Any:
    dispatcher = _dispatchers.get(os.getpid())
    if dispatcher is None:
        try:
            conn = runtime.app.connection_for_write()
            dispatcher = runtime.app.events.Dispatcher(conn, hostname=hostname, enabled=True)
        except Exception as exc:  # events are for monitoring: never stop a step for them
            log.warning("baton: cannot send task events for eager steps: %s", exc)
            return None
        _dispatchers.clear()  # a parent's, inherited by a fork
        _dispatchers[os.getpid()] = dispatcher
    return dispatcher


def _send_event(dispatcher: Any, kind: str, **fields: Any) -> None:
    try:
        dispatcher.send(kind, **fields)
    except Exception as exc:
        log.warning("baton: could not send %s for an eager step: %s", kind, exc)


def _publish(runtime: Runtime, messages: list[dict[str, Any]]) -> None:
    from . import dispatch

    try:
        dispatch.publish(runtime, messages, may_keep=False)
    except Exception as exc:
        log.warning("baton: publishing %d kept attempt(s) failed, the sweeper will re-send: %s", len(messages), exc)
        dispatch.defer(runtime, [msg["id"] for msg in messages])


class _Release:
    """Sends a fan-out's kept activities as messages when the one running ahead of them takes
    longer than ``RELEASE_AFTER``: eager steps are for short tasks, and a long one must not hold
    its siblings back from the processes that are free. One thread per process, started lazily,
    watching each chain (one per pool thread: a ``threads`` pool runs several at once)."""

    def __init__(self) -> None:
        self.cond = threading.Condition(_lock)
        self.jobs: dict[int, tuple[float, Runtime, list[dict[str, Any]]]] = {}  # thread -> watch
        self.pid = -1

    def arm(self, runtime: Runtime, pending: list[dict[str, Any]]) -> None:
        """Watch this thread's ``pending`` from now (called with ``_lock`` held)."""
        if self.pid != os.getpid():  # first use in this (forked) process
            self.pid = os.getpid()
            self.jobs.clear()
            threading.Thread(target=self.loop, name="baton-eager-release", daemon=True).start()
        self.jobs[threading.get_ident()] = (time.monotonic() + RELEASE_AFTER, runtime, pending)
        self.cond.notify()

    def disarm(self) -> None:
        with _lock:
            self.jobs.pop(threading.get_ident(), None)

    def loop(self) -> None:
        while True:
            with self.cond:
                while not self.jobs:
                    self.cond.wait()
                now = time.monotonic()
                due = [k for k, job in self.jobs.items() if job[0] <= now]
                if not due:
                    self.cond.wait(min(job[0] for job in self.jobs.values()) - now)
                    continue
                # the chains' own lists: their next look finds nothing left to start
                taken = [(job[1], _drain(job[2])) for job in (self.jobs.pop(k) for k in due)]
            for runtime, msgs in taken:
                if msgs:
                    log.info("baton: an eager step ran past %.2f s; sent %d kept attempt(s) as messages",
                             RELEASE_AFTER, len(msgs))
                    _publish(runtime, msgs)


_release = _Release()
