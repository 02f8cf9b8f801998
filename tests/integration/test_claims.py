"""Deferred claims on real workers: an activity shorter than ``claim_after`` is recorded without a
claim (one transaction per step), a longer one is marked ``started`` by its worker while it runs,
and either way the finished row names the worker that ran it and when it started."""

from __future__ import annotations

import time

import pytest

from sdk import Baton
from tests.conftest import Cluster, wait_for

pytestmark = pytest.mark.timeout(120)


def _to_seconds(value: object) -> float:
    return value.timestamp()  # type: ignore[attr-defined]


def test_short_activities_name_who_ran_them_and_when(cluster: Cluster) -> None:
    """Recorded without a claim, a short activity's row still gets its runner and start time."""
    cluster.start_worker(concurrency=1)
    first = cluster.start_worker(concurrency=1)
    run = cluster.ns.sequence.start(12)
    assert run.result(timeout=60) == 12
    rows = cluster.baton.store.task_rows(run.run_id)
    assert len(rows) == 12 and {r.state for r in rows} == {"done"}
    runners = {r.worker for r in rows}
    live = {w.id for w in cluster.baton.store.workers()}
    assert runners <= live, (runners, live)
    for row in rows:
        assert row.started_at is not None and row.finished_at is not None
        assert row.started_at <= row.finished_at
    assert first.poll() is None


def test_long_activity_is_claimed_while_it_runs(cluster: Cluster) -> None:
    proc = cluster.start_worker(concurrency=1)
    key = f"claim-{cluster.queue}"
    run = cluster.ns.slow_sequence.start(1, 2.0, key)
    t0 = time.time()

    def claimed() -> object:
        rows = cluster.baton.store.task_rows(run.run_id)
        return next((r for r in rows if r.state == "started"), None)

    row = wait_for(claimed, 30, "the running activity to be claimed")
    seen_after = time.time() - t0
    assert row.worker.endswith(f"/{proc.pid}")
    # claimed after claim_after (0.2 s) of running, long before the 2 s task ends
    assert seen_after < 2.0 + 5.0
    assert run.result(timeout=60) == [0]
    done = cluster.baton.store.task_rows(run.run_id)[0]
    assert done.state == "done" and done.started_at == row.started_at  # the claim's start time is kept
    assert _to_seconds(done.finished_at) - _to_seconds(done.started_at) >= 1.9


def test_claim_after_must_be_below_the_recovery_windows() -> None:
    from celery import Celery

    app = Celery("claims", broker="memory://", set_as_current=False)
    with pytest.raises(ValueError, match="claim_after"):
        Baton(app, database_url="sqlite://", claim_after=20.0)  # above dead_after (10 s)
    with pytest.raises(ValueError, match="claim_after"):
        Baton(app, database_url="sqlite://", claim_after=-1)


def test_a_start_is_claimed_while_the_claimer_waits_to_renew_an_eager_claim(tmp_path: object) -> None:
    """The claimer sleeps until its next claim or renewal; an eager attempt's renewal is far off
    (``lost_after / 4``), and a task that starts meanwhile must still be claimed after ``claim_after``,
    not after the renewal (a real SQLite store, the claimer's own thread)."""
    from celery import Celery
    from sqlalchemy import insert

    from persistence.models import utcnow
    from persistence.store import tasks_t
    from tasks.activities import Claimer

    app = Celery("claims", broker="memory://", set_as_current=False)
    baton = Baton(app, database_url=f"sqlite:///{tmp_path}/claims.sqlite3", claim_after=0.05, lost_after=200.0)
    store = baton.runtime.store
    store.ensure_schema()
    with store.tx() as conn:
        for i, tid in enumerate(("r:1:0:1", "r:2:0:1")):
            conn.execute(insert(tasks_t).values(id=tid, run_id="r", step=i + 1, slot=0, attempt=1, task="t",
                                                args="[]", kwargs="{}", options="{}", state="scheduled",
                                                created_at=utcnow(), published_at=utcnow()))
    claimer = Claimer(baton.runtime)
    claimer.started("r:1:0:1", "host/1", eager=True, claimed=utcnow())  # renewal due in 50 s
    wait_for(lambda: claimer.until > time.monotonic() + 10, 10, "the claimer to sleep until the renewal")
    claimer.finished("r:1:0:1")
    t0 = time.monotonic()
    claimer.started("r:2:0:1", "host/1")

    def state() -> str:
        return next(r.state for r in store.task_rows("r") if r.id == "r:2:0:1")

    wait_for(lambda: state() == "started", 5, "the second attempt to be claimed")
    assert time.monotonic() - t0 < 5
