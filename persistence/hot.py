"""The hot path in driver SQL: record an attempt's result, and write a plain decision.

Every completed activity costs one transaction, so its statements skip SQLAlchemy's
statement building and execution machinery (about 0.1 ms of CPU each) and go straight to
the driver, written once per dialect from the table definitions. On PostgreSQL they are
also pipelined: the lock-and-record pair in one round trip, and the decision's writes
together with the COMMIT in a second, instead of one round trip per statement.

Same SQL and the same idempotency guards as the Core statements they replace; the
transaction is still the caller's (``Store.tx``). Anything but a plain decision (timers,
children, cancels, endings, a blocked run) takes the Core path in :mod:`persistence.runtime`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from sdk import serde
from sdk.events import Event

HOT_RUN_COLUMNS = ("run_id", "workflow_id", "workflow", "status", "last_seq", "decided_seq", "needs_advance",
                   "step", "parent_run_id", "parent_step", "parent_slot")
TASK_COLUMNS = ("state", "step", "slot", "attempt", "task")  # returned as task_state ... task_task
SETTLED = ("done", "failed", "cancelled")
EVENT_COLUMNS = ("run_id", "seq", "kind", "step", "slot", "name", "key", "payload", "at")
NEW_TASK_COLUMNS = ("id", "run_id", "step", "slot", "attempt", "task", "args", "kwargs", "options", "timeout",
                    "state", "worker", "dispatches", "not_before", "created_at", "published_at")
CHECKPOINT_COLUMNS = ("run_id", "step", "file", "line", "function", "locals_delta", "waiting", "at")
RUN_UPDATE_COLUMNS = ("decided_seq", "last_seq", "needs_advance", "updated_at", "step", "status", "waiting")


class HotSQL:
    """The statements, in one dialect's parameter style (``%(x)s`` for psycopg, ``:x`` for sqlite3)."""

    def __init__(self, postgres: bool) -> None:
        self.postgres = postgres

        def p(name: str) -> str:
            return f"%({name})s" if postgres else f":{name}"

        def insert(table: str, cols: Sequence[str]) -> str:
            return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(p(c) for c in cols)})"

        settled = ", ".join(f"'{s}'" for s in SETTLED)
        self.record = (
            f"SELECT {', '.join('r.' + c for c in HOT_RUN_COLUMNS)}, {', '.join('t.' + c for c in TASK_COLUMNS)} "
            f"FROM baton_tasks t JOIN baton_runs r ON r.run_id = t.run_id WHERE t.id = {p('tid')}"
            + (" FOR UPDATE OF r" if postgres else ""))
        self.settle = (
            f"UPDATE baton_tasks SET state = {p('state')}, finished_at = {p('now')}, "
            f"worker = COALESCE({p('worker')}, worker), started_at = COALESCE(started_at, {p('started')}) "
            f"WHERE id = {p('tid')} AND state NOT IN ({settled})")
        self.events = insert("baton_events", EVENT_COLUMNS)
        self.history = (f"SELECT seq, kind, step, slot, payload, at, key, name FROM baton_events "
                        f"WHERE run_id = {p('run_id')} AND seq > {p('after')} ORDER BY seq")
        self.tasks = insert("baton_tasks", NEW_TASK_COLUMNS)
        self.checkpoints = insert("baton_checkpoints", CHECKPOINT_COLUMNS)
        self.run_plain = (f"UPDATE baton_runs SET {', '.join(f'{c} = {p(c)}' for c in RUN_UPDATE_COLUMNS)} "
                          f"WHERE run_id = {p('run_id')}")
        self.run_with_position = (
            f"UPDATE baton_runs SET {', '.join(f'{c} = {p(c)}' for c in RUN_UPDATE_COLUMNS)}, "
            f"position = {p('position')}, locals = {p('locals')} WHERE run_id = {p('run_id')}")


_SQL = {True: HotSQL(True), False: HotSQL(False)}


def _driver(conn: Connection) -> tuple[Any, bool]:
    postgres = conn.dialect.name == "postgresql"
    return conn.connection.driver_connection, postgres


@contextmanager
def _errors(conn: Connection, statement: str) -> Iterator[None]:
    """Driver errors as SQLAlchemy's (the callers retry on those); a broken connection is
    invalidated so that the retry gets a fresh one."""
    dbapi = conn.dialect.loaded_dbapi
    try:
        yield
    except dbapi.Error as err:
        disconnect = conn.dialect.is_disconnect(err, conn.connection.dbapi_connection, None)
        if disconnect:
            conn.invalidate(err)
        raise DBAPIError.instance(statement, None, err, dbapi.Error,
                                  connection_invalidated=disconnect, dialect=conn.dialect) from err


