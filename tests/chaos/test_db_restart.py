"""Fault 3, database restart: the store goes away mid-run and comes back.

PostgreSQL: a private server (never the shared one) is stopped ``fast`` and later ``immediate``
(a crash: recovery from WAL on start) while runs are in flight. Workers keep their results
(``advance`` retries database errors for 90 s before the pool process gives up and lets the
message be redelivered), the sweeper thread survives its failed ticks, and the connection pool
pre-pings, so nothing is lost and no run is left stuck.

SQLite has no server to restart; its outage is a writer holding the database's exclusive lock
for seconds while every worker queues behind it (busy timeout), with the same assertions.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.support import ChaosCluster, PgServer, count, verify_runs, wait_all, wait_until

pytestmark = pytest.mark.timeout(200)


def start_load(chaos: ChaosCluster, key: str) -> list[tuple[Any, Any]]:
    ns = chaos.ns
    runs = [(ns.slow_seq.start(5, 0.2, key), [0, 1, 2, 3, 4]) for _ in range(8)]
    runs += [(ns.slow_fan.start(5, 0.2, key), 10) for _ in range(3)]
    runs += [(ns.timed.start(1.5, i), i + 1) for i in range(3)]
    runs += [(ns.family.start(2), 5) for _ in range(2)]
    return runs


def test_postgres_restarted_mid_run(private_pg: PgServer, broker_url: str, tmp_path: Path) -> None:
    with private_pg.schema() as db:
        chaos = ChaosCluster(broker_url, db, tmp_path, dead_after=5.0, lost_after=20.0)
        try:
            chaos.start_workers(2, concurrency=3)
            key = f"pg-{chaos.queue}"
            runs = start_load(chaos, key)
            outages: list[float] = []
            for mode, after in (("fast", 6), ("immediate", 18)):
                wait_until(lambda after=after: count(key) >= after, 60, f"{after} activities before the {mode} stop")
                t0 = time.monotonic()
                private_pg.stop(mode)
                time.sleep(1.0)  # the outage: workers hit connection errors and retry
                private_pg.start()
                outages.append(time.monotonic() - t0)
            restarted = time.monotonic()
            wait_all([h for h, _ in runs], 120, "every run to finish after the restarts")
            finished = time.monotonic()
            report = verify_runs(chaos.baton, runs)
            assert all(p.poll() is None for p in chaos.procs), "a worker main process died in the outage"
            print(f"\nFIGURES db-restart [postgres]: {report.line()} restarts=fast+immediate "
                  f"outages={[round(o, 1) for o in outages]}s recovered_after_restart={finished - restarted:.1f}s")
        finally:
            chaos.stop()


def test_sqlite_locked_mid_run(broker_url: str, tmp_path: Path) -> None:
    path = tmp_path / "baton.sqlite3"
    chaos = ChaosCluster(broker_url, f"sqlite:///{path}", tmp_path, dead_after=10.0, lost_after=20.0)
    try:
        chaos.start_workers(2, concurrency=3)
        key = f"sl-{chaos.queue}"
        runs = start_load(chaos, key)
        wait_until(lambda: count(key) >= 6, 60, "activities before the lock")
        blocker = sqlite3.connect(path, timeout=30, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        t0 = time.monotonic()
        time.sleep(4.0)  # the outage: every writer and reader waits on the lock
        blocker.execute("COMMIT")
        blocker.close()
        released = time.monotonic()
        wait_all([h for h, _ in runs], 120, "every run to finish after the lock")
        finished = time.monotonic()
        report = verify_runs(chaos.baton, runs)
        assert all(p.poll() is None for p in chaos.procs), "a worker main process died in the outage"
        print(f"\nFIGURES db-restart [sqlite lock]: {report.line()} outage={released - t0:.1f}s "
              f"recovered_after_release={finished - released:.1f}s")
    finally:
        chaos.stop()
