"""The store: engines, transactions, and the reads and client-side writes.

Same code on SQLite and PostgreSQL. Dialect differences live in :mod:`persistence.dialect`.
Hot-path statements are SQLAlchemy Core on the SQLModel tables (the ORM unit of work
costs more than the commit itself on SQLite).

Invariant: every input appended to a run takes the run's row lock and the next ``seq``;
``(run_id, seq)`` and ``(run_id, key)`` are unique, so a duplicate append can never land.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, literal, select, union_all, update
from sqlalchemy.exc import IntegrityError

from sdk import serde
from sdk.errors import StoreError, WorkflowNotFound
from sdk.events import Event, RunStatus

from . import dialect, hot
from .models import (
    SCHEMA_VERSION,
    CheckpointRow,
    EventRow,
    LeaseRow,
    MetaRow,
    Run,
    SignalRow,
    TaskRow,
    TimerRow,
    WorkerRow,
    utcnow,
)

runs = Run.__table__  # type: ignore[attr-defined]
events_t = EventRow.__table__  # type: ignore[attr-defined]
checkpoints_t = CheckpointRow.__table__  # type: ignore[attr-defined]
tasks_t = TaskRow.__table__  # type: ignore[attr-defined]
timers_t = TimerRow.__table__  # type: ignore[attr-defined]
signals_t = SignalRow.__table__  # type: ignore[attr-defined]
workers_t = WorkerRow.__table__  # type: ignore[attr-defined]
leases_t = LeaseRow.__table__  # type: ignore[attr-defined]
meta_t = MetaRow.__table__  # type: ignore[attr-defined]


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every timestamp Baton writes is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def row_event(row: Any) -> Event:
    return Event(seq=row.seq, kind=row.kind, step=row.step, slot=row.slot, payload=serde.loads(row.payload),
                 at=aware(row.at), key=row.key, name=row.name)


class Store:
    """One database, opened lazily per process (engines never cross a fork)."""

    _cache: dict[tuple[str, int], Store] = {}
    _lock = threading.Lock()

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = dialect.make_engine(url, writer=True)
        self.reader: Engine = dialect.make_engine(url, writer=False) if dialect.is_sqlite(url) else self.engine
        self.sqlite = dialect.is_sqlite(url)
        self._schema_ok = False
        self._single: Connection | None = None  # kept checked out: see single()
        self._single_lock = threading.Lock()

    @classmethod
    def for_url(cls, url: str) -> Store:
        """The store for ``url`` in this process, created on first use (after any fork)."""
        key = (url, os.getpid())
        with cls._lock:
            store = cls._cache.get(key)
            if store is None:
                store = cls(url)
                store.ensure_schema()
                cls._cache[key] = store
            return store

    @classmethod
    def _after_fork_child(cls) -> None:
        cls._lock = threading.Lock()  # another thread may have held it at the fork

    @classmethod
    def forget_all(cls) -> None:
        """Drop engines inherited from a parent process (called in forked pool children)."""
        with cls._lock:
            cls._cache.clear()

    # ------------------------------------------------------------ schema
    def ensure_schema(self) -> None:
        """Create missing tables; refuse a database written by another schema version."""
        if self._schema_ok:
            return
        metadata = Run.metadata
        with self.engine.begin() as conn:
            metadata.create_all(conn, checkfirst=True)
            found = conn.execute(select(meta_t.c.value).where(meta_t.c.key == "schema_version")).scalar()
            if found is None:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(meta_t).values(key="schema_version", value=str(SCHEMA_VERSION)))
                except IntegrityError:
                    found = str(SCHEMA_VERSION)
            elif int(found) < SCHEMA_VERSION:
                raise StoreError(
                    f"database {dialect.safe_url(self.url)} has Baton schema version {found}, this code "
                    f"needs {SCHEMA_VERSION}; stop the workers and run `baton -A <app> migrate` (or "
                    "persistence.migrations.migrate(url)) against it, then start them again"
                )
            elif int(found) > SCHEMA_VERSION:
                raise StoreError(
                    f"database {dialect.safe_url(self.url)} has Baton schema version {found}, newer than this "
                    f"code ({SCHEMA_VERSION}); upgrade Baton on this machine to match the other workers"
                )
        self._schema_ok = True

    # ------------------------------------------------------------ transactions
    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite, so writers queue instead of deadlocking)."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def single(self) -> Iterator[Connection]:
        """A connection in autocommit mode, for a write that is one statement (its own
        transaction: one round trip, no BEGIN or COMMIT). One such connection is kept checked
        out per store (a pool checkout and return cost more than the statement); it is
        dropped on any error, and a second concurrent user gets a pooled one."""
        if not self._single_lock.acquire(blocking=False):
            with self.engine.connect() as pooled:
                yield pooled.execution_options(isolation_level="AUTOCOMMIT")
            return
        try:
            conn = self._single
            if conn is None or conn.closed or conn.invalidated:
                conn = self._single = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            try:
                yield conn
            except BaseException:
                self._single = None
                conn.close()
                raise
        finally:
            self._single_lock.release()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.reader.connect() as conn:
            yield conn

    # ------------------------------------------------------------ reads
    def get_run(self, run_id: str, conn: Connection | None = None) -> Any:
        if conn is not None:
            return conn.execute(select(runs).where(runs.c.run_id == run_id)).first()
        with self.read() as c:
            return c.execute(select(runs).where(runs.c.run_id == run_id)).first()

    def require_run(self, run_id: str) -> Any:
        """The run (following a continue-as-new chain to its newest link) or WorkflowNotFound."""
        row = self.latest_run(run_id)
        if row is None:
            raise WorkflowNotFound(f"no run with id {run_id!r}; list runs with `baton ls` or baton.list()")
        return row

    def latest_run(self, workflow_id: str) -> Any:
        """The newest run of a continue-as-new chain (or the run itself)."""
        with self.read() as c:
            row = c.execute(select(runs).where(runs.c.run_id == workflow_id)).first()
            if row is None:
                row = c.execute(select(runs).where(runs.c.workflow_id == workflow_id)
                                .order_by(runs.c.created_at.desc(), runs.c.run_id.desc()).limit(1)).first()
            while row is not None and row.next_run_id:
                nxt = c.execute(select(runs).where(runs.c.run_id == row.next_run_id)).first()
                if nxt is None:
                    break
                row = nxt
            return row

    def list_runs(self, status: str | None = None, workflow: str | None = None, search: str | None = None,
                  limit: int = 50, offset: int = 0, parent: str | None = None) -> list[Any]:
        q = select(runs)
        if status:
            q = q.where(runs.c.status == status)
        if workflow:
            q = q.where(runs.c.workflow == workflow)
        if search:
            q = q.where(runs.c.run_id.contains(search, autoescape=True))
        if parent:
            q = q.where(runs.c.parent_run_id == parent)
        q = q.order_by(runs.c.created_at.desc(), runs.c.run_id).limit(limit).offset(offset)
        with self.read() as c:
            return list(c.execute(q).all())

    def count_runs(self, workflow: str | None = None, search: str | None = None,
                   cap: int | None = None) -> dict[str, int]:
        """Runs per status (statuses with none left out). With ``cap``, each status is counted
        only up to ``cap + 1`` (more than ``cap``: the dashboard shows "cap+"), through the
        ``(status, created_at)`` index: what a page poll costs no longer grows with the store."""
        def narrowed(q: Any) -> Any:
            if workflow:
                q = q.where(runs.c.workflow == workflow)
            if search:
                q = q.where(runs.c.run_id.contains(search, autoescape=True))
            return q

        with self.read() as c:
            if cap is None:
                q = narrowed(select(runs.c.status, func.count()).group_by(runs.c.status))
                return {s: int(n) for s, n in c.execute(q).all()}
            parts = [select(literal(s.value).label("status"), select(func.count()).select_from(
                narrowed(select(runs.c.run_id).where(runs.c.status == s.value)).limit(cap + 1).subquery()
            ).scalar_subquery().label("n")) for s in RunStatus]
            return {s: int(n) for s, n in c.execute(union_all(*parts)).all() if n}

    def events(self, run_id: str, after: int = 0, conn: Connection | None = None) -> list[Event]:
        if conn is not None:
            return hot.history(conn, run_id, after)
        with self.read() as c:
            return hot.history(c, run_id, after)

    def checkpoint_rows(self, run_id: str) -> list[Any]:
        q = select(checkpoints_t).where(checkpoints_t.c.run_id == run_id).order_by(checkpoints_t.c.step)
        with self.read() as c:
            return list(c.execute(q).all())

    def task_rows(self, run_id: str) -> list[Any]:
        q = select(tasks_t).where(tasks_t.c.run_id == run_id).order_by(tasks_t.c.step, tasks_t.c.slot,
                                                                         tasks_t.c.attempt)
        with self.read() as c:
            return list(c.execute(q).all())

    def timer_rows(self, run_id: str) -> list[Any]:
        q = select(timers_t).where(timers_t.c.run_id == run_id).order_by(timers_t.c.step, timers_t.c.slot)
        with self.read() as c:
            return list(c.execute(q).all())

    def signal_rows(self, run_id: str) -> list[Any]:
        q = select(signals_t).where(signals_t.c.run_id == run_id).order_by(signals_t.c.id)
        with self.read() as c:
            return list(c.execute(q).all())

    def workers(self) -> list[Any]:
        with self.read() as c:
            return list(c.execute(select(workers_t).order_by(workers_t.c.id)).all())

    # ------------------------------------------------------------ client writes
    def create_run(self, conn: Connection, *, run_id: str, workflow_id: str, workflow: str, args_json: str,
                   kwargs_json: str, parent: tuple[str, int, int] | None = None,
                   previous_run_id: str | None = None, forked: tuple[str, int] | None = None,
                   history: list[Event] | None = None, if_new: bool = False) -> bool:
        """Insert a run and its history (a ``started`` event, or a fork's copied prefix).

        ``if_new``: insert nothing and return False if ``run_id`` exists (``ON CONFLICT DO
        NOTHING``: a concurrent start of the same id waits for the other's commit, then yields).
        """
        now = utcnow()
        events = history or [Event(1, "started", payload={"workflow": workflow,
                                                          "args": serde.loads(args_json),
                                                          "kwargs": serde.loads(kwargs_json)})]
        stmt = dialect.insert_ignoring(conn, runs, [runs.c.run_id]).returning(runs.c.run_id) if if_new else insert(runs)
        inserted = conn.execute(stmt.values(
            run_id=run_id, workflow_id=workflow_id, workflow=workflow, status=RunStatus.RUNNING.value,
            args=args_json, kwargs=kwargs_json, parent_run_id=parent[0] if parent else None,
            parent_step=parent[1] if parent else None, parent_slot=parent[2] if parent else None,
            previous_run_id=previous_run_id, forked_from=forked[0] if forked else None,
            fork_step=forked[1] if forked else None, last_seq=len(events), decided_seq=0,
            needs_advance=True, advance_requested_at=now, created_at=now, updated_at=now,
        ))
        if if_new and inserted.first() is None:
            return False
        conn.execute(insert(events_t), [
            {"run_id": run_id, "seq": i + 1, "kind": e.kind, "step": e.step, "slot": e.slot, "name": e.name,
             "key": e.key, "payload": serde.dumps(e.payload, "event", None), "at": e.at or now}
            for i, e in enumerate(events)
        ])
        return True

    def id_taken(self, conn: Connection, workflow_id: str) -> bool:
        """Whether a run has this id, or a continue-as-new chain this workflow id."""
        q = select(runs.c.run_id).where((runs.c.run_id == workflow_id) | (runs.c.workflow_id == workflow_id))
        return conn.execute(q.limit(1)).first() is not None

    def copy_checkpoints(self, conn: Connection, source: str, target: str, up_to_step: int) -> None:
        """Give a fork the original's checkpoints of steps 1..k (so both stay inspectable)."""
        rows = conn.execute(select(checkpoints_t).where(checkpoints_t.c.run_id == source,
                                                        checkpoints_t.c.step <= up_to_step)).all()
        if rows:
            conn.execute(insert(checkpoints_t), [{**r._mapping, "run_id": target} for r in rows])

    def lock_run(self, conn: Connection, run_id: str) -> Any:
        """The run's row, locked for this transaction (FOR UPDATE; SQLite holds the db write lock)."""
        return conn.execute(select(runs).where(runs.c.run_id == run_id).with_for_update()).first()

    def append_input(self, conn: Connection, run: Any, kind: str, *, step: int | None = None,
                     slot: int | None = None, payload: dict[str, Any] | None = None, key: str | None = None,
                     name: str = "") -> bool:
        """Append one input event to a locked run; False if it is a duplicate or the run has ended."""
        if RunStatus(run.status).terminal:
            return False
        if key is not None:
            dup = conn.execute(select(events_t.c.seq).where(events_t.c.run_id == run.run_id,
                                                            events_t.c.key == key)).first()
            if dup is not None:
                return False
        seq = self._bump(conn, run.run_id, 1)
        now = utcnow()
        conn.execute(insert(events_t).values(run_id=run.run_id, seq=seq, kind=kind, step=step, slot=slot,
                                             name=name, key=key,
                                             payload=serde.dumps(payload or {}, "event", None), at=now))
        conn.execute(update(runs).where(runs.c.run_id == run.run_id)
                     .values(needs_advance=True, advance_requested_at=now, updated_at=now))
        return True

    def touch_run(self, conn: Connection, run_id: str, last_seq: int) -> None:
        """Keep a run flagged for the sweeper after appending to it without deciding."""
        now = utcnow()
        conn.execute(update(runs).where(runs.c.run_id == run_id).values(
            last_seq=last_seq, needs_advance=True, advance_requested_at=now, updated_at=now))

    def _bump(self, conn: Connection, run_id: str, n: int) -> int:
        """Reserve ``n`` seqs on a locked run; returns the first."""
        cur = conn.execute(select(runs.c.last_seq).where(runs.c.run_id == run_id)).scalar_one()
        conn.execute(update(runs).where(runs.c.run_id == run_id).values(last_seq=cur + n))
        return int(cur) + 1

    def add_signal(self, conn: Connection, run: Any, name: str, payload_json: str) -> int:
        now = utcnow()
        res = conn.execute(insert(signals_t).values(run_id=run.run_id, name=name, payload=payload_json, at=now))
        conn.execute(update(runs).where(runs.c.run_id == run.run_id)
                     .values(needs_advance=True, advance_requested_at=now, updated_at=now))
        pk = res.inserted_primary_key
        return int(pk[0]) if pk else 0

    def set_status(self, conn: Connection, run_id: str, status: RunStatus, error: str | None = None) -> None:
        """Set a run's status directly (resume, or an ending that needs no generator)."""
        now = utcnow()
        values: dict[str, Any] = {"status": status.value, "error": error, "updated_at": now}
        if status.terminal:
            values.update(needs_advance=False, finished_at=now, waiting="[]")
        else:
            values.update(needs_advance=True, advance_requested_at=now)
        conn.execute(update(runs).where(runs.c.run_id == run_id).values(**values))

    # ------------------------------------------------------------ workers and leases
    def heartbeat(self, worker_id: str, hostname: str, pid: int, registered: list[str] | None = None) -> None:
        """Prove this worker alive; its first beat also records the task and workflow names it can run."""
        now = utcnow()
        with self.tx() as conn:
            n = conn.execute(update(workers_t).where(workers_t.c.id == worker_id).values(last_beat=now)).rowcount
            if n == 0:
                conn.execute(insert(workers_t).values(
                    id=worker_id, hostname=hostname, pid=pid, started_at=now, last_beat=now,
                    registered=serde.dumps(sorted(registered or []), "registered names", None)))

    def registered_names(self, alive_within: float = 30.0) -> set[str]:
        """Task and workflow names some live worker can run (for "nobody can run X" diagnoses)."""
        cutoff = utcnow() - timedelta(seconds=alive_within)
        with self.read() as c:
            rows = c.execute(select(workers_t.c.registered).where(workers_t.c.last_beat >= cutoff)).all()
        names: set[str] = set()
        for r in rows:
            names.update(serde.loads(r.registered) or [])
        return names

    def forget_worker(self, worker_id: str) -> None:
        with self.tx() as conn:
            conn.execute(workers_t.delete().where(workers_t.c.id == worker_id))

    def take_lease(self, name: str, owner: str, until: datetime, now: datetime) -> bool:
        """Acquire or renew a named lease; True if ``owner`` holds it now."""
        with self.tx() as conn:
            row = conn.execute(select(leases_t).where(leases_t.c.name == name).with_for_update()).first()
            if row is None:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(leases_t).values(name=name, owner=owner, until=until))
                    return True
                except IntegrityError:
                    return False
            if row.owner == owner or (aware(row.until) or now) <= now:
                conn.execute(update(leases_t).where(leases_t.c.name == name).values(owner=owner, until=until))
                return True
            return False

    def schema_version(self) -> int:
        with self.read() as c:
            found = c.execute(select(meta_t.c.value).where(meta_t.c.key == "schema_version")).scalar()
        return int(found or 0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=Store._after_fork_child)
