"""Where SQLite and PostgreSQL differ: engine options and connection setup. Nowhere else."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import make_url

IDLE_PING_SECONDS = 2.0  # a pooled connection idle longer than this is pinged before use


class ForkGate:
    """Keeps ``fork()`` out of SQLite transactions.

    A process forked while another of its threads is inside a SQLite transaction (a worker's
    sweeper thread, when Celery replaces a dead pool process) inherits SQLite's in-process
    lock state of that transaction, which nobody in the child will ever release: every
    ``BEGIN IMMEDIATE`` there then waits out the busy timeout (found by the lost-requeue chaos
    test). So a fork waits a moment for connections checked out of a SQLite pool to come
    back, and holds new checkouts until it is done.
    """

    WAIT = 10.0  # a connection held longer than this (a stuck statement) stops delaying a fork

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.inside = 0
        self.forking = False

    def enter(self) -> None:
        with self.cond:
            while self.forking:
                self.cond.wait()
            self.inside += 1

    def exit(self) -> None:
        with self.cond:
            self.inside = max(self.inside - 1, 0)
            if self.inside == 0:
                self.cond.notify_all()

    def before_fork(self) -> None:
        self.cond.acquire()
        self.forking = True
        self.cond.wait_for(lambda: self.inside == 0, timeout=self.WAIT)

    def after_fork_parent(self) -> None:
        self.forking = False
        self.cond.notify_all()
        self.cond.release()

    def after_fork_child(self) -> None:
        self.__init__()  # type: ignore[misc]  # the parent's connections are not this process's


FORK_GATE = ForkGate()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=FORK_GATE.before_fork, after_in_parent=FORK_GATE.after_fork_parent,
                        after_in_child=FORK_GATE.after_fork_child)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def safe_url(url: str) -> str:
    """The URL with any password hidden, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str, *, writer: bool) -> Engine:
    """An engine for ``url``.

    SQLite: WAL, ``synchronous=NORMAL`` (durable across process crashes, which is what a
    worker SIGKILL is), a 30 s busy timeout, and ``BEGIN IMMEDIATE`` for writers so that
    concurrent writers queue on the lock instead of failing to upgrade a read lock.
    PostgreSQL: psycopg 3 with a small pool. A connection idle for over
    ``IDLE_PING_SECONDS`` is pinged when checked out (a restarted server then costs no failed
    statement); one in constant use is not, which saves a round trip per transaction on the
    hot path. A connection broken while in use fails its statement, is discarded, and the
    caller's retry (``tasks.advance``) gets a fresh one.
    """
    if is_sqlite(url):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "checkout")
        def _gate_in(_dbapi_conn: Any, _rec: Any, _proxy: Any) -> None:
            FORK_GATE.enter()

        @event.listens_for(engine, "checkin")
        def _gate_out(_dbapi_conn: Any, _rec: Any) -> None:
            FORK_GATE.exit()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    engine = create_engine(url, pool_size=5, max_overflow=5, pool_recycle=300)

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_conn: Any, rec: Any) -> None:
        rec.info["baton_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, rec: Any, _proxy: Any) -> None:
        since = rec.info.get("baton_idle_since")
        if since is None or time.monotonic() - since < IDLE_PING_SECONDS:
            return  # new, or in constant use
        try:
            with dbapi_conn.cursor() as cur:
                cur.execute("SELECT 1")
            dbapi_conn.rollback()
        except Exception as err:  # the pool retries the checkout with a fresh connection
            raise exc.DisconnectionError(f"stale connection: {err}") from err

    return engine


def insert_ignoring(conn: Any, table: Any, keys: list[Any]) -> Any:
    """``INSERT ... ON CONFLICT (keys) DO NOTHING`` in the connection's dialect (both have it)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing(index_elements=keys)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).on_conflict_do_nothing(index_elements=keys)
