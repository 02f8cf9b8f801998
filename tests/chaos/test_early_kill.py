"""A worker SIGKILLed after it started an activity but before its first heartbeat.

Found by the churn test: a replacement worker killed moments after it came up left one run
stuck at its step. The sweeper recognises dead workers only by a stale heartbeat row, so an
attempt ``started`` by a worker that never wrote one is never re-dispatched (and ``lost_after``
covers only attempts nobody started); the run waits for Redis's visibility timeout (1 h).
The worker here gets a long sweep interval, so the window is seconds wide instead of ~1 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from tests.chaos.support import ChaosCluster, counter_url, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.mark.xfail(strict=True, reason="bug: an attempt started by a worker that died before its first heartbeat "
                   "is never reclaimed (persistence/runtime.py reclaim_dead_workers only looks at workers with a "
                   "heartbeat row); the run waits for the broker's visibility timeout")
def test_worker_killed_before_its_first_heartbeat(tmp_path: Path) -> None:
    redis.Redis.from_url(counter_url()).flushdb()
    chaos = ChaosCluster(counter_url(), f"sqlite:///{tmp_path / 'baton.sqlite3'}", tmp_path,
                         dead_after=2.0, lost_after=6.0)
    try:
        chaos.start_worker(concurrency=1)  # healthy: holds the sweeper lease
        queue = f"{chaos.queue}.W"
        run = chaos.ns.stuck.start(1.0, f"early-{chaos.queue}", queue=queue)
        doomed = chaos.start_worker(concurrency=1, wait=False, queues=(queue,), BATON_TEST_SWEEP_INTERVAL="10")
        row = wait_until(lambda: next((t for t in chaos.baton.store.task_rows(run.run_id)
                                       if t.state == "started"), None), 60, "the new worker to start the task")
        assert row.worker.endswith(f"/{doomed.pid}")
        assert chaos.worker_id(doomed) is None, "the worker heartbeated already: the window was missed"
        chaos.kill(doomed)
        chaos.start_worker(concurrency=1, queues=(queue,))  # its replacement, as a supervisor would start
        # dead_after + lost_after + a few sweeps: the attempt should have been sent again, to the replacement.
        assert run.result(timeout=20) == "slept"
    finally:
        chaos.stop()
