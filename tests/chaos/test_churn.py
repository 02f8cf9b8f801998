"""Fault 1, worker churn: 200 concurrent runs mixing sequences, fan-outs, timers, signals and child
runs, while a random worker (preferably one caught running an activity) is SIGKILLed every
few seconds and replaced.

Survival is checked on the store (``verify_runs``): every run completed with the right result,
every step resolved, each step's completion recorded exactly once, nothing left in flight.
The longer version of this test is ``bench/soak.py``.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
import redis

from tests.chaos.support import ChaosCluster, verify_runs, wait_all

pytestmark = pytest.mark.timeout(240)

KILL_EVERY = 2.0  # seconds between kills
MAX_KILLS = 5
WORKERS = 3


def start_mix(ns: Any, total: int = 200, offset: int = 0) -> tuple[list[tuple[Any, Any]], list[tuple[Any, int]]]:
    """Start ``total`` runs of every shape; returns (handle, expected result) and the signal waiters.

    Shapes come round in a fixed cycle of 20 (5 fast and 1 slow sequence, 5 fan, 3 timed,
    3 signalled, 2 mixed, 1 family), so any batch of 20 has them all; ``offset`` continues the
    cycle across batches.
    """
    runs: list[tuple[Any, Any]] = []
    waiters: list[tuple[Any, int]] = []
    cycle = ["seq"] * 5 + ["slow"] + ["fan"] * 5 + ["timed"] * 3 + ["signalled"] * 3 + ["mixed"] * 2 + ["family"]
    plan = [cycle[(offset + n) % len(cycle)] for n in range(total)]
    for n, shape in enumerate(plan):
        i = offset + n
        if shape == "seq":
            runs.append((ns.seq.start(2, i), i + 2))
        elif shape == "slow":  # a sequence of 1 s steps: what a kill most often catches in flight
            runs.append((ns.slow_seq.start(2, 1.0, "churn"), [0, 1]))
        elif shape == "fan":
            runs.append((ns.fan.start(3), 3))
        elif shape == "timed":
            runs.append((ns.timed.start(1.0, i), i + 1))
        elif shape == "signalled":
            h = ns.signalled.start(i)
            runs.append((h, i + 7))
            waiters.append((h, 7))
        elif shape == "mixed":
            h = ns.mixed.start(i)
            runs.append((h, 2 * i + 5 + 3))
            waiters.append((h, 3))
        else:
            runs.append((ns.family.start(2), 2 + 3))  # children seq(2, 0) + seq(2, 1)
    return runs, waiters


def test_worker_churn(chaos: ChaosCluster) -> None:
    churn(chaos)


def test_worker_churn_with_eager_steps(chaos: ChaosCluster) -> None:
    """The same, with ``Baton(eager_steps=4)``: kills land in eager chains too."""
    churn(chaos, BATON_TEST_EAGER_STEPS="4")


def churn(chaos: ChaosCluster, **env: str) -> None:
    rng = random.Random(7)
    # Attempts published but not started for lost_after are re-sent; shorter would also re-send
    # messages merely queued behind 200 runs on a busy machine (harmless, but it adds load).
    chaos.knobs["lost_after"] = 15.0
    chaos.start_workers(WORKERS, **env)
    began = time.monotonic()
    runs, waiters = start_mix(chaos.ns)
    handles = [h for h, _ in runs]
    half = len(waiters) // 2
    for h, value in waiters[:half]:  # signals before the waits are reached: buffered
        h.signal("go", value)

    last_kill = time.monotonic()
    while chaos.kills < MAX_KILLS and chaos.baton.store.count_runs().get("running", 0):
        if time.monotonic() - last_kill >= KILL_EVERY and len(chaos.alive()) >= 2:
            chaos.kill_random(rng)
            chaos.start_worker(concurrency=2, wait=False, **env)
            last_kill = time.monotonic()
            if chaos.kills == MAX_KILLS:
                for h, value in waiters[half:]:  # signals at the last kill (these runs wait until then)
                    h.signal("go", value)
        time.sleep(0.2)
    killed_last = last_kill
    wait_all(handles, 150)
    finished = time.monotonic()
    report = verify_runs(chaos.baton, runs)
    assert report.runs >= 200 and report.activities > 400
    assert chaos.kills == MAX_KILLS
    stranded = redis.Redis.from_url(chaos.broker).hlen("unacked")
    print(f"\nFIGURES churn{' eager' if env else ''} [{chaos.db.split(':')[0]}]: {report.line()} kills={chaos.kills} "
          f"messages_stranded_by_kills={stranded} "
          f"total={finished - began:.1f}s recovered_after_last_kill={finished - killed_last:.1f}s")
