"""Fault 6, slow and hung activities.

* A task that never returns hits its ``step(timeout=...)``: the attempt is recorded as timed
  out, its process is killed (``revoke(terminate=True)``), and the retry succeeds.
* A worker that is alive but stuck is told apart from a dead one: the sweeper thread in the
  worker's main process keeps heartbeating while a solo pool is busy for longer than
  ``dead_after``, so its attempt is left alone; a SIGKILLed worker's attempt is re-dispatched
  to another worker once its heartbeat is ``dead_after`` old.
"""

from __future__ import annotations

import time

import pytest

from sdk.serde import loads
from tests.chaos.support import ChaosCluster, count, verify_runs, wait_until

pytestmark = pytest.mark.timeout(120)


def test_hung_task_times_out_and_is_retried(chaos: ChaosCluster) -> None:
    (worker,) = chaos.start_workers(1, concurrency=2)
    wid = chaos.worker_id(worker)
    key = f"hang-{chaos.queue}"
    began = time.monotonic()
    run = chaos.ns.hung.start(key, 5.0, 1.5)  # attempt 1 would hang 5 s; the timeout is 1.5 s
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


def test_stuck_worker_is_not_dead_but_killed_one_is(chaos: ChaosCluster) -> None:
    chaos.knobs["dead_after"] = dead_after = 2.5
    seconds = 3 * dead_after
    key = f"stuck-{chaos.queue}"
    store = chaos.baton.store
    (solo,) = chaos.start_workers(1, concurrency=1, pool="solo")
    run_s = chaos.ns.stuck.start(seconds, key)

    def started_by(run, proc):  # type: ignore[no-untyped-def]
        return any(t.state == "started" and (t.worker or "").endswith(f"/{proc.pid}")
                   for t in store.task_rows(run.run_id))

    wait_until(lambda: started_by(run_s, solo), 30, "the solo worker to start its long task")
    (doomed,) = chaos.start_workers(1, concurrency=1)
    run_d = chaos.ns.stuck.start(seconds, key)  # the solo worker is busy (prefetch 1): this goes to `doomed`
    wait_until(lambda: started_by(run_d, doomed), 30, "the second worker to start its long task")
    solo_id = chaos.worker_id(solo)
    chaos.kill(doomed)
    killed, killed_at = time.monotonic(), time.time()
    chaos.start_workers(1, concurrency=1)  # a spare to take over the killed worker's task

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
    assert stale_seen < dead_after, f"the solo worker's heartbeat got {stale_seen:.1f}s old while it was busy"
    redispatched_after = row_d.started_at.timestamp() - killed_at
    verify_runs(chaos.baton, [(run_s, "slept"), (run_d, "slept")])
    assert loads(store.get_run(run_d.run_id).result) == "slept"
    print(f"\nFIGURES stuck-vs-dead [{chaos.db.split(':')[0]}]: dead_after={dead_after}s busy_for={seconds}s "
          f"max_heartbeat_age_while_busy={stale_seen:.1f}s killed_task_restarted_after={redispatched_after:.1f}s")
