"""Fault 5, a crash between steps: ``os._exit`` injected (``tasks/faults.py``) at each point of the
advance path, once each, while runs are in flight:

* ``after_commit``: the decision is committed, its tasks not yet published (the sweeper
  publishes outbox rows left ``scheduled``);
* ``after_publish``: the result is recorded and the next step published, the message not yet
  acknowledged (it is redelivered, runs again, and its second result is ignored);
* ``mid_fanout_publish``: half of a fan-out published (the sweeper publishes the rest; in a
  worker's main process the whole worker dies and is replaced, as a supervisor would);
* ``before_record``: the activity ran, its result not yet recorded (redelivered, run again);
* ``after_fan_in`` (PostgreSQL): a fan-out's last result committed with the run flagged, its
  decision not yet taken (the redelivered message is a duplicate; the sweeper decides the run).

One faulty worker per point, all at once; runs keep being started until every point has
fired. Every run must then complete intact (``verify_runs``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tasks.faults import POINTS, POSTGRES_ONLY
from tests.chaos.diagnose import diagnose_runs
from tests.chaos.support import ChaosCluster, verify_runs, wait_all, wait_until

TIMEOUT = 180
pytestmark = pytest.mark.timeout(TIMEOUT)


def test_crash_at_every_point_of_the_advance_path(chaos: ChaosCluster, tmp_path: Path) -> None:
    began = time.monotonic()
    points = POINTS if chaos.db.startswith("postgresql") else tuple(p for p in POINTS if p not in POSTGRES_ONLY)
    once = {point: tmp_path / f"fault-{point}.once" for point in points}
    procs = [chaos.start_worker(concurrency=1, wait=False, BATON_FAULT=point, BATON_FAULT_ONCE=str(once[point]))
             for point in points]
    for proc in procs:
        chaos.wait_ready(proc)
    ns = chaos.ns
    key = f"cp-{chaos.queue}"
    runs: list[tuple[Any, Any]] = []

    def fired() -> list[str]:
        return [p for p, f in once.items() if f.exists()]

    deadline = time.monotonic() + 90
    while len(fired()) < len(points) and time.monotonic() < deadline:
        if len(runs) < 80:
            runs.append((ns.slow_fan.start(4, 0.1, key), 6))
            runs.append((ns.slow_seq.start(3, 0.1, key), [0, 1, 2]))
        chaos.replace_dead()  # a worker whose main process hit a fault is restarted, as a supervisor would
        time.sleep(0.5)
    assert sorted(fired()) == sorted(points), f"faults that never fired: {set(points) - set(fired())}"
    last_fault = max(f.stat().st_mtime for f in once.values())

    def all_done() -> bool:
        chaos.replace_dead()
        return all(h.status() != "running" for h, _ in runs)

    # Within the test's own timeout (which would fail it with no diagnosis), 120 s at most.
    wait = min(120.0, TIMEOUT - 15 - (time.monotonic() - began))
    try:
        wait_until(all_done, wait, "every run to finish after the faults", interval=0.5)
    except AssertionError as exc:
        where = {p: (once[p].read_text().strip(), f"{once[p].stat().st_mtime - time.time():+.1f}s") for p in points}
        raise AssertionError(f"{exc}\nfaults fired (point pid, when): {where}\n"
                             + diagnose_runs(chaos.baton, [h.id for h, _ in runs], chaos)) from None
    wait_all([h for h, _ in runs], 5)
    recovered = time.time() - last_fault
    report = verify_runs(chaos.baton, runs)
    where = {p: once[p].read_text().split()[1] for p in points}
    mains = {str(p.pid) for p in procs}
    in_main = sorted(p for p, pid in where.items() if pid in mains)
    print(f"\nFIGURES crash-points [{chaos.db.split(':')[0]}]: {report.line()} faults={len(points)} "
          f"in_main_process={in_main} workers_replaced={chaos.replaced} "
          f"recovered_after_last_fault={recovered:.1f}s")
