"""Fault 2, broker loss: Redis restarted with no persistence mid-run, so every queued and every
unacknowledged message is gone. The store still knows each run's state; the sweeper re-drives
every run from it (unstarted attempts re-sent after ``lost_after``, lost advances re-driven,
timers fired from their rows).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.chaos.support import ChaosCluster, RedisServer, count, verify_runs, wait_all, wait_until

pytestmark = pytest.mark.timeout(180)


def test_redis_restarted_empty_mid_run(private_redis: RedisServer, db_url: str, tmp_path: Path) -> None:
    chaos = ChaosCluster(private_redis.url, db_url, tmp_path, dead_after=3.0, lost_after=4.0)
    try:
        chaos.start_workers(2, concurrency=3)
        ns = chaos.ns
        key = f"bl-{chaos.queue}"
        runs = [(ns.slow_seq.start(4, 0.3, key), [0, 1, 2, 3]) for _ in range(8)]
        runs += [(ns.slow_fan.start(6, 0.3, key), 15) for _ in range(4)]
        runs += [(ns.timed.start(2.0, i), i + 1) for i in range(4)]
        waiters = [ns.signalled.start(i) for i in range(4)]
        runs += [(h, i + 5) for i, h in enumerate(waiters)]
        broker = private_redis.client()

        def queued() -> int:
            return int(broker.llen(chaos.queue)) + int(broker.hlen("unacked"))

        # Mid-run: some activities have run, and messages sit in the queue or unacked.
        wait_until(lambda: count(key) >= 4 and queued() >= 3, 90, "runs to be mid-way with messages queued")
        lost = queued()
        done_before = count(key)
        private_redis.kill()
        outage = time.monotonic()
        time.sleep(1.0)  # the outage itself: workers see the broker gone
        private_redis.start()
        restarted = time.monotonic()
        assert private_redis.client().dbsize() <= lost, "the restarted broker should start empty"
        for h in waiters:
            h.signal("go", 5)  # signals sent after the loss reach the runs too
        wait_all([h for h, _ in runs], 120, "every run to finish after the broker loss")
        finished = time.monotonic()
        report = verify_runs(chaos.baton, runs)
        assert all(p.poll() is None for p in chaos.procs), "a worker main process died with the broker"
        print(f"\nFIGURES broker-loss [{db_url.split(':')[0]}]: {report.line()} messages_lost={lost} "
              f"activities_done_before_loss={done_before} outage={restarted - outage:.1f}s "
              f"recovered_after_restart={finished - restarted:.1f}s")
    finally:
        chaos.stop()
