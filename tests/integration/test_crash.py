"""A worker SIGKILLed mid-activity: every run still completes, each result recorded once."""

from __future__ import annotations

import time
from collections import Counter

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

    def w1_busy() -> bool:
        return any(t.state == "started" and t.worker and t.worker.endswith(f"/{w1.pid}")
                   for r in runs for t in store.task_rows(r.run_id))

    wait_for(w1_busy, 60, "worker 1 to be running an activity")
    cluster.kill(w1)
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
    redispatched = [t for r in runs for t in store.task_rows(r.run_id) if t.dispatches > 1]
    assert redispatched, "the sweeper re-dispatched nothing: the kill hit no activity?"
    assert w2.poll() is None
