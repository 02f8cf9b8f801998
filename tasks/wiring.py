"""The runtime behind ``Baton(app)``: app configuration, internal tasks, signal hooks.

Baton sets the reliability settings a durable engine needs (late acks, requeue on a lost
pool child, prefetch 1, JSON only), each only where the user has not set it, and refuses
an app that accepts pickle unless told otherwise.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import signals

from persistence import runtime as rt
from persistence.store import Store
from sdk import serde
from sdk.errors import BatonError, WorkflowNotFound
from sdk.events import RunStatus
from sdk.replay import Instance

from . import activities, advance, dispatch, eager, sweeper

if TYPE_CHECKING:
    from sdk.client import Baton

log = logging.getLogger("baton")

RELIABLE_DEFAULTS: dict[str, Any] = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "event_serializer": "json",
    "broker_connection_retry_on_startup": True,
    # Fetch only with a free pool slot (Redis): no message sits prefetched, unstarted, in a
    # worker that may die with it (it would wait for lost_after to be re-sent).
    "worker_disable_prefetch": True,
}


def embedded_home() -> Path:
    """Where the embedded broker keeps its socket and data: ``$BATON_HOME`` or ``./.baton``."""
    return Path(os.environ.get("BATON_HOME", ".baton")).resolve()


def configure_app(app: Any, allow_pickle: bool) -> None:
    """Apply Baton's defaults where the user has not chosen; refuse pickle unless allowed.

    An app with no broker at all (Celery would silently fall back to a local RabbitMQ) gets
    the embedded broker: a private redis-server on a Unix socket under ``embedded_home()``.
    """
    if not app.conf.broker_url and not os.environ.get("CELERY_BROKER_URL"):
        from .embedded import embedded_broker_url

        # Only the URL now: the server starts on first use (a publish, or a worker starting),
        # so read-only commands like `baton ls` leave no daemon behind.
        app.conf.broker_url = embedded_broker_url(embedded_home(), start=False)
        app.conf.baton_embedded_home = str(embedded_home())
    changes = app.conf.changes
    for key, value in RELIABLE_DEFAULTS.items():
        if key not in changes:
            app.conf[key] = value
    accepted = {str(c).lower() for c in (app.conf.accept_content or ())}
    accepted |= {str(app.conf.task_serializer).lower(), str(app.conf.result_serializer).lower()}
    # kombu names pickle "pickle" or by its content type "application/x-python-serialize"
    if any("pickle" in c or "python-serialize" in c for c in accepted) and not allow_pickle:
        raise BatonError(
            f"Celery app {app.main!r} accepts pickle ({sorted(accepted)}), which lets anyone who can publish "
            "to the broker run code on your workers; set accept_content=['json'] and json serializers, "
            "or pass Baton(app, allow_pickle=True) if you accept that risk"
        )


class Cache:
    """Per-process LRU of live generator instances, keyed by run id."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[str, Instance] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def take(self, run_id: str) -> Instance | None:
        inst = self.items.pop(run_id, None)
        if inst is None:
            self.misses += 1
        else:
            self.hits += 1
        return inst

    def seq_of(self, run_id: str) -> int:
        """The seq the cached generator of ``run_id`` has reached (0 if none), without taking it."""
        inst = self.items.get(run_id)
        return inst.seq if inst is not None else 0

    def put(self, run_id: str, inst: Instance) -> None:
        if self.size <= 0:
            return
        self.items[run_id] = inst
        self.items.move_to_end(run_id)
        while len(self.items) > self.size:
            self.items.popitem(last=False)

    def clear(self) -> None:
        self.items.clear()


