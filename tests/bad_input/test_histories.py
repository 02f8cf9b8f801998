"""Histories the engine cannot trust.

Arbitrary and corrupt histories fed to the pure engine are the hypothesis fuzz tests' job
(``tests/unit/test_fuzz.py``: ``test_arbitrary_histories_raise_nothing_but_baton_errors`` and
``test_corrupt_payloads_raise_a_baton_error``); they are not repeated here. This module checks
the same promise end to end: a history row edited by hand in the store blocks the run with a
``BatonError`` naming the run and the event, instead of being re-driven (and its activity
re-run) forever.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from persistence import recording as rec
from persistence.models import utcnow
from sdk import BatonError
from tasks import advance
from tests.bad_input.conftest import drive
from tests.chaos.flows_chaos import NS

pytestmark = pytest.mark.bad_input


def corrupt_started_event(ns: NS) -> tuple[str, str]:
    """A run waiting on its first task whose ``started`` event was edited into nonsense."""
    handle = ns.seq.start(2)
    drive(ns, handle)
    (task,) = ns.baton.store.task_rows(handle.run_id)
    with ns.baton.store.tx() as conn:
        conn.execute(sa.text("UPDATE baton_events SET payload = :p WHERE run_id = :r AND kind = 'started'"),
                     {"p": '{"args": 5, "kwargs": []}', "r": handle.run_id})
    ns.baton.runtime.cache.clear()  # force a cold replay of the whole history
    return handle.run_id, task.id


def record_and_advance(ns: NS, run_id: str, task_id: str) -> None:
    store = ns.baton.store

    def record(conn: sa.Connection) -> object:
        return rec.record_attempt(conn, store, task_id, True, 1, utcnow())

    advance.advance(ns.baton.runtime, run_id, before=record)


def test_corrupt_history_blocks_the_run_visibly(offline: NS) -> None:
    run_id, task_id = corrupt_started_event(offline)
    try:
        record_and_advance(offline, run_id, task_id)
    except BatonError:
        pass  # raising is allowed too; what matters is what the run shows
    info = offline.baton.get(run_id).info()
    assert info["status"] == "blocked", info["status"]
    error = info["error"] or {}
    assert error.get("type") == "BatonError"
    assert run_id in error["message"] and "corrupt history" in error["message"]
    assert "seq 1 (started)" in error["message"], "the error should name the event"
    # Blocked, not re-driven: the sweeper leaves it alone until someone fixes the store and resumes it.
    row = offline.baton.store.get_run(run_id)
    assert not row.needs_advance
