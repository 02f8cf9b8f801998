"""Timers, signals, children, cancellation, continue-as-new, fork and versioning (issue 3)."""

from __future__ import annotations

import time

import pytest
import redis

from sdk import BatonError, Cancelled, NonDeterminismError, WorkflowNotFound
from tests.conftest import Cluster, wait_for

pytestmark = pytest.mark.timeout(150)


def _count(cluster: Cluster, key: str) -> int:
    client = redis.Redis.from_url(cluster.broker)
    try:
        return int(client.get(f"count:{key}") or 0)
    finally:
        client.close()


def _waiting_signal(run) -> bool:  # type: ignore[no-untyped-def]
    ck = run.checkpoint()
    return ck is not None and any(w["kind"] == "signal" for w in ck.waiting_on)


def test_sleep_completes(cluster: Cluster) -> None:
    cluster.start_worker()
    run = cluster.ns.sleeper.start(3)
    elapsed = run.result(timeout=30)
    assert 3 <= elapsed < 10
    assert [t.kind for t in cluster.baton.store.timer_rows(run.run_id)] == ["sleep"]


def test_sleep_survives_every_worker_dying(cluster: Cluster) -> None:
    w = cluster.start_worker()
    run = cluster.ns.sleeper.start(3)
    wait_for(lambda: cluster.baton.store.timer_rows(run.run_id), 20, "the timer row")
    cluster.kill(w)
    due = cluster.baton.store.timer_rows(run.run_id)[0].fire_at
    wait_for(lambda: time.time() > due.timestamp() + 1, 10, "the due time to pass with no worker alive")
    assert run.status() == "running"
    cluster.start_worker()
    assert run.result(timeout=30) >= 3


def test_signals_before_during_after_and_in_order(cluster: Cluster) -> None:
    cluster.start_worker()
    run = cluster.ns.waits.start(3)
    run.signal("msg", {"n": 1})  # before the wait is even reached (buffered)
    wait_for(lambda: (c := run.checkpoint()) is not None and c.step >= 2, 30, "the second wait")
    run.signal("msg", {"n": 2})  # during
    run.signal("msg", {"n": 3})
    assert run.result(timeout=30) == [{"n": 1}, {"n": 2}, {"n": 3}]
    with pytest.raises(BatonError, match="has ended"):
        run.signal("msg", {"n": 4})  # after: refused clearly
    with pytest.raises(WorkflowNotFound):
        cluster.baton.get("no-such-run").signal("msg", 1)


def test_signal_wait_times_out(cluster: Cluster) -> None:
    cluster.start_worker()
    run = cluster.ns.waits_or_times_out.start(2)
    assert run.result(timeout=30) == {"timed_out": "never"}


def test_children_sequence_fanout_and_failure(cluster: Cluster) -> None:
    cluster.start_worker(concurrency=3)
    run = cluster.ns.parent.start(4)
    out = run.result(timeout=60)
    assert out["one"] == 3
    assert out["many"] == [0, 2, 4, 6]
    assert "child broke" in out["failed"]
    kids = {h.id for h in run.children()}
    assert f"{run.id}/1" in kids and f"{run.id}/2.3" in kids and f"{run.id}/3" in kids


def test_cancel_sleeping_run_runs_cleanup(cluster: Cluster) -> None:
    cluster.start_worker()
    key = "cancel-sleep-" + cluster.queue
    run = cluster.ns.cancellable.start(key, "sleep")
    wait_for(lambda: (c := run.checkpoint()) is not None and c.step >= 1, 30, "the sleep")
    assert run.cancel("no longer needed") is True
    with pytest.raises(Cancelled):
        run.result(timeout=30)
    assert run.status() == "cancelled"
    assert _count(cluster, key) == 1  # the cleanup task ran once
    assert all(t.fired for t in cluster.baton.store.timer_rows(run.run_id))


def test_cancel_with_pending_activity_and_child(cluster: Cluster) -> None:
    cluster.start_worker(concurrency=3)
    key = "cancel-act-" + cluster.queue
    run = cluster.ns.cancellable.start(key, "activity")
    wait_for(lambda: any(h.id == f"{run.id}/1.2" for h in run.children()), 30, "the children to start")
    wait_for(lambda: any(t.state == "started" for t in cluster.baton.store.task_rows(run.run_id)), 30,
             "the activity to start")
    run.cancel("stop")
    with pytest.raises(Cancelled):
        run.result(timeout=30)
    assert _count(cluster, key) == 1
    sleeper_child = cluster.baton.get(f"{run.id}/1.2")
    wait_for(lambda: sleeper_child.status() == "cancelled", 30, "the child run to be cancelled")
    states = [t.state for t in cluster.baton.store.task_rows(run.run_id) if t.step == 1]
    assert states == ["cancelled"]