class Runtime:
    """Everything a process needs to advance runs for one Baton."""

    def __init__(self, baton: Baton, *, allow_pickle: bool) -> None:
        self.baton = baton
        self.app = baton.app
        configure_app(self.app, allow_pickle)
        self.cache = Cache(baton.cache_size)
        self.fans: dict[str, int] = {}  # run id -> step of the fan-out it waits on, as last seen here
        self.claimer = activities.Claimer(self)
        runtime = self

        def advance_run(task: Any, run_id: str) -> None:
            """Baton's internal task: advance one run (idempotent; safe to redeliver)."""
            host = getattr(task.request, "hostname", None)
            publisher = activities.worker_id(str(host)) if host else None
            eager.drive(runtime, task, run_id, lambda: advance.advance(runtime, run_id, publisher=publisher))

        self.advance_task = self.app.task(name="baton.advance", bind=True, ignore_result=True,
                                          acks_late=True)(advance_run)
        activities.connect(self)
        sweeper.install(self)
        signals.worker_process_init.connect(self._after_fork, weak=False)
        signals.worker_init.connect(self._worker_init, weak=False)
        self._broker_ready = False
        self._store: Store | None = None
        self._task_events: Any = None  # a flag shared with the pool processes (see follow_events)
        self.concurrency = 1  # set at worker start: its pool processes (a fan-out's eager share)

    def _worker_init(self, sender: Any = None, **_: Any) -> None:
        """Refuse to start a worker on an unusable store (e.g. an older schema), before any task.
        Also note whether it sends task events (``-E``), in memory its pool processes (forked
        later) share: they then send them for eager steps too (``tasks.eager``), so Flower lists
        those; :meth:`follow_events` keeps it up to date."""
        on = bool(getattr(sender, "task_events", False) or self.app.conf.worker_send_task_events)
        self._task_events = multiprocessing.RawValue(ctypes.c_bool, on)
        size = getattr(sender, "concurrency", None)  # ("auto" is resolved only after this signal)
        self.concurrency = size if isinstance(size, int) and size > 0 else (os.cpu_count() or 1)
        try:
            self.store.ensure_schema()
        except BatonError as exc:
            log.critical("baton: %s", exc)
            raise SystemExit(f"baton: {exc}") from None  # BaseException: Celery's signal dispatch lets it out
        self.ensure_broker()

    @property
    def task_events(self) -> bool:
        """Whether this worker sends task events now (False outside a worker)."""
        return bool(self._task_events is not None and self._task_events.value)

    def follow_events(self, consumer: Any) -> None:
        """Mirror the worker's task events into the flag its pool processes read. Flower turns them
        on at run time (``enable_events``, a control command only the main process receives), and
        eager steps must follow, or Flower would list only the steps that were messages. Called
        from the main process's sweeper thread, every ``sweep_interval``."""
        dispatcher = getattr(consumer, "event_dispatcher", None)
        if dispatcher is None or self._task_events is None:
            return
        groups = dispatcher.groups
        on = bool(dispatcher.enabled and (not groups or "task" in groups))
        if on != self._task_events.value:
            self._task_events.value = on
            log.info("baton: task events %s; eager steps follow", "on" if on else "off")

    def ensure_broker(self) -> None:
        """Start the embedded broker if this app uses it and it is not running (cheap after once)."""
        if self._broker_ready:
            return
        home = self.app.conf.get("baton_embedded_home")
        if home:
            from .embedded import embedded_broker_url

            embedded_broker_url(Path(home))
        self._broker_ready = True

    # ------------------------------------------------------------ process state
    @property
    def store(self) -> Store:
        cached = self._store
        if cached is not None and Store._cache.get((self.baton.database_url, os.getpid())) is cached:
            return cached  # the hot path asks several times per step: skip the lock
        self._store = Store.for_url(self.baton.database_url)
        return self._store

    def _after_fork(self, **_: Any) -> None:
        # Engines and live generators must not cross a fork: drop the inherited ones without
        # closing their sockets (the parent still uses them).
        for store in list(Store._cache.values()):
            store.engine.dispose(close=False)
            if store.reader is not store.engine:
                store.reader.dispose(close=False)
        Store.forget_all()
        self.cache.clear()
        self.fans.clear()

    def definition(self, name: str) -> Any:
        return self.baton.definition(name)

    # ------------------------------------------------------------ client operations
    def create_run(self, wid: str, workflow: str, args_json: str, kwargs_json: str) -> bool:
        """Insert a run (False if the id is taken), then ask a worker to advance it.

        One transaction of three statements; a concurrent start of the same id loses the
        insert's conflict and returns False, it does not raise."""
        store = self.store
        with store.tx() as conn:
            if store.id_taken(conn, wid) or not store.create_run(
                    conn, run_id=wid, workflow_id=wid, workflow=workflow, args_json=args_json,
                    kwargs_json=kwargs_json, if_new=True):
                return False
        dispatch.advance_runs(self, [wid])
        return True

    def _live_row(self, wid: str) -> Any:
        row = self.store.latest_run(wid)
        if row is None:
            raise WorkflowNotFound(f"no run with id {wid!r}; list runs with `baton ls` or baton.list()")
        return row

    def signal(self, wid: str, name: str, payload_json: str) -> None:
        row = self._live_row(wid)
        store = self.store
        with store.tx() as conn:
            run = store.lock_run(conn, row.run_id)
            if RunStatus(run.status).terminal:
                raise BatonError(f"run {wid!r} has ended ({run.status}); signals go to running runs only")
            store.add_signal(conn, run, name, payload_json)
        dispatch.advance_runs(self, [run.run_id])

    def cancel(self, wid: str, reason: str) -> bool:
        row = self._live_row(wid)
        out = rt.Outbox()
        ok = cancel_run(self.store, row.run_id, reason, out)
        dispatch.send(self, out)
        return ok

    def resume(self, wid: str) -> None:
        row = self._live_row(wid)
        if RunStatus(row.status).terminal:
            raise BatonError(f"run {wid!r} has ended ({row.status}); only blocked or running runs resume. "
                             f"To run it again from a step, use baton.fork({wid!r}, at_step=...)")
        with self.store.tx() as conn:
            self.store.set_status(conn, row.run_id, RunStatus.RUNNING, None)
        self.cache.take(row.run_id)
        dispatch.advance_runs(self, [row.run_id])

    def fork(self, wid: str, at_step: int, new_id: str) -> None:
        row = self._live_row(wid)
        store = self.store
        events = store.events(row.run_id)
        resolved = _resolved_steps(events)
        if at_step > 0 and at_step not in resolved:
            raise BatonError(
                f"cannot fork run {wid!r} at step {at_step}: that step has not finished in the original "
                f"(finished steps: {_ranges(resolved) or 'none'}); fork at a finished step"
            )
        history = rt.history_prefix(events, at_step)
        with store.tx() as conn:
            if store.get_run(new_id, conn) is not None:
                raise BatonError(f"a run with id {new_id!r} already exists; choose another fork id")
            store.create_run(conn, run_id=new_id, workflow_id=new_id, workflow=row.workflow, args_json=row.args,
                             kwargs_json=row.kwargs, forked=(row.run_id, at_step), history=history)
            store.copy_checkpoints(conn, row.run_id, new_id, at_step)
        dispatch.advance_runs(self, [new_id])


