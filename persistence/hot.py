"""The hot path in driver SQL: record an attempt's result, and write a plain decision.

Every completed activity costs one transaction, so its statements skip SQLAlchemy's
statement building and execution machinery (about 0.1 ms of CPU each) and go straight to
the driver, written once per dialect from the table definitions. On PostgreSQL they are
also pipelined: the lock-and-record pair in one round trip, and the decision's writes
together with the COMMIT in a second, instead of one round trip per statement.

Same SQL and the same idempotency guards as the Core statements they replace; the
transaction is still the caller's (``Store.tx``). Anything but a plain decision (children,
cancels, endings, a signal taken, a blocked run) takes the Core path in :mod:`persistence.runtime`.
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
                   "step", "parent_run_id", "parent_step", "parent_slot", "fan_step", "fan_open")
TASK_COLUMNS = ("state", "step", "slot", "attempt", "task")  # returned as task_state ... task_task
SETTLED = ("done", "failed", "cancelled")
EVENT_COLUMNS = ("run_id", "seq", "kind", "step", "slot", "name", "key", "payload", "at")
NEW_TASK_COLUMNS = ("id", "run_id", "step", "slot", "attempt", "task", "args", "kwargs", "options", "timeout",
                    "state", "worker", "dispatches", "not_before", "created_at", "published_at")
CHECKPOINT_COLUMNS = ("run_id", "step", "file", "line", "function", "locals_delta", "waiting", "at")
TIMER_COLUMNS = ("run_id", "step", "slot", "attempt", "kind", "fire_at", "fired")
RUN_UPDATE_COLUMNS = ("decided_seq", "last_seq", "needs_advance", "updated_at", "step", "status", "waiting",
                      "fan_step", "fan_open")


class HotSQL:
    """The statements, in one dialect's parameter style (``%(x)s`` for psycopg, ``:x`` for sqlite3)."""

    def __init__(self, postgres: bool) -> None:
        self.postgres = postgres

        def p(name: str) -> str:
            return f"%({name})s" if postgres else f":{name}"

        def insert(table: str, cols: Sequence[str]) -> str:
            return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(p(c) for c in cols)})"

        settled = ", ".join(f"'{s}'" for s in SETTLED)
        cols = f"{', '.join('r.' + c for c in HOT_RUN_COLUMNS)}, {', '.join('t.' + c for c in TASK_COLUMNS)}"

        # The run's locals come along only when the caller's cached generator is behind (or absent):
        # its checkpoint delta needs them then, and only then.
        def behind(r: str) -> str:
            return f"CASE WHEN {r}last_seq > {p('after')} THEN {r}locals END"

        self.record = (f"SELECT {cols}, {behind('r.')} "
                       f"FROM baton_tasks t JOIN baton_runs r ON r.run_id = t.run_id WHERE t.id = {p('tid')}")
        settle = (f"UPDATE baton_tasks SET state = {p('state')}, finished_at = {p('now')}, "
                  f"worker = COALESCE({p('worker')}, worker), started_at = COALESCE(started_at, {p('started')}), ")
        guard = f"WHERE id = {p('tid')} AND state NOT IN ({settled})"
        if postgres:
            # One statement: lock the run (first: an InitPlan, before any attempt row is touched,
            # the order every writer takes), settle the attempt, keep a fan-out's result in its row
            # and count the fan-out down; return the run's hot columns and the attempt's as they
            # were, the rows settled and the fan-out's open slots left (NULL if not a fan-out).
            def locked_record(extra: str) -> str:
                run_cols = ", ".join(HOT_RUN_COLUMNS) + extra
                return (
                    f"WITH r AS (SELECT {run_cols} FROM baton_runs WHERE run_id = {p('run_id')} FOR UPDATE), "
                    f"s AS ({settle}result = CASE WHEN step = (SELECT fan_step FROM r WHERE step = fan_step "
                    f"AND status = 'running') THEN CAST({p('result')} AS TEXT) END {guard} "
                    f"AND EXISTS (SELECT 1 FROM r) RETURNING result IS NOT NULL AS fanned), "
                    f"f AS (UPDATE baton_runs SET fan_open = fan_open - 1 WHERE run_id = {p('run_id')} "
                    f"AND EXISTS (SELECT 1 FROM s WHERE s.fanned) RETURNING fan_open) "
                    f"SELECT {', '.join('r.' + c for c in HOT_RUN_COLUMNS)}, "
                    f"{', '.join('t.' + c for c in TASK_COLUMNS)}, r.locals, "
                    f"(SELECT count(*) FROM s), (SELECT fan_open FROM f) "
                    f"FROM r JOIN baton_tasks t ON t.id = {p('tid')}")

            self.record = locked_record(f", {behind('')} AS locals")
            # A result expected to belong to the run's current fan-out (the process saw the
            # previous one do so): lock the run only if so, settle, keep, count down, flag the run
            # for a decision at zero, all in one statement, committed in the same round trip.
            # Returns (run matched, rows settled, open slots left).
            self.fan_settle = (
                f"WITH r AS (SELECT run_id FROM baton_runs WHERE run_id = {p('run_id')} AND status = 'running' "
                f"AND fan_step = {p('step')} AND step = {p('step')} FOR UPDATE), "
                f"s AS ({settle}result = CAST({p('result')} AS TEXT) {guard} AND step = {p('step')} "
                f"AND EXISTS (SELECT 1 FROM r) RETURNING 1), "
                f"f AS (UPDATE baton_runs SET fan_open = fan_open - 1, needs_advance = needs_advance OR fan_open <= 1, "
                f"advance_requested_at = CASE WHEN fan_open <= 1 THEN {p('now')} ELSE advance_requested_at END "
                f"WHERE run_id = {p('run_id')} AND EXISTS (SELECT 1 FROM s) RETURNING fan_open) "
                f"SELECT (SELECT count(*) FROM r), (SELECT count(*) FROM s), (SELECT fan_open FROM f)")
            # A decision taken before the lock, by a cached generator that assumed the run is
            # as it left it (``last_seq``, running, no fan-out) and the attempt still open. Locks
            # the run if so and settles the attempt; otherwise divides by zero, which aborts the
            # rest of the pipeline (the decision's writes and the COMMIT): nothing is written.
            self.guard = (
                f"WITH r AS (SELECT run_id FROM baton_runs WHERE run_id = {p('run_id')} AND last_seq = {p('seq')} "
                f"AND status = 'running' AND fan_step IS NULL FOR UPDATE), "
                f"s AS ({settle}result = NULL {guard} AND EXISTS (SELECT 1 FROM r) RETURNING 1) "
                f"SELECT 1 / (SELECT count(*) FROM s)")
        else:  # no data-modifying CTEs: the caller decides from the run row it has just read
            self.settle = f"{settle}result = {p('result')} {guard}"
            self.count_down = f"UPDATE baton_runs SET fan_open = fan_open - 1 WHERE run_id = {p('run_id')} " \
                              "RETURNING fan_open"
        kept = f"WHERE run_id = {p('run_id')} AND step = {p('step')} AND result IS NOT NULL"
        self.harvest = f"SELECT slot, attempt, task, result, finished_at FROM baton_tasks {kept}"
        self.harvested = f"UPDATE baton_tasks SET result = NULL {kept}"  # RETURNING would give the new NULLs
        self.events = insert("baton_events", EVENT_COLUMNS)
        self.history = (f"SELECT seq, kind, step, slot, payload, at, key, name FROM baton_events "
                        f"WHERE run_id = {p('run_id')} AND seq > {p('after')} ORDER BY seq")
        # An advance with no outcome to record (a start, a timer, a signal, a child's end): lock the
        # run and, in the same round trip, read the events its cached generator lacks, if there is
        # anything to decide (the read runs after the lock: it sees the locked row).
        self.lock = (f"SELECT {', '.join(HOT_RUN_COLUMNS)}, {behind('')} FROM baton_runs "
                     f"WHERE run_id = {p('run_id')}" + (" FOR UPDATE" if postgres else ""))
        self.lock_history = (
            f"SELECT seq, kind, step, slot, payload, at, key, name FROM baton_events "
            f"WHERE run_id = {p('run_id')} AND seq > {p('after')} AND EXISTS (SELECT 1 FROM baton_runs "
            f"WHERE run_id = {p('run_id')} AND status = 'running' AND (needs_advance OR decided_seq < last_seq)) "
            f"ORDER BY seq")
        self.tasks = insert("baton_tasks", NEW_TASK_COLUMNS)
        self.checkpoints = insert("baton_checkpoints", CHECKPOINT_COLUMNS)
        self.timers = insert("baton_timers", TIMER_COLUMNS)
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


