"""Safety: no pickle on the wire or in the store, pickle-accepting apps refused, SQL only through
bound parameters, and secrets kept out of checkpoints with ``redact``."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from sdk import Baton, BatonError
from tests.bad_input.conftest import dispose, drive
from tests.chaos.flows_chaos import NS, build
from tests.chaos.support import ROOT, counter_url

pytestmark = pytest.mark.bad_input

PACKAGES = ("sdk", "persistence", "tasks", "dashboards")
JSON_COLUMNS = {"args", "kwargs", "result", "error", "payload", "locals", "locals_delta", "waiting", "options",
                "position", "registered"}


def sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


# ---------------------------------------------------------------- pickle


def test_baton_configures_json_only(tmp_path: Path) -> None:
    app = Celery("safe", broker="memory://", set_as_current=False)
    Baton(app, database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}")
    assert app.conf.task_serializer == "json" and app.conf.result_serializer == "json"
    assert app.conf.event_serializer == "json"
    assert list(app.conf.accept_content) == ["json"]
    dispose(f"sqlite:///{tmp_path / 'db.sqlite3'}")


@pytest.mark.parametrize("setting", [
    {"accept_content": ["json", "pickle"]},
    {"task_serializer": "pickle"},
    {"result_serializer": "pickle"},
    {"accept_content": ["application/json", "application/x-python-serialize"]},  # pickle by content type
], ids=["accept", "task-serializer", "result-serializer", "accept-content-type"])
def test_app_that_accepts_pickle_is_refused(tmp_path: Path, setting: dict[str, Any]) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    app = Celery("unsafe", broker="memory://", set_as_current=False)
    app.conf.update(setting)
    with pytest.raises(BatonError) as err:
        Baton(app, database_url=url)
    assert "pickle" in str(err.value) and "allow_pickle=True" in str(err.value) and "accept_content" in str(err.value)
    app2 = Celery("unsafe2", broker="memory://", set_as_current=False)
    app2.conf.update(setting)
    Baton(app2, database_url=url, allow_pickle=True)  # explicit consent is honoured
    dispose(url)


def test_no_pickle_in_the_code() -> None:
    pattern = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|marshal|shelve|cloudpickle)\b|PickleType"
                         r"|pickle\.(loads|dumps|load|dump)\(", re.M)
    hits = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}" for p in sources() for m in pattern.finditer(p.read_text())]
    assert not hits, hits


def test_messages_on_the_wire_are_json(broker_url: str, db_url: str) -> None:
    import redis

    ns = build(broker_url, db_url, queue="wire", counter_url=counter_url())
    try:
        handle = ns.seq.start(2)  # publishes baton.advance
        drive(ns, handle)  # publishes the first activity, c.add
        client = redis.Redis.from_url(broker_url)
        raw = client.lrange("wire", 0, -1)
        assert len(raw) >= 2, raw
        names = set()
        for message in raw:
            envelope = json.loads(message)
            assert envelope["content-type"] == "application/json", envelope["content-type"]
            assert envelope["properties"]["body_encoding"] == "base64"
            body = json.loads(base64.b64decode(envelope["body"]))
            names.add(envelope["headers"]["task"])
            assert isinstance(body, list) and len(body) == 3  # (args, kwargs, embed): the JSON protocol 2 body
        assert {"baton.advance", "c.add"} <= names
        client.close()
    finally:
        dispose(db_url)


def test_store_holds_only_json(offline: NS) -> None:
    drive(offline, offline.seq.start(2), results={"c.add": 1})
    drive(offline, offline.redacted.start("abc"), results={"c.add": 11})
    offline.signalled.start(1).signal("go", {"nested": [1, 2.5, None, "x"]})
    from persistence.models import Run

    for table in Run.metadata.sorted_tables:
        for column in table.columns:
            assert not isinstance(column.type, sa.PickleType | sa.LargeBinary), f"{table.name}.{column.name}"
    engine = offline.baton.store.engine
    checked = 0
    with engine.connect() as conn:
        for table in Run.metadata.sorted_tables:
            for row in conn.execute(sa.select(table)).mappings():
                for name, value in row.items():
                    if name in JSON_COLUMNS and value is not None:
                        json.loads(value)
                        checked += 1
    assert checked > 20


# ---------------------------------------------------------------- SQL


def test_no_sql_built_from_strings_in_the_code() -> None:
    # Raw SQL is allowed only as constant text (the SQLite PRAGMAs and BEGIN IMMEDIATE).
    pattern = re.compile(r"(text|exec_driver_sql|execute)\(\s*(f[\"']|[\"'][^\"']*[\"']\s*(%|\.format|\+))")
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in sources() for m in pattern.finditer(p.read_text())]
    assert not hits, hits


def test_hostile_strings_travel_only_as_bound_parameters(offline: NS) -> None:
    hostile = "x'); DROP TABLE baton_runs; -- \" ; DELETE FROM baton_events WHERE '1'='1"
    store = offline.baton.store
    statements: list[str] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        statements.append(statement)

    engines = {id(e): e for e in (store.engine, store.reader)}.values()
    for engine in engines:
        sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        handle = offline.signalled.start(hostile, workflow_id="hostile-1")
        handle.signal(hostile, hostile)
        handle.signal("go", {hostile: hostile})
        drive(offline, handle, results={"c.add": hostile})
        offline.baton.list(workflow=hostile)
        offline.baton.list(search=hostile)
        offline.baton.list(search="%_\\")
        handle.cancel(hostile)
        drive(offline, handle)
    finally:
        for engine in engines:
            sa.event.remove(engine, "before_cursor_execute", capture)
    assert statements
    leaked = [s for s in statements if "DROP TABLE" in s or "DELETE FROM baton_events WHERE '1'" in s]
    assert not leaked, leaked[:3]
    assert store.get_run("hostile-1") is not None and store.count_runs()
    assert next(s.name for s in store.signal_rows("hostile-1")) == hostile, "the value did not round-trip verbatim"
    assert offline.baton.list(search="%_\\") == [], "LIKE wildcards in a search must match literally"


# ---------------------------------------------------------------- secrets


def test_redacted_locals_never_reach_the_store(offline: NS) -> None:
    handle = offline.redacted.start("abc-123")
    secret = "sk-live-" + "abc-123"[::-1]
    info = drive(offline, handle)  # waits at its first task, checkpoint written
    assert info["locals"]["api_key"] == "<redacted>" and info["locals"]["public"] == "visible-value"
    assert handle.checkpoint().locals["api_key"] == "<redacted>"
    info = drive(offline, handle, results={"c.add": len(secret)})
    assert info["status"] == "completed" and info["result"] == {"n": len(secret), "public": "visible-value"}
    assert all(c.locals.get("api_key") == "<redacted>" for c in handle.checkpoints())
    with offline.baton.store.engine.connect() as conn:
        from persistence.models import Run

        for table in Run.metadata.sorted_tables:
            for row in conn.execute(sa.select(table)).all():
                assert secret not in repr(tuple(row)), f"the secret leaked into {table.name}: {row}"
