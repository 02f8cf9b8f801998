"""A worker SIGKILLed mid-activity: every run still completes, each result recorded once."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime

import pytest

from tests.conftest import Cluster, wait_for

pytestmark = pytest.mark.timeout(180)


def test_worker_killed_mid_activity(cluster: Cluster) -> None:
    w1 = cluster.start_worker(concurrency=2)
    w2 = cluster.start_worker(concurrency=2)
    key = "crash-" + cluster.queue
    runs = [cluster.ns.slow_sequence.start(4, 1.5, key) for _ in range(4)]
    runs += [cluster.ns.slow_fanout.start(6, 1.5, key) for _ in range(2)]
    store = cluster.baton.store

    def w1_fresh() -> list[str]:
        """Attempts worker 1 started under a second ago: still running (they take 1.5 s) when we kill."""
        now = datetime.now(UTC)
        return [t.id for r in runs for t in store.task_rows(r.run_id)
                if t.state == "started" and t.worker and t.worker.endswith(f"/{w1.pid}") and t.started_at
                and (now - t.started_at.replace(tzinfo=t.started_at.tzinfo or UTC)).total_seconds() < 1.0]

    wait_for(w1_fresh, 60, "worker 1 to start an activity")
    kill_wall = datetime.now(UTC)
    cluster.kill(w1)
    # What the dead worker held mid-way: attempts it started less than 1 s before the kill (each
    # takes 1.5 s, so none of them can have finished, whatever commits were in flight).
    held = [t.id for r in runs for t in store.task_rows(r.run_id)
            if t.worker and t.worker.endswith(f"/{w1.pid}") and t.started_at
            and (kill_wall - t.started_at.replace(tzinfo=t.started_at.tzinfo or UTC)).total_seconds() < 1.0]
    assert held, "the kill hit no activity in flight"
    killed_at = time.monotonic()
    cluster.start_worker(concurrency=2)
    try:
        results = [r.result(timeout=90) for r in runs]
    except TimeoutError:
        for r in runs:
            if r.status() == "running":
                print(r.id, r.info()["waiting"], [(t.id, t.state, t.worker, t.dispatches, t.published_at,
                                                  t.started_at) for t in store.task_rows(r.run_id)])
        print("workers", [(w.id, w.last_beat) for w in store.workers()])
        print(cluster.logs()[-20000:])
        raise
    assert time.monotonic() - killed_at < 60, "runs took more than 60 s to recover from the kill"
    assert results[:4] == [[0, 1, 2, 3]] * 4
    assert results[4:] == [15, 15]
    for r in runs:
        done = Counter((e.step, e.slot) for e in r.history() if e.kind == "activity_completed")
        assert done and max(done.values()) == 1, f"{r.id}: a step's completion was recorded twice"
        steps = {e.step for e in r.history() if e.kind == "step_scheduled"}
        assert len(done) == (4 if r.id.startswith("slow_sequence") else 6) and len(steps) >= 1
    rows = {t.id: t for r in runs for t in store.task_rows(r.run_id)}
    for tid in held:  # what the dead worker held was re-sent and finished by another worker
        assert rows[tid].state == "done" and rows[tid].dispatches > 1, (tid, rows[tid])
        assert not rows[tid].worker.endswith(f"/{w1.pid}"), (tid, rows[tid].worker)
    assert w2.poll() is None
