"""Schema migrations, applied explicitly (``baton migrate`` or :func:`migrate`), never
silently by a worker: changing a shared production schema is an operator's decision.

``MIGRATIONS[v]`` upgrades a database from version ``v`` to ``v + 1``. Version 1 is the
first schema; version 2 adds the columns of the deferred fan-in (``baton_runs.fan_step``,
``baton_runs.fan_open``, ``baton_tasks.result``), all nullable, so old rows need no rewrite.
Version 3 adds indexes for the runs list, newest first (by creation time; by status and by
workflow with creation time, replacing the two single-column ones) and one on settled attempts
by the time they settled (metrics read only what settled since their last look), and gives cancelled
attempts a ``finished_at``, as it now sets. Building the indexes locks writes to the two
tables while it runs (seconds per million rows): migrate with the workers stopped.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, inspect, select, text, update

from sdk.errors import StoreError

from . import dialect
from .models import FINISHED, SCHEMA_VERSION, MetaRow

# Constant DDL text (no SQL is built from strings); each guarded by a look at the table first.
_V2_COLUMNS = (
    ("baton_runs", "fan_step", "ALTER TABLE baton_runs ADD COLUMN fan_step INTEGER"),
    ("baton_runs", "fan_open", "ALTER TABLE baton_runs ADD COLUMN fan_open INTEGER"),
    ("baton_tasks", "result", "ALTER TABLE baton_tasks ADD COLUMN result TEXT"),
)


def _v1_to_v2(conn: Connection) -> None:
    for table, column, ddl in _V2_COLUMNS:
        if column not in {c["name"] for c in inspect(conn).get_columns(table)}:
            conn.execute(text(ddl))


_V3_DDL = (
    "CREATE INDEX IF NOT EXISTS ix_baton_runs_created_at ON baton_runs (created_at)",
    "CREATE INDEX IF NOT EXISTS ix_baton_runs_status_created ON baton_runs (status, created_at)",
    "CREATE INDEX IF NOT EXISTS ix_baton_runs_workflow_created ON baton_runs (workflow, created_at)",
    "DROP INDEX IF EXISTS ix_baton_runs_status",
    "DROP INDEX IF EXISTS ix_baton_runs_workflow",
    f"CREATE INDEX IF NOT EXISTS ix_baton_tasks_finished ON baton_tasks (finished_at) WHERE {FINISHED}",
    "UPDATE baton_tasks SET finished_at = COALESCE(started_at, published_at, created_at) "
    "WHERE state = 'cancelled' AND finished_at IS NULL",
)


def _v2_to_v3(conn: Connection) -> None:
    for ddl in _V3_DDL:
        conn.execute(text(ddl))


MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _v1_to_v2, 2: _v2_to_v3}
meta_t = MetaRow.__table__  # type: ignore[attr-defined]


def current_version(conn: Connection) -> int:
    found = conn.execute(select(meta_t.c.value).where(meta_t.c.key == "schema_version")).scalar()
    return int(found or 0)


def migrate(url: str) -> list[int]:
    """Bring the database at ``url`` to this code's schema; returns the versions applied."""
    engine = dialect.make_engine(url, writer=True)
    applied: list[int] = []
    try:
        with engine.begin() as conn:
            MetaRow.metadata.create_all(conn, checkfirst=True)
            version = current_version(conn) or SCHEMA_VERSION
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"database {dialect.safe_url(url)} has schema version {version}, newer than this Baton "
                    f"({SCHEMA_VERSION}); upgrade Baton instead of migrating down")
            while version < SCHEMA_VERSION:
                step = MIGRATIONS.get(version)
                if step is None:
                    raise StoreError(f"no migration from schema version {version}; restore a backup or start "
                                     "a new database")
                step(conn)
                version += 1
                applied.append(version)
            conn.execute(update(meta_t).where(meta_t.c.key == "schema_version").values(value=str(version)))
    finally:
        engine.dispose()
    return applied