def lock(conn: Connection, run_id: str, after: int) -> tuple[dict[str, Any], list[Event] | None] | None:
    """Lock a run (None if there is none): its hot columns, with ``locals`` only if the run is
    past ``after`` (the seq its cached generator reached), and its events after ``after`` if it
    has anything to decide (else None). One round trip on PostgreSQL."""
    raw, postgres = _driver(conn)
    sql = _SQL[postgres]
    params = {"run_id": run_id, "after": after}
    hist = None
    with _errors(conn, sql.lock), raw.pipeline() if postgres else nullcontext():
        cur = raw.cursor()
        cur.execute(sql.lock, params)
        if postgres:
            hist = raw.cursor()
            hist.execute(sql.lock_history, params)
    with _errors(conn, sql.lock):
        row = cur.fetchone()
        cur.close()
        if row is None:
            return None
        out = dict(zip((*HOT_RUN_COLUMNS, "locals"), row, strict=True))
        out["needs_advance"] = bool(out["needs_advance"])
        if out["locals"] is None and out["last_seq"] <= after:
            del out["locals"]  # not read: a generator this far along knows them (else they are read apart)
        if hist is None and out["status"] == "running" and (out["needs_advance"]
                                                            or out["decided_seq"] < out["last_seq"]):
            hist = raw.cursor()
            hist.execute(sql.history, params)
        events = None
        if hist is not None:
            events = _events(hist.fetchall())
            hist.close()
    return out, events


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
           started_at: datetime | None, result: str | None, history_after: int | None = None,
           ) -> tuple[dict[str, Any], int, int | None, list[Event] | None] | None:
    """Lock the attempt's run, and settle the attempt if it is still open.

    Returns (the run's hot columns and the attempt's, and its ``locals``, None unless the run
    is past ``history_after`` (the caller's cached generator is behind, or absent); rows settled: 1, or 0 for a late or
    duplicate result; the open slots left when the attempt belongs to the run's current
    fan-out (its ``result``, the event payload as JSON, is then kept in the attempt's row and
    the run's ``fan_open`` counted down), else None; the run's events after ``history_after``,
    or None if not asked), or None for an unknown attempt. The history read rides in the same
    round trip on PostgreSQL (a cached generator a few events behind, because another
    process advanced the run, needs them). The settle of an ignored result is a no-op.
    """
    raw, postgres = _driver(conn)
    sql = _SQL[postgres]
    params = {"tid": tid, "state": "done" if ok else "failed", "now": _ts(now, postgres), "worker": worker,
              "started": _ts(started_at, postgres), "run_id": run_id, "result": result if ok else None}
    hist = None
    params["after"] = history_after or 0
    with _errors(conn, sql.record), raw.pipeline() if postgres else nullcontext():
        cur = raw.cursor()
        cur.execute(sql.record, params if postgres else {"tid": tid, "after": params["after"]})
        if postgres and history_after is not None:
            hist = raw.cursor()
            hist.execute(sql.history, {"run_id": run_id, "after": history_after})
    with _errors(conn, sql.record):
        row = cur.fetchone()
        if row is None:
            return None
        names = HOT_RUN_COLUMNS + tuple("task_" + c for c in TASK_COLUMNS) + ("locals",)
        if postgres:
            names += ("_settled", "_open_left")
        out = dict(zip(names, row, strict=True))
        out["needs_advance"] = bool(out["needs_advance"])
        open_left: int | None
        if postgres:
            settled, open_left = out.pop("_settled"), out.pop("_open_left")
        else:
            upd = raw.cursor()
            fanned = (params["result"] is not None and out["status"] == "running"
                      and out["fan_step"] is not None and out["fan_step"] == out["step"] == out["task_step"])
            if not fanned:
                params["result"] = None
            upd.execute(sql.settle, params)
            settled, open_left = upd.rowcount, None
            if settled and fanned:
                upd.execute(sql.count_down, {"run_id": run_id})
                open_left = upd.fetchone()[0]
            upd.close()
        if open_left is not None:
            out["fan_open"] = open_left
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
    return out, settled, open_left, events