def cancel_run(store: Store, run_id: str, reason: str, out: rt.Outbox) -> bool:
    """Request cancellation of one run (a blocked run is cancelled outright)."""
    with store.tx() as conn:
        run = store.lock_run(conn, run_id)
        if run is None or RunStatus(run.status).terminal:
            return False
        if run.status == RunStatus.BLOCKED.value:
            error = serde.dumps({"type": "Cancelled", "message": reason or "cancelled", "traceback": ""}, "error")
            store.set_status(conn, run_id, RunStatus.CANCELLED, error)
            rt._close_outstanding(conn, run, out, cancel_children=True)
            return True
        ok = store.append_input(conn, run, "cancel_requested", payload={"reason": reason}, key="cancel")
        if not ok and run.status == RunStatus.RUNNING.value:
            # Cancelled before, and still running: the generator swallowed Cancelled. A second
            # cancel ends the run without its cooperation.
            error = serde.dumps({"type": "Cancelled", "message": reason or "cancelled (forced)", "traceback": "",
                                 "forced": True}, "error")
            store.set_status(conn, run_id, RunStatus.CANCELLED, error)
            rt._close_outstanding(conn, run, out, cancel_children=True)
            return True
    if ok:
        out.advance.append(run_id)
    return ok


def _resolved_steps(events: list[Any]) -> set[int]:
    """Steps whose result the history holds (value steps, and steps followed by a later step)."""
    steps = {e.step for e in events if e.kind == "step_scheduled" and e.step is not None}
    done = {s for s in steps if s + 1 in steps}
    for e in events:
        if e.kind == "step_scheduled" and e.payload.get("command", {}).get("mode") == "value":
            done.add(e.step)
        if e.kind in ("completed", "failed", "cancelled", "continued_as_new") and e.step in steps:
            done.add(e.step)
    return done


def _ranges(steps: set[int]) -> str:
    if not steps:
        return ""
    s = sorted(steps)
    return f"{s[0]}-{s[-1]}" if len(s) > 1 else str(s[0])
