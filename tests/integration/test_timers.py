"""Firing due timers in batches (persistence/timers.py): the store's side on both databases,
and a burst of sleeping runs woken by real workers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import insert, select, update

from persistence import runtime as rt
from persistence import timers
from persistence.models import utcnow
from persistence.store import Store, events_t, runs, tasks_t, timers_t
from tests.conftest import Cluster, _pg_schema_url

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store.for_url(db_url)
    yield s
    s.engine.dispose()
    Store.forget_all()


def _run(store: Store, rid: str, status: str = "running") -> None:
    with store.tx() as conn:
        store.create_run(conn, run_id=rid, workflow_id=rid, workflow="w", args_json="[]", kwargs_json="{}")
        conn.execute(update(runs).where(runs.c.run_id == rid).values(status=status, needs_advance=False))


def _timer(store: Store, rid: str, step: int, slot: int = 0, kind: str = "sleep", ago: float = 1.0,
           attempt: int = 0) -> int:
    with store.tx() as conn:
        res = conn.execute(insert(timers_t).values(run_id=rid, step=step, slot=slot, attempt=attempt, kind=kind,
                                                   fire_at=utcnow() - timedelta(seconds=ago), fired=False))
        return int(res.inserted_primary_key[0])


def _fire(store: Store, limit: int = timers.BATCH) -> tuple[tuple[int, int], list[str]]:
    out = rt.Outbox()
    with store.tx() as conn:
        got = timers.fire_due(store, conn, utcnow(), out, limit)
    return got, out.advance


def _events(store: Store, rid: str) -> list[Any]:
    with store.read() as conn:
        return list(conn.execute(select(events_t.c.seq, events_t.c.kind, events_t.c.step, events_t.c.slot,
                                        events_t.c.key).where(events_t.c.run_id == rid).order_by(events_t.c.seq)))


def _unfired(store: Store) -> int:
    with store.read() as conn:
        return len(conn.execute(select(timers_t.c.id).where(timers_t.c.fired.is_(False))).all())


def _run_row(store: Store, rid: str) -> Any:
    with store.read() as conn:
        return conn.execute(select(runs).where(runs.c.run_id == rid)).first()


def test_a_batch_fires_each_due_timer_once_in_order_and_wakes_each_run_once(store: Store) -> None:
    for i in range(5):
        _run(store, f"r{i}")
        _timer(store, f"r{i}", step=2)
    _timer(store, "r0", step=3, slot=1)  # two timers of one run (a gather of sleeps): two seqs in a row
    _timer(store, "r1", step=4, ago=-3600)  # not due
    (looked, settled), woken = _fire(store)
    assert (looked, settled) == (6, 6)
    assert sorted(woken) == [f"r{i}" for i in range(5)]
    assert [(e.seq, e.kind, e.step, e.slot, e.key) for e in _events(store, "r0")] == [
        (1, "started", None, None, None), (2, "timer_fired", 2, 0, "timer:2:0"), (3, "timer_fired", 3, 1, "timer:3:1")]
    row = _run_row(store, "r0")
    assert row.last_seq == 3 and row.needs_advance
    assert [e.kind for e in _events(store, "r4")] == ["started", "timer_fired"]
    assert _fire(store) == ((0, 0), [])  # fired once: nothing due now
    assert _unfired(store) == 1


def test_a_burst_larger_than_a_batch_is_drained_batch_by_batch(store: Store) -> None:
    for i in range(7):
        _run(store, f"b{i}")
        _timer(store, f"b{i}", step=2, ago=10 - i)
    first, woken = _fire(store, limit=3)
    assert first == (3, 3) and woken == ["b0", "b1", "b2"]  # the longest overdue first
    assert _fire(store, limit=3)[0] == (3, 3)
    assert _fire(store, limit=3)[0] == (1, 1)
    assert _unfired(store) == 0


def test_ended_gone_and_already_fired_runs_are_settled_without_a_wake(store: Store) -> None:
    _run(store, "done", status="completed")
    _timer(store, "done", step=2)
    _timer(store, "gone", step=2)  # its run was never there (a purged run)
    _run(store, "dup")
    _timer(store, "dup", step=2)
    with store.tx() as conn:  # the event is already there (fired by an earlier sweep that lost its update)
        conn.execute(insert(events_t).values(run_id="dup", seq=2, kind="timer_fired", step=2, slot=0, name="",
                                             key="timer:2:0", payload="{}", at=utcnow()))
        conn.execute(update(runs).where(runs.c.run_id == "dup").values(last_seq=2))
    (looked, settled), woken = _fire(store)
    assert (looked, settled) == (3, 3) and woken == []
    assert _unfired(store) == 0
    assert [e.kind for e in _events(store, "done")] == ["started"]
    assert [e.seq for e in _events(store, "dup")] == [1, 2]


def test_an_attempts_timeout_and_a_sleep_of_one_run_in_one_batch_get_distinct_seqs(store: Store) -> None:
    _run(store, "t")
    with store.tx() as conn:
        conn.execute(insert(tasks_t).values(id=rt.task_id("t", 2, 0, 1), run_id="t", step=2, slot=0, attempt=1,
                                            task="slow", args="[]", kwargs="{}", options="{}", timeout=5.0,
                                            state="started", dispatches=1, created_at=utcnow()))
    _timer(store, "t", step=2, slot=0, kind="attempt_timeout", attempt=1, ago=2)
    _timer(store, "t", step=2, slot=1, kind="sleep", ago=1)
    (looked, settled), woken = _fire(store)
    assert (looked, settled) == (2, 2) and set(woken) == {"t"}
    assert [(e.seq, e.kind) for e in _events(store, "t")] == [(1, "started"), (2, "activity_failed"),
                                                              (3, "timer_fired")]
    assert _run_row(store, "t").last_seq == 3


@pytest.fixture
def pg_store() -> Iterator[Store]:
    """PostgreSQL only: SQLite's writer lock is the whole database, there are no row locks to skip."""
    for url in _pg_schema_url():
        s = Store.for_url(url)
        yield s
        s.engine.dispose()
        Store.forget_all()


def test_a_run_a_worker_holds_is_skipped_not_waited_for(pg_store: Store) -> None:
    store = pg_store
    _run(store, "held")
    _run(store, "free")
    _timer(store, "held", step=2)
    _timer(store, "free", step=2)
    with store.tx() as worker:
        store.lock_run(worker, "held")  # a worker deciding this run right now
        started = time.monotonic()
        (looked, settled), woken = _fire(store)
        assert time.monotonic() - started < 2
    assert (looked, settled) == (2, 1) and woken == ["free"]
    assert _fire(store) == ((1, 1), ["held"])  # the next sweep fires it


def test_a_burst_of_sleeping_runs_all_wake_once(cluster: Cluster) -> None:
    cluster.start_worker()
    runs_ = [cluster.ns.sleeper.start(1) for _ in range(250)]  # more than one batch fall due together
    assert all(r.result(timeout=120) >= 1 for r in runs_)
    for r in runs_[::25]:
        assert [e.kind for e in r.history()].count("timer_fired") == 1