def record_fanned(conn: Connection, tid: str, run_id: str, step: int, now: datetime, worker: str | None,
                  started_at: datetime | None, result: str) -> tuple[bool, bool, int | None]:
    """PostgreSQL only: record a success expected to belong to the run's current fan-out
    (step ``step``) in one statement, on an autocommit connection (``Store.single``): one
    round trip. Returns (the run is on that fan-out, the
    attempt was settled now, the open slots left). Nothing is written unless both hold; at
    zero the run is flagged ``needs_advance`` in the same commit, so its decision (the
    caller's next transaction) is re-driven by the sweeper if this process dies first."""
    raw, postgres = _driver(conn)
    assert postgres, "record_fanned is PostgreSQL's"
    sql = _SQL[True]
    params = {"tid": tid, "state": "done", "now": now, "worker": worker, "started": started_at, "run_id": run_id,
              "step": step, "result": result}
    with _errors(conn, sql.fan_settle):
        cur = raw.cursor()
        cur.execute(sql.fan_settle, params)
        matched, settled, open_left = cur.fetchone()
        cur.close()
    return bool(matched), bool(settled), open_left


def harvest(conn: Connection, run_id: str, step: int) -> list[tuple[int, int, str, str, datetime | None]]:
    """Take the fan-out results kept in a step's attempt rows (clearing them, so each is taken
    once): (slot, attempt, task, result JSON, finished at), in the order they finished."""
    raw, postgres = _driver(conn)
    sql = _SQL[postgres]
    params = {"run_id": run_id, "step": step}
    with _errors(conn, sql.harvest), raw.pipeline() if postgres else nullcontext():
        cur = raw.cursor()  # the run is locked: no result can be kept in between these two
        cur.execute(sql.harvest, params)
        if postgres:
            clear = raw.cursor()
            clear.execute(sql.harvested, params)
    with _errors(conn, sql.harvest):
        rows = [(slot, attempt, task, result, _aware(at)) for slot, attempt, task, result, at in cur.fetchall()]
        cur.close()
        if not postgres and rows:
            cur = raw.cursor()
            cur.execute(sql.harvested, params)
            cur.close()
    rows.sort(key=lambda r: (r[4] or datetime.min.replace(tzinfo=UTC), r[0]))
    return rows


