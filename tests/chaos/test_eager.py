"""Eager steps (``Baton(eager_steps=N)``): a run's next activity run by the pool process that
decided it, riding on the message it was delivered, with real workers.

* The chain: at most N steps ride on one delivered message, then the next is published; a
  step for another queue or with a timeout is always published; none is eager by default.
* Crashes: the whole worker SIGKILLed during an eager step (another worker re-runs it, found by
  its stale heartbeat); the pool process SIGKILLed during one, its worker alive (no message
  holds the attempt: re-sent when Celery redelivers the carrier, not after ``lost_after``).
* A long eager step on a live worker is never taken for lost: its claim is renewed.
* Celery's own ``self.retry()`` from an eager task, and a run cancelled during an eager step.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.diagnose import diagnose_runs
from tests.chaos.support import ChaosCluster, backend_cluster, count, verify_runs, wait_until
from tests.chaos.test_lost_requeue import gone, pool_children

pytestmark = pytest.mark.timeout(120)

LOST_AFTER = 3.0
DEAD_AFTER = 3.0
EAGER = 3


@pytest.fixture(params=["sqlite", "postgres"])
def eager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChaosCluster]:
    with backend_cluster(request.param, tmp_path, lost_after=LOST_AFTER, dead_after=DEAD_AFTER) as cluster:
        yield cluster


def result(chaos: ChaosCluster, run: Any, timeout: float) -> Any:
    try:
        return run.result(timeout=timeout)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{diagnose_runs(chaos.baton, [run.id], chaos)}") from None


def started_eager(chaos: ChaosCluster, run: Any, step: int) -> Any:
    """The attempt of ``step`` once claimed (eager attempts are claimed like any other)."""
    return next((t for t in chaos.baton.store.task_rows(run.run_id) if t.step == step and t.state == "started"), None)


def test_steps_ride_on_one_message_at_most_eager_steps_in_a_row(eager: ChaosCluster) -> None:
    chaos = eager
    chaos.start_worker(concurrency=1, BATON_TEST_EAGER_STEPS=str(EAGER))
    run = chaos.ns.trail.start(12)
    got = result(chaos, run, 60)
    ids = [g[0] for g in got]
    carriers = [g[1] for g in got]
    # Step 1 rides on the run's first advance (a baton.advance message), then every (EAGER+1)th
    # step is published and carries the EAGER after it.
    assert all(c is not None for c in carriers[:EAGER]), carriers
    for start in range(EAGER, 12, EAGER + 1):
        assert carriers[start] is None, f"step {start + 1} should have been published: {carriers}"
        ridden = carriers[start + 1:start + 1 + EAGER]
        assert ridden == [ids[start]] * len(ridden), f"steps after {start + 1} should ride on it: {carriers}"
        assert len({g[2] for g in got[start:start + 1 + EAGER]}) == 1, "a chain runs in one process"
    verify_runs(chaos.baton, [(run, got)])


def test_ineligible_steps_are_published(eager: ChaosCluster) -> None:
    chaos = eager
    other = f"{chaos.queue}-other"
    chaos.start_worker(concurrency=1, queues=(other,), BATON_TEST_EAGER_STEPS=str(EAGER))
    # Step 2 has a Baton timeout; step 4 goes to another queue (this worker consumes it too, but
    # a publish might hand it to another), and step 5 back to the first queue, while this process
    # runs a message of the other: each is published, though the budget allows more.
    run = chaos.ns.trail.start(5, timeout_at=1, queue_at=3, queue=other)
    got = result(chaos, run, 60)
    ids, carriers = [g[0] for g in got], [g[1] for g in got]
    assert carriers[0] is not None and carriers[2] == ids[1], carriers
    assert carriers[1] is None and carriers[3] is None and carriers[4] is None, carriers
    verify_runs(chaos.baton, [(run, got)])


def test_no_eager_steps_by_default(eager: ChaosCluster) -> None:
    chaos = eager
    chaos.start_worker(concurrency=1)
    run = chaos.ns.trail.start(6)
    got = result(chaos, run, 60)
    assert [g[1] for g in got] == [None] * 6
    verify_runs(chaos.baton, [(run, got)])


def test_an_eager_task_that_asks_celery_for_a_retry(eager: ChaosCluster) -> None:
    """``self.retry()`` in an eager task publishes the retry as a message (same id), as it would
    from a delivered one; the run goes on when that message is delivered."""
    chaos = eager
    key = f"retry-{chaos.queue}"
    chaos.start_worker(concurrency=1, BATON_TEST_EAGER_STEPS=str(EAGER))
    run = chaos.ns.retried.start(key)
    first, again, last = result(chaos, run, 60)
    assert count(key) == 2, f"ran {count(key)} times, expected 2 (the retry once)"
    assert again[2] == 1 and again[1] is None, f"the retry is a delivered message: {again}"
    assert last[1] == again[0], "the step after it rides on the retry's message"
    (row,) = [t for t in chaos.baton.store.task_rows(run.run_id) if t.step == 2]
    assert row.id == again[0] and row.state == "done"
    verify_runs(chaos.baton, [(run, [first, again, last])])


def test_a_run_cancelled_during_an_eager_step_goes_no_further(eager: ChaosCluster) -> None:
    """``revoke`` cannot reach an eager task: it runs to its end, its result is ignored, and the
    cancelled run starts nothing more."""
    chaos = eager
    key = f"cancel-{chaos.queue}"
    chaos.start_worker(concurrency=2, BATON_TEST_EAGER_STEPS=str(EAGER))  # the other process takes the cancel
    run = chaos.ns.trail.start(3, slow_at=1, seconds=1.5, key=key)
    row = wait_until(lambda: started_eager(chaos, run, 2), 30, "the slow eager step to be claimed")
    assert run.cancel("enough") is True
    wait_until(lambda: chaos.baton.store.get_run(run.run_id).status == "cancelled", 30, "the run to end cancelled")
    assert next(t for t in chaos.baton.store.task_rows(run.run_id) if t.id == row.id).state == "cancelled"
    # A warm shutdown waits for the carrier's job, so the eager step's end and its recording too.
    worker = chaos.procs[0]
    os.kill(worker.pid, signal.SIGTERM)  # the main process only: its pool finishes what it holds
    worker.wait(30)
    assert f"c.whence[{row.id}] succeeded" in chaos.logs(), "the eager step should have run to its end"
    rows = chaos.baton.store.task_rows(run.run_id)
    assert [t.step for t in rows] == [1, 2], "a cancelled run started another step"
    assert next(t for t in rows if t.id == row.id).state == "cancelled"
    assert count(key) == 1


def test_worker_killed_during_an_eager_step_is_recovered(eager: ChaosCluster) -> None:
    chaos = eager
    key = f"kill-{chaos.queue}"
    worker = chaos.start_worker(concurrency=1, BATON_TEST_EAGER_STEPS=str(EAGER))
    wid = chaos.worker_id(worker)
    run = chaos.ns.trail.start(4, slow_at=2, seconds=2.0, key=key)  # step 3 is slow, and eager
    row = wait_until(lambda: started_eager(chaos, run, 3), 30, "the slow eager step to be claimed")
    assert row.worker == wid and count(key) == 1
    chaos.kill(worker)
    chaos.start_worker(concurrency=1, BATON_TEST_EAGER_STEPS=str(EAGER))
    got = result(chaos, run, 60)
    assert count(key) == 2, f"the slow step ran {count(key)} times, expected 2 (killed, then re-sent)"
    assert got[2][1] is None, "the re-sent step is a message of its own"
    assert "stopped heartbeating" in chaos.logs()
    verify_runs(chaos.baton, [(run, got)])


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_pool_process_killed_during_an_eager_step_is_re_sent_when_its_carrier_returns(
        backend: str, tmp_path: Path) -> None:
    """Celery requeues the carrier of a dead pool process at once; its redelivery re-sends the eager
    step no message holds, long before ``lost_after`` (60 s here) would have."""
    with backend_cluster(backend, tmp_path, lost_after=60.0, dead_after=DEAD_AFTER) as chaos:
        key = f"child-{chaos.queue}"
        worker = chaos.start_worker(concurrency=1, BATON_TEST_EAGER_STEPS=str(EAGER))
        wid = chaos.worker_id(worker)
        run = chaos.ns.trail.start(4, slow_at=2, seconds=2.0, key=key)
        row = wait_until(lambda: started_eager(chaos, run, 3), 30, "the slow eager step to be claimed")
        assert row.worker == wid
        (child,) = pool_children(worker.pid)
        os.kill(child, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: gone(child), 10, "the killed pool process to exit")
        got = result(chaos, run, 40)
        waited = time.monotonic() - killed
        assert count(key) == 2, f"the slow step ran {count(key)} times, expected 2 (killed, then re-sent)"
        assert worker.poll() is None and chaos.worker_id(worker) == wid, "the worker's main process must survive"
        logs = chaos.logs()
        assert "stopped heartbeating" not in logs and "gone from the broker" not in logs
        assert "an eager step lost with its pool process" in logs
        assert waited < 30, f"re-sent {waited:.1f}s after the kill: lost_after's path, not the carrier's return"
        verify_runs(chaos.baton, [(run, got)])


@pytest.mark.parametrize("claim_after", ["0.2", "0"])  # claimed by the claimer thread, or at its start
def test_long_eager_step_on_a_live_worker_is_not_taken_for_lost(eager: ChaosCluster, claim_after: str) -> None:
    chaos = eager
    key = f"long-{chaos.queue}"
    seconds = 2.5 * LOST_AFTER
    worker = chaos.start_worker(concurrency=1, BATON_TEST_EAGER_STEPS=str(EAGER), BATON_TEST_CLAIM_AFTER=claim_after)
    run = chaos.ns.trail.start(3, slow_at=1, seconds=seconds, key=key)
    got = result(chaos, run, seconds + 30)
    assert got[1][1] is not None, "the slow step should have run eagerly"
    assert count(key) == 1, f"the long eager step ran {count(key)} times: it was re-sent while running"
    slow = next(t for t in chaos.baton.store.task_rows(run.run_id) if t.step == 2)
    assert slow.dispatches == 1 and slow.state == "done", (slow.dispatches, slow.state)
    assert "gone from the broker" not in chaos.logs()
    assert worker.poll() is None
    verify_runs(chaos.baton, [(run, got)])



@pytest.mark.parametrize("bad", [-1, 1.5, True, "4"])
def test_eager_steps_must_be_a_whole_number(bad: Any) -> None:
    from celery import Celery

    from sdk import Baton

    app = Celery("eager_bad", broker="memory://", set_as_current=False)
    with pytest.raises(ValueError, match="eager_steps"):
        Baton(app, database_url="sqlite://", eager_steps=bad)


@pytest.mark.parametrize(("broker", "eager_on"), [("redis://127.0.0.1:6379/0", True),
                                                   ("amqp://guest@127.0.0.1:5672//", False)])
def test_eager_steps_only_on_a_broker_the_sweeper_can_read(broker: str, eager_on: bool, tmp_path: Path) -> None:
    """The sweeper finds a lost eager step by reading the queues and ``unacked``: Redis only. Elsewhere a
    decision is never kept (the carrier's recording runs outside any eager chain)."""
    from celery import Celery

    from sdk import Baton
    from tasks import eager as eager_mod

    app = Celery("eager_broker", broker=broker, set_as_current=False)
    baton = Baton(app, database_url=f"sqlite:///{tmp_path}/b.sqlite3", eager_steps=4)

    @app.task(name="e.noop")
    def noop() -> None:
        return None

    noop.push_request(id="r:1:0:1", delivery_info={"routing_key": "celery"}, hostname="h@x")
    try:
        seen: list[bool] = []
        eager_mod.drive(baton.runtime, noop, "r", lambda: seen.append(eager_mod.chain.active))
    finally:
        noop.pop_request()
    assert seen == [eager_on]
    assert not eager_mod.chain.active


def test_pool_process_churn_with_eager_steps(eager: ChaosCluster) -> None:
    """60 runs of eight steps (one in four slow) and 20 of a 10-way fan-out (kept shares) on two
    eager workers while a random pool process is SIGKILLed every 0.7 s: every run completes, every
    step recorded once (lost_after is 3 s here, so the sweeper's path and the carrier's return both
    get their chance)."""
    import random

    chaos = eager
    rng = random.Random(11)
    workers = chaos.start_workers(2, concurrency=2, BATON_TEST_EAGER_STEPS="4")
    runs = [(chaos.ns.trail.start(8, slow_at=i % 4, seconds=0.3), 8) for i in range(60)]
    runs += [(chaos.ns.spread.start(10, slow_at=i % 12, seconds=0.3), 11) for i in range(20)]
    kills = 0
    deadline = time.monotonic() + 60
    while kills < 12 and time.monotonic() < deadline and chaos.baton.store.count_runs().get("running", 0):
        children = [c for w in workers for c in pool_children(w.pid)]
        if children:
            os.kill(rng.choice(children), signal.SIGKILL)
            kills += 1
        time.sleep(0.7)
    handles = [h for h, _ in runs]
    for h, steps in runs:
        got = result(chaos, h, 90)
        assert len(got) == steps and len({g[0] for g in got}) == steps, got
    report = verify_runs(chaos.baton, [(h, h.result(timeout=1)) for h in handles])
    assert kills >= 3, f"only {kills} kills landed while runs were in flight"
    assert all(w.poll() is None for w in workers), "the workers' main processes must survive"
    rescued = chaos.logs().count("an eager step lost with its pool process")
    print(f"\nFIGURES eager pool churn [{chaos.db.split(':')[0]}]: {report.line()} kills={kills} "
          f"rescued_by_carrier={rescued}")


@pytest.mark.parametrize(("budget", "kept"), [("3", 3), ("100", 4)])
def test_a_fan_out_keeps_this_process_share_and_publishes_the_rest(eager: ChaosCluster, budget: str,
                                                                   kept: int) -> None:
    """Of an 8-way fan-out, a process of a two-process worker keeps its share (4) within the step
    budget, the last ones, and runs them itself; the rest go out as messages at once. (The first
    step is slow, so the other process is busy and the queue never runs dry meanwhile.)"""
    chaos = eager
    chaos.start_worker(concurrency=2, BATON_TEST_EAGER_STEPS=budget)
    run = chaos.ns.spread.start(8, slow_at=0, seconds=1.0)
    got = result(chaos, run, 60)
    carriers = [g[1] for g in got[:8]]
    assert carriers[:8 - kept] == [None] * (8 - kept), f"the first {8 - kept} should be messages: {carriers}"
    assert all(c is not None for c in carriers[8 - kept:]), f"the last {kept} should ride: {carriers}"
    assert len({c for c in carriers if c}) == 1 and len({g[2] for g in got[8 - kept:8]}) == 1, \
        "a share rides on one message, in one process"
    verify_runs(chaos.baton, [(run, got)])


def released_meanwhile(got: list[Any], slow_at: int) -> None:
    """The slow step at ``slow_at`` was kept, and the kept step behind it ran as a message while it ran."""
    slow, behind = got[slow_at], got[slow_at + 1]
    assert slow[1] is not None, f"the slow step should have been kept: {got}"
    assert behind[1] is None, f"the step behind it should have become a message: {got}"
    assert behind[3] - slow[3] < 1.0, f"it started {behind[3] - slow[3]:.2f}s after the slow one, not meanwhile"


def test_a_long_kept_step_sends_the_rest_of_its_share_as_messages(eager: ChaosCluster) -> None:
    """Eager steps are for short tasks: when a kept step runs long, the kept steps behind it go out
    as messages (after ``RELEASE_AFTER``) and the other process runs them meanwhile."""
    chaos = eager
    chaos.start_worker(concurrency=2, BATON_TEST_EAGER_STEPS="100")
    run = chaos.ns.spread.start(4, slow_at=2, seconds=2.0)  # the share: steps 3 (slow) and 4
    got = result(chaos, run, 60)
    released_meanwhile(got, 2)
    assert got[3][2] != got[2][2], f"the other process should have run it: {got}"
    assert "sent 1 kept attempt(s) as messages" in chaos.logs()
    verify_runs(chaos.baton, [(run, got)])


def test_each_chain_of_a_threads_pool_has_its_long_step_watched(eager: ChaosCluster) -> None:
    """A ``threads`` pool runs several eager chains in one process at once: two runs' kept shares,
    each behind a slow step, are both sent on as messages and run meanwhile."""
    chaos = eager
    chaos.start_worker(concurrency=4, pool="threads", BATON_TEST_EAGER_STEPS="100")
    runs = [chaos.ns.spread.start(8, slow_at=6, seconds=2.0) for _ in range(2)]
    for run in runs:
        released_meanwhile(result(chaos, run, 60), 6)
    verify_runs(chaos.baton, [(run, run.result(timeout=1)) for run in runs])


def test_a_kept_share_goes_out_as_messages_once_its_queue_runs_dry(eager: ChaosCluster) -> None:
    """Two workers of two processes: a process keeps 4 of an 8-way fan-out (its worker's share), the
    four 0.3 s steps, while three others take the four quick ones published; once the queue is
    dry, the rest of the share goes out as messages instead of waiting to run one after another in
    one process. (The release after a long step is put off to 30 s here, to see this alone.)"""
    chaos = eager
    chaos.start_workers(2, concurrency=2, BATON_TEST_EAGER_STEPS="100", BATON_TEST_RELEASE_AFTER="30")
    run = chaos.ns.spread.start(8, each=0.3, each_from=4)
    got = result(chaos, run, 60)
    share = [g[1] for g in got[4:8]]
    assert share[0] is not None, f"the share's first step should ride: {got}"
    assert None in share, f"the rest of the share should have gone out once the queue ran dry: {share}"
    verify_runs(chaos.baton, [(run, got)])


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_pool_process_killed_holding_a_kept_share_is_re_sent_when_its_carrier_returns(
        backend: str, tmp_path: Path) -> None:
    """A pool process dies with a fan-out's share kept and nothing of the fan-out sent yet (fault
    ``eager_kept``): the carrier's redelivery re-sends all of it, long before ``lost_after``."""
    from tasks.faults import EAGER_KEPT

    with backend_cluster(backend, tmp_path, lost_after=60.0, dead_after=DEAD_AFTER) as chaos:
        once = tmp_path / "fault.once"
        worker = chaos.start_worker(concurrency=2, BATON_TEST_EAGER_STEPS="100", BATON_FAULT=EAGER_KEPT,
                                    BATON_FAULT_ONCE=str(once))
        run = chaos.ns.spread.start(6)
        got = result(chaos, run, 40)
        assert once.exists(), "the fault should have fired"
        assert worker.poll() is None, "the worker's main process must survive"
        logs = chaos.logs()
        assert "re-sent 6 attempt(s)" in logs and "an eager step lost with its pool process" in logs, logs[-3000:]
        assert "gone from the broker" not in logs
        verify_runs(chaos.baton, [(run, got)])
