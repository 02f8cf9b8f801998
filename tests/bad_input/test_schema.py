"""A database written by another Baton schema version is refused with the way out, and nothing
in it is changed by the refusal."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from persistence.models import SCHEMA_VERSION
from persistence.store import Store
from sdk import StoreError
from tests.bad_input.conftest import dispose, one_line_error
from tests.chaos.flows_chaos import build
from tests.chaos.support import ROOT, counter_url, wait_until

pytestmark = pytest.mark.bad_input


def set_version(url: str, version: int) -> None:
    store = Store.for_url(url)  # creates the tables at this code's version
    with store.tx() as conn:
        conn.execute(sa.text("UPDATE baton_meta SET value = :v WHERE key = 'schema_version'"), {"v": str(version)})
    dispose(url)


def stored_version(url: str) -> str:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(sa.text("SELECT value FROM baton_meta WHERE key = 'schema_version'")).scalar())
    finally:
        engine.dispose()


def test_older_schema_is_refused_with_the_migration_command(db_url: str) -> None:
    set_version(db_url, SCHEMA_VERSION - 1)
    ns = build("memory://", db_url, queue="old", counter_url=counter_url())
    try:
        with pytest.raises(StoreError) as err:
            ns.seq.start(1)
        text = str(err.value)
        assert f"schema version {SCHEMA_VERSION - 1}" in text and f"needs {SCHEMA_VERSION}" in text
        assert "baton -A <app> migrate" in text and "stop the workers" in text
        assert "password" not in text.lower()
        with pytest.raises(StoreError, match="migrate"):
            ns.baton.get("anything")
    finally:
        dispose(db_url)
    assert stored_version(db_url) == str(SCHEMA_VERSION - 1), "the refusal changed the stored version"
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM baton_runs")).scalar() == 0
    finally:
        engine.dispose()


def test_newer_schema_is_refused_with_upgrade_advice(db_url: str) -> None:
    set_version(db_url, SCHEMA_VERSION + 1)
    ns = build("memory://", db_url, queue="new", counter_url=counter_url())
    try:
        with pytest.raises(StoreError, match=r"newer than this code .*upgrade Baton"):
            ns.seq.start(1)
    finally:
        dispose(db_url)
    assert stored_version(db_url) == str(SCHEMA_VERSION + 1)


def test_the_advertised_migrate_command_exists(cli: Any, db_url: str) -> None:
    code, out, err = cli("migrate", "--help")
    assert code == 0, err
    code, out, err = cli("migrate")
    assert code == 0 and "schema" in (out + err).lower()


def test_cli_on_an_older_schema_says_how_to_migrate(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    set_version(url, SCHEMA_VERSION - 1)
    env = {**os.environ, "BATON_TEST_BROKER": "memory://", "BATON_DATABASE_URL": url,
           "BATON_TEST_COUNTER_URL": counter_url(), "PYTHONPATH": str(ROOT), "COLUMNS": "200", "NO_COLOR": "1"}
    res = subprocess.run([sys.executable, "-m", "sdk.cli", "-A", "tests.chaos.chaos_app", "ls"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    one_line_error(res.returncode, res.stdout, res.stderr, f"schema version {SCHEMA_VERSION - 1}", "migrate")


def test_worker_on_an_older_schema_refuses_to_start(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    set_version(url, SCHEMA_VERSION - 1)
    env = {**os.environ, "BATON_TEST_BROKER": counter_url(), "BATON_DATABASE_URL": url,
           "BATON_TEST_QUEUE": f"old{uuid.uuid4().hex[:6]}", "BATON_TEST_COUNTER_URL": counter_url(),
           "PYTHONPATH": str(ROOT)}
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tests.chaos.chaos_app", "worker", "-P", "solo",
                                 "-Q", env["BATON_TEST_QUEUE"], "--without-mingle", "--without-gossip"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    began = time.monotonic()
    try:
        wait_until(lambda: proc.poll() is not None or time.monotonic() - began > 8, 20, "the worker to exit")
        assert proc.poll() not in (None, 0), "the worker kept running on a database it cannot use"
        assert "baton -A <app> migrate" in log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(10)


@pytest.mark.parametrize("old", [1, 2])
def test_an_older_database_is_migrated_to_this_schema_and_keeps_its_runs(db_url: str, old: int) -> None:
    """Version 2 added the deferred fan-in's columns, version 3 two indexes and a ``finished_at`` on
    cancelled attempts; ``migrate`` brings a version-1 or version-2 database up to date."""
    from sqlalchemy import insert, select

    from persistence.migrations import migrate
    from persistence.models import utcnow
    from persistence.store import tasks_t

    ns = build("memory://", db_url, queue="mig", counter_url=counter_url())
    run = ns.seq.start(1)
    cancelled = {"id": f"{run.run_id}:9:0:1", "run_id": run.run_id, "step": 9, "slot": 0, "attempt": 1, "task": "t",
                 "args": "[]", "kwargs": "{}", "options": "{}", "state": "cancelled", "dispatches": 1,
                 "created_at": utcnow(), "finished_at": None}
    with ns.baton.store.tx() as conn:  # as version 2 and earlier left a cancelled attempt
        conn.execute(insert(tasks_t).values(**cancelled))
    dispose(db_url)
    engine = sa.create_engine(db_url)
    try:  # make it an old database: without the indexes (and, for version 1, the three columns)
        with engine.begin() as conn:
            for index in ("ix_baton_runs_created_at", "ix_baton_runs_status_created",
                          "ix_baton_runs_workflow_created", "ix_baton_tasks_finished"):
                conn.execute(sa.text(f"DROP INDEX {index}"))
            for index, column in (("ix_baton_runs_status", "status"), ("ix_baton_runs_workflow", "workflow")):
                conn.execute(sa.text(f"CREATE INDEX {index} ON baton_runs ({column})"))
            if old == 1:
                for table, column in (("baton_runs", "fan_step"), ("baton_runs", "fan_open"),
                                      ("baton_tasks", "result")):
                    conn.execute(sa.text(f"ALTER TABLE {table} DROP COLUMN {column}"))
            conn.execute(sa.text(f"UPDATE baton_meta SET value = '{old}' WHERE key = 'schema_version'"))
    finally:
        engine.dispose()
    with pytest.raises(StoreError, match="migrate"):
        Store(db_url).ensure_schema()
    assert migrate(db_url) == list(range(old + 1, SCHEMA_VERSION + 1)) == [2, 3][old - 1:]
    assert stored_version(db_url) == str(SCHEMA_VERSION) == "3"
    engine = sa.create_engine(db_url)
    try:
        inspector = sa.inspect(engine)
        columns = {t: {c["name"] for c in inspector.get_columns(t)} for t in ("baton_runs", "baton_tasks")}
        indexes = {i["name"] for t in ("baton_runs", "baton_tasks") for i in inspector.get_indexes(t)}
    finally:
        engine.dispose()
    assert {"fan_step", "fan_open"} <= columns["baton_runs"] and "result" in columns["baton_tasks"]
    assert {"ix_baton_runs_created_at", "ix_baton_runs_status_created", "ix_baton_runs_workflow_created",
            "ix_baton_tasks_finished"} <= indexes
    assert not {"ix_baton_runs_status", "ix_baton_runs_workflow"} & indexes
    store = Store(db_url)
    store.ensure_schema()
    assert store.get_run(run.run_id).status == "running", "the run written before the migration is gone"
    with store.read() as conn:
        assert conn.execute(select(tasks_t.c.finished_at).where(tasks_t.c.id == cancelled["id"])).scalar()
    store.engine.dispose()
    assert migrate(db_url) == [], "migrating an up-to-date database did something"
