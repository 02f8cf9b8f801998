"""Fault 6, slow and hung activities.

* A task that never returns hits its ``step(timeout=...)``: the attempt is recorded as timed
  out, its process is killed (``revoke(terminate=True)``), and the retry succeeds.
* A worker that is alive but stuck is told apart from a dead one: the sweeper thread in the
  worker's main process keeps heartbeating while a solo pool is busy for longer than
  ``dead_after``, so its attempt is left alone; a SIGKILLed worker's attempt is re-dispatched
  to another worker once its heartbeat is ``dead_after`` old.

One cluster per backend for the module: a prefork worker ``P`` and a solo worker ``S``, each
also consuming a queue of its own, so that the test can route an activity to either (the
workflows take ``queue=``). The last test kills ``P``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.chaos.support import ChaosCluster, backend_cluster, count, verify_runs, wait_until

pytestmark = pytest.mark.timeout(120)

DEAD_AFTER = 2.5


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def hung_cluster(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ChaosCluster, Any, Any]]:
    with backend_cluster(request.param, tmp_path_factory.mktemp(f"hung-{request.param}"),
                         dead_after=DEAD_AFTER) as cluster:
        p = cluster.start_worker(concurrency=2, wait=False, queues=(f"{cluster.queue}.P",))
        s = cluster.start_worker(concurrency=1, pool="solo", wait=False, queues=(f"{cluster.queue}.S",))
        cluster.wait_ready(p)
        cluster.wait_ready(s)
        yield cluster, p, s


def test_hung_task_times_out_and_is_retried(hung_cluster: tuple[ChaosCluster, Any, Any]) -> None:
    chaos, worker, _ = hung_cluster
    wid = chaos.worker_id(worker)
    key = f"hang-{chaos.queue}"
    began = time.monotonic()
    # Attempt 1 would hang 5 s; the timeout is 1.5 s. On P, whose pool processes can be killed.
    run = chaos.ns.hung.start(key, 5.0, 1.5, queue=f"{chaos.queue}.P")
    assert run.result(timeout=40) == "fresh"
    took = time.monotonic() - began
    events = run.history()
    failed = [e for e in events if e.kind == "activity_failed"]
    assert [(e.payload["attempt"], e.payload.get("timed_out"), e.payload["error"]["type"]) for e in failed] == \
        [(1, True, "TimeoutError")]
    assert "exceeded its 1.5s timeout" in failed[0].payload["error"]["message"]
    assert [e.payload["attempt"] for e in events if e.kind == "activity_completed"] == [2]
    verify_runs(chaos.baton, [(run, "fresh")], failures_ok=True)
    # The hung attempt was killed, not left running: it never gets to return.
    first = next(t for t in chaos.baton.store.task_rows(run.run_id) if t.attempt == 1)
    wait_until(lambda: time.time() > first.started_at.timestamp() + 6.0, 15, "the hung attempt's full 5 s to pass")
    assert count(f"{key}:late-returned") == 0, "the timed-out attempt kept running to the end"
    assert worker.poll() is None and chaos.worker_id(worker) == wid, "the worker itself must survive"
    print(f"\nFIGURES hung [{chaos.db.split(':')[0]}]: timeout=1.5s result_after={took:.1f}s attempts=2")


def test_stuck_worker_is_not_dead_but_killed_one_is(hung_cluster: tuple[ChaosCluster, Any, Any]) -> None:
    chaos, doomed, solo = hung_cluster
    seconds = 3 * DEAD_AFTER
    key = f"stuck-{chaos.queue}"
    store = chaos.baton.store

    def started_by(run, proc):  # type: ignore[no-untyped-def]
        return any(t.state == "started" and (t.worker or "").endswith(f"/{proc.pid}")
                   for t in store.task_rows(run.run_id))

    run_s = chaos.ns.stuck.start(seconds, key, queue=f"{chaos.queue}.S")
    run_d = chaos.ns.stuck.start(seconds, key, queue=f"{chaos.queue}.P")
    wait_until(lambda: started_by(run_s, solo) and started_by(run_d, doomed), 30,
               "the solo worker and the prefork worker to start their long tasks")
    solo_id = chaos.worker_id(solo)
    chaos.kill(doomed)
    killed, killed_at = time.monotonic(), time.time()
    chaos.start_worker(concurrency=1, queues=(f"{chaos.queue}.P",))  # takes over the killed worker's queue

    # While the solo worker is stuck in its task for 3 x dead_after, its heartbeat stays fresh.
    stale_seen = 0.0
    while run_s.status() == "running":
        beat = next((w.last_beat for w in store.workers() if w.id == solo_id), None)
        assert beat is not None, "the busy solo worker was declared dead"
        stale_seen = max(stale_seen, time.time() - beat.timestamp())
        assert time.monotonic() - killed < 60, "the long task never finished"
        time.sleep(0.25)
    assert run_s.result(timeout=1) == "slept"
    assert run_d.result(timeout=40) == "slept"
    (row_s,) = store.task_rows(run_s.run_id)
    (row_d,) = store.task_rows(run_d.run_id)
    assert row_s.worker == solo_id, "the stuck-but-alive worker's task was taken away"
    assert row_d.worker is not None and not row_d.worker.endswith(f"/{doomed.pid}"), "the killed task never moved"
    assert row_d.started_at.timestamp() > killed_at, "the killed worker's task was never started again"
    # Executions: the stuck task once (never duplicated), the killed one twice (then on another worker).
    assert count(key) == 3, f"{count(key)} executions, expected 3"
    assert stale_seen < DEAD_AFTER, f"the solo worker's heartbeat got {stale_seen:.1f}s old while it was busy"
    redispatched_after = row_d.started_at.timestamp() - killed_at
    verify_runs(chaos.baton, [(run_s, "slept"), (run_d, "slept")])
    print(f"\nFIGURES stuck-vs-dead [{chaos.db.split(':')[0]}]: dead_after={DEAD_AFTER}s busy_for={seconds}s "
          f"max_heartbeat_age_while_busy={stale_seen:.1f}s killed_task_restarted_after={redispatched_after:.1f}s")