def _events(rows: list[Any]) -> list[Event]:
    return [Event(s, k, st, sl, serde.loads(p), _aware(at), key, name or "") for s, k, st, sl, p, at, key, name in rows]


def history(conn: Connection, run_id: str, after: int = 0) -> list[Event]:
    """A run's events after ``after``, in seq order (a cold replay reads thousands: no per-row overhead)."""
    raw, postgres = _driver(conn)
    sql = _SQL[postgres]
    with _errors(conn, sql.history):
        cur = raw.cursor()
        cur.execute(sql.history, {"run_id": run_id, "after": after})
        rows = cur.fetchall()
        cur.close()
    return _events(rows)


def _aware(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):  # sqlite3 hands back SQLAlchemy's text form
        value = datetime.fromisoformat(value)
    at: datetime = value
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _ts(value: datetime | None, postgres: bool) -> Any:
    """SQLite stores timestamps as SQLAlchemy does (naive UTC text); psycopg takes datetimes."""
    if value is None or postgres:
        return value
    return f"{value:%Y-%m-%d %H:%M:%S.%f}"


def record(conn: Connection, tid: str, run_id: str, ok: bool, now: datetime, worker: str | None,
           started_at: datetime | None, history_after: int | None = None,
           ) -> tuple[dict[str, Any], int, list[Event] | None] | None:
    """Lock the attempt's run, and settle the attempt if it is still open.

    Returns (the run's hot columns and the attempt's, rows settled: 1, or 0 for a late or
    duplicate result, the run's events after ``history_after`` or None if not asked), or None
    for an unknown attempt. The history read rides in the same round trip on PostgreSQL (a
    cached generator a few events behind, because another process advanced the run, needs
    them). The settle of an ignored result is a no-op: a settled attempt stays as it was.
    """
    raw, postgres = _driver(conn)
    sql = _SQL[postgres]
    params = {"tid": tid, "state": "done" if ok else "failed", "now": _ts(now, postgres), "worker": worker,
              "started": _ts(started_at, postgres)}
    hist = None
    with _errors(conn, sql.record), raw.pipeline() if postgres else nullcontext():
        cur = raw.cursor()
        cur.execute(sql.record, {"tid": tid})
        upd = raw.cursor()
        upd.execute(sql.settle, params)
        if history_after is not None and postgres:
            hist = raw.cursor()
            hist.execute(sql.history, {"run_id": run_id, "after": history_after})
    with _errors(conn, sql.record):
        row = cur.fetchone()
        settled = upd.rowcount
        if row is None:
            return None
        names = HOT_RUN_COLUMNS + tuple("task_" + c for c in TASK_COLUMNS)
        out = dict(zip(names, row, strict=True))
        out["needs_advance"] = bool(out["needs_advance"])
        events: list[Event] | None = None
        if history_after is not None and hist is None and out["last_seq"] > history_after:
            hist = raw.cursor()
            hist.execute(sql.history, {"run_id": run_id, "after": history_after})
        if hist is not None:
            events = _events(hist.fetchall())
            hist.close()
        elif history_after is not None:
            events = []
    cur.close()
    upd.close()
    return out, settled, events


def write(conn: Connection, events: list[dict[str, Any]], tasks: list[dict[str, Any]],
          checkpoints: list[dict[str, Any]], run: dict[str, Any]) -> None:
    """Write a plain decision and COMMIT (one pipelined round trip on PostgreSQL)."""
    raw, postgres = _driver(conn)
    sql = _SQL[postgres]
    if not postgres:
        for rows in (events, tasks, checkpoints):
            for r in rows:
                for k in ("at", "not_before", "created_at", "published_at"):
                    if k in r:
                        r[k] = _ts(r[k], False)
        run = {**run, "updated_at": _ts(run["updated_at"], False)}
    with _errors(conn, sql.run_plain), raw.pipeline() if postgres else nullcontext():
        cur = raw.cursor()
        if events:
            cur.executemany(sql.events, events)
        if tasks:
            cur.executemany(sql.tasks, tasks)
        if checkpoints:
            cur.executemany(sql.checkpoints, checkpoints)
        cur.execute(sql.run_with_position if "position" in run else sql.run_plain, run)
        if postgres:
            raw.commit()  # in the same round trip; the caller's COMMIT then finds nothing to do
    cur.close()
