"""A worker SIGKILLed after it started an activity but before its first heartbeat.

Found by the churn test: a replacement worker killed moments after it came up left one run
stuck at its step, because the sweeper recognised dead workers only by a stale heartbeat row
and ``lost_after`` covers only attempts nobody started (the run would have waited for Redis's
visibility timeout, 1 h). Workers now beat as soon as they are ready, and the sweeper also
reclaims attempts ``started`` more than ``dead_after`` ago by a worker with no heartbeat row.

The window before a first beat is now too short to hit reliably, so the test makes it: it
kills the worker and deletes its heartbeat row, as if it had never written one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from sqlalchemy import delete

from persistence.store import workers_t
from tests.chaos.support import ChaosCluster, counter_url, wait_until

pytestmark = pytest.mark.timeout(120)


def test_worker_killed_before_its_first_heartbeat(tmp_path: Path) -> None:
    redis.Redis.from_url(counter_url()).flushdb()
    chaos = ChaosCluster(counter_url(), f"sqlite:///{tmp_path / 'baton.sqlite3'}", tmp_path,
                         dead_after=2.0, lost_after=60.0)
    try:
        chaos.start_worker(concurrency=1)  # healthy: holds the sweeper lease
        queue = f"{chaos.queue}.W"
        run = chaos.ns.stuck.start(1.0, f"early-{chaos.queue}", queue=queue)
        doomed = chaos.start_worker(concurrency=1, wait=False, queues=(queue,))
        row = wait_until(lambda: next((t for t in chaos.baton.store.task_rows(run.run_id)
                                       if t.state == "started"), None), 60, "the new worker to start the task")
        assert row.worker.endswith(f"/{doomed.pid}")
        chaos.kill(doomed)
        with chaos.baton.store.tx() as conn:  # as if it had died before its first beat
            conn.execute(delete(workers_t).where(workers_t.c.id == row.worker))
        chaos.start_worker(concurrency=1, queues=(queue,))  # its replacement, as a supervisor would start
        # Within dead_after and a few sweeps (lost_after is out of reach) the attempt is sent again.
        assert run.result(timeout=20) == "slept"
        (task,) = chaos.baton.store.task_rows(run.run_id)
        assert task.state == "done" and task.worker != row.worker
    finally:
        chaos.stop()