def test_a_child_left_running_by_a_parent_that_ended_is_cancelled_by_the_sweeper(cluster: Cluster) -> None:
    """A parent that ended (here: failed) while its process died before cancelling its children:
    a new worker's first sweep finds the child and cancels it."""
    from sqlalchemy import update

    from persistence.store import runs

    w = cluster.start_worker(concurrency=3)
    run = cluster.ns.cancellable.start("orphan-" + cluster.queue, "activity")
    wait_for(lambda: any(h.id == f"{run.id}/1.2" for h in run.children()), 30, "the children to start")
    child = cluster.baton.get(f"{run.id}/1.2")
    wait_for(lambda: child.checkpoint() is not None, 30, "the child's sleep")
    cluster.kill(w)
    with cluster.baton.store.tx() as conn:  # the parent's ending committed; its children's cancels never went out
        conn.execute(update(runs).where(runs.c.run_id == run.run_id).values(status="failed", needs_advance=False))
    assert child.status() == "running"
    cluster.start_worker()
    wait_for(lambda: child.status() == "cancelled", 30, "the orphaned child to be cancelled")
    assert run.status() == "failed"


def test_continue_as_new_loop(cluster: Cluster) -> None:
    cluster.start_worker()
    run = cluster.ns.looper.start(50, workflow_id="loop-50")
    assert run.result(timeout=90) == sum(range(50))
    assert run.run_id == "loop-50@11"
    lengths = []
    for gen in range(1, 12):
        rid = "loop-50" if gen == 1 else f"loop-50@{gen}"
        lengths.append(len(cluster.baton.store.events(rid)))
    assert max(lengths) <= 5 * 3 + 3  # each run's history stays short
    assert cluster.baton.get("loop-50").status() == "completed"


def test_fork_replays_prefix_without_rerunning(cluster: Cluster) -> None:
    cluster.start_worker()
    key = "fork-" + cluster.queue
    run = cluster.ns.counted.start(6, key)
    assert run.result(timeout=60) == [0, 1, 2, 3, 4, 5]
    before = [_count(cluster, f"{key}:{i}") for i in range(6)]
    assert before == [1] * 6
    branch = cluster.baton.fork(run.id, at_step=4)
    assert branch.result(timeout=60) == [0, 1, 2, 3, 4, 5]
    after = [_count(cluster, f"{key}:{i}") for i in range(6)]
    assert after == [1, 1, 1, 1, 2, 2]  # steps 1-4 replayed, 5-6 ran live
    assert len(run.checkpoints()) == 6 and len(branch.checkpoints()) == 6
    assert branch.info()["forked_from"] == run.id
    assert len([e for e in run.history() if e.kind == "activity_completed"]) == 6  # original untouched


def test_patched_and_blocked_resume(cluster: Cluster) -> None:
    old = cluster.start_worker()
    key = "ver-" + cluster.queue
    before = cluster.ns.versioned.start(key + "a")
    changing = cluster.ns.changing.start(key + "c")
    wait_for(lambda: _waiting_signal(before) and _waiting_signal(changing), 30, "both runs to wait")
    cluster.kill(old)
    cluster.baton.runtime.cache.clear()
    cluster.start_worker(BATON_TEST_CODE="v2")  # new code: patched() path, and an unguarded change
    after = cluster.ns.versioned.start(key + "b")
    wait_for(lambda: _waiting_signal(after), 30, "the new run to wait")
    for r in (before, after):
        r.signal("go", "yes")
    assert before.result(timeout=30) == [1, "yes"]  # recorded before the change: old path
    assert after.result(timeout=30) == [101, "yes"]  # started after: new path
    changing.signal("go", "now")
    wait_for(lambda: changing.status() == "blocked", 30, "the changed run to block")
    with pytest.raises(NonDeterminismError, match="step 2"):
        changing.result(timeout=1)
    err = changing.info()["error"]
    assert "t.add" in err["message"] and "signal" in err["message"] and "flows.py" in err["message"]
    for proc in list(cluster.procs):
        cluster.kill(proc)
    cluster.start_worker()  # the code is restored
    cluster.baton.resume(changing.id)
    assert changing.result(timeout=30) == [1, "now"]


def test_checkpoint_history_stays_small_with_a_large_local(cluster: Cluster) -> None:
    """5,000 steps holding a 1 MB local: every step's checkpoint kept, a few MB in all, not gigabytes."""
    cluster.start_worker(concurrency=1)
    run = cluster.ns.big_local.start(5000)
    assert run.result(timeout=120) == [1_000_000, 4999]
    rows = cluster.baton.store.checkpoint_rows(run.run_id)
    assert len(rows) == 5000
    stored = sum(len(r.locals_delta) + len(r.waiting) for r in rows)
    assert stored < 3_000_000, f"checkpoints take {stored:,} bytes"
    past = run.checkpoints()[2500]
    assert past.step == 2501 and past.locals["i"] == 2500
    assert past.locals["blob"].startswith("'xxxx") and len(past.locals["blob"]) <= 200