def write(conn: Connection, events: list[dict[str, Any]], tasks: list[dict[str, Any]],
          checkpoints: list[dict[str, Any]], run: dict[str, Any], guard: dict[str, Any] | None = None,
          timers: Sequence[dict[str, Any]] = ()) -> bool:
    """Write a plain decision and COMMIT (one pipelined round trip on PostgreSQL).

    With ``guard`` (PostgreSQL: the parameters of ``HotSQL.guard``), the run is locked and the
    attempt settled first, in the same round trip, and nothing is written unless both hold:
    returns False then (the transaction is rolled back), True once committed.
    """
    raw, postgres = _driver(conn)
    sql = _SQL[postgres]
    if guard is not None:
        from psycopg.errors import DivisionByZero  # the guard's "no" (PostgreSQL only here)

        with _errors(conn, sql.guard):
            try:
                with raw.pipeline():
                    cur = raw.cursor()
                    cur.execute(sql.guard, guard)
                    _write_statements(cur, sql, events, tasks, checkpoints, run, timers)
                    raw.commit()
            except DivisionByZero:
                raw.rollback()
                return False
        cur.close()
        return True
    if not postgres:
        for rows in (events, tasks, checkpoints, timers):
            for r in rows:
                for k in ("at", "not_before", "created_at", "published_at", "fire_at"):
                    if k in r:
                        r[k] = _ts(r[k], False)
        run = {**run, "updated_at": _ts(run["updated_at"], False)}
    with _errors(conn, sql.run_plain), raw.pipeline() if postgres else nullcontext():
        cur = raw.cursor()
        _write_statements(cur, sql, events, tasks, checkpoints, run, timers)
        if postgres:
            raw.commit()  # in the same round trip; the caller's COMMIT then finds nothing to do
    cur.close()
    return True


def _write_statements(cur: Any, sql: HotSQL, events: list[dict[str, Any]], tasks: list[dict[str, Any]],
                      checkpoints: list[dict[str, Any]], run: dict[str, Any],
                      timers: Sequence[dict[str, Any]] = ()) -> None:
    if events:
        cur.executemany(sql.events, events)
    if tasks:
        cur.executemany(sql.tasks, tasks)
    if timers:
        cur.executemany(sql.timers, timers)
    if checkpoints:
        cur.executemany(sql.checkpoints, checkpoints)
    cur.execute(sql.run_with_position if "position" in run else sql.run_plain, run)

