"""The durable core on real parts: Redis, worker subprocesses, SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from sdk import ActivityError, WorkflowAlreadyStarted, WorkflowFailed
from tests.conftest import Cluster

pytestmark = pytest.mark.timeout(120)


def test_sequential_workflow(cluster: Cluster) -> None:
    cluster.start_worker()
    run = cluster.ns.sequence.start(20, start=5)
    assert run.result(timeout=60) == 25
    assert run.status() == "completed"
    kinds = [e.kind for e in run.history()]
    assert kinds[0] == "started" and kinds[-1] == "completed"
    assert kinds.count("step_scheduled") == 20
    assert kinds.count("activity_completed") == 20


def test_fanout_500_results_in_order(cluster: Cluster) -> None:
    cluster.start_worker(concurrency=2)
    run = cluster.ns.fanout.start(500)
    out = run.result(timeout=100)
    assert out == {"n": 500, "sum": sum(i * i for i in range(500)), "first": [0, 1, 4]}
    hist = run.history()
    assert sum(1 for e in hist if e.kind == "activity_completed") == 500
    assert len({(e.step, e.slot) for e in hist if e.kind == "activity_completed"}) == 500


def test_race_returns_first_and_cancels_loser(cluster: Cluster) -> None:
    cluster.start_worker(concurrency=2)
    run = cluster.ns.race.start()
    assert run.result(timeout=30) == [1, "fast"]
    tasks = {t.slot: t.state for t in cluster.baton.store.task_rows(run.run_id)}
    assert tasks[1] == "done"
    assert tasks[0] == "cancelled"


def test_failure_handling(cluster: Cluster) -> None:
    cluster.start_worker()
    caught = cluster.ns.catches.start()
    failed = cluster.ns.fails.start()
    gathered = cluster.ns.gathers.start()
    assert caught.result(timeout=30) == {"caught": "ValueError", "message": "bad input", "task": "t.boom"}
    with pytest.raises(WorkflowFailed) as info:
        failed.result(timeout=30)
    assert info.value.cause["type"] == "ActivityError"
    assert "kaput" in info.value.cause["message"]
    assert "Traceback" in info.value.cause["traceback"]
    assert failed.status() == "failed"
    assert gathered.result(timeout=30) == [3, "ActivityError", 7]


def test_retry_policy_with_backoff(cluster: Cluster) -> None:
    cluster.start_worker()
    run = cluster.ns.retries.start("retry-key-" + cluster.queue, 2)
    assert run.result(timeout=60) == 3
    attempts = [t.attempt for t in cluster.baton.store.task_rows(run.run_id)]
    assert attempts == [1, 2, 3]
    kinds = [e.kind for e in run.history()]
    assert kinds.count("attempt_scheduled") == 2
    assert kinds.count("activity_failed") == 2


def test_per_attempt_timeout_retries(cluster: Cluster) -> None:
    cluster.start_worker(concurrency=2)
    run = cluster.ns.times_out.start("hang-" + cluster.queue)
    assert run.result(timeout=60) == "fresh"
    failed = [e for e in run.history() if e.kind == "activity_failed"]
    assert len(failed) == 1 and failed[0].payload["timed_out"] is True


def test_values_are_recorded(cluster: Cluster) -> None:
    cluster.start_worker()
    run = cluster.ns.values.start()
    out = run.result(timeout=30)
    recorded = [e.payload["value"] for e in run.history() if e.kind == "step_scheduled"]
    assert recorded[1] == out["u"] and recorded[2] == out["r"] and recorded[3] == out["pid"]


def test_idempotent_start(cluster: Cluster) -> None:
    cluster.start_worker()
    a = cluster.ns.sequence.start(3, workflow_id="ticket-42")
    b = cluster.ns.sequence.start(3, workflow_id="ticket-42")
    assert a.id == b.id == "ticket-42"
    assert a.result(timeout=30) == 3
    assert len(cluster.baton.list(workflow="sequence")) == 1
    with pytest.raises(WorkflowAlreadyStarted, match="ticket-42"):
        cluster.ns.fanout.start(3, workflow_id="ticket-42")


def test_concurrent_starts_of_one_id_make_one_run(cluster: Cluster) -> None:
    """Eight clients starting the same workflow id at once: one run, one history, no error."""
    cluster.start_worker()
    gate = threading.Barrier(8)

    def start(_: int) -> str:
        gate.wait(timeout=10)
        return str(cluster.ns.sequence.start(2, workflow_id="race-7").id)

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(start, range(8)))
    assert ids == ["race-7"] * 8
    run = cluster.baton.get("race-7")
    assert run.result(timeout=30) == 2
    assert [e.kind for e in run.history()].count("started") == 1
    assert len(cluster.baton.list(workflow="sequence")) == 1


def test_checkpoint_position_and_locals(cluster: Cluster) -> None:
    cluster.start_worker()
    run = cluster.ns.with_locals.start("s3cr3t", 5)
    ck = cluster_wait_step(cluster, run, 2)
    assert ck.step == 2
    assert ck.position["function"] == "with_locals"
    assert ck.position["file"].endswith("flows.py")
    assert ck.locals["first_sum"] == 3
    assert ck.locals["items"] == [0, 1, 2, 3, 4]
    assert ck.locals["label"] == "5 items"
    assert ck.locals["blob"].startswith("<object object at")
    assert ck.waiting_on[0]["name"] == "t.sleepy"
    assert cluster.baton.get(run.id).checkpoints()[0].step == 1
    run.cancel("done looking")


def cluster_wait_step(cluster: Cluster, run, step: int):  # type: ignore[no-untyped-def]
    from tests.conftest import wait_for

    return wait_for(lambda: (c := run.checkpoint()) is not None and c.step >= step and c, 30, f"step {step}")


def test_activity_error_surface() -> None:
    err = ActivityError("t.x", "ValueError", "nope", "tb")
    assert err.task_name == "t.x" and err.error_type == "ValueError" and "nope" in str(err)


def _shape(run) -> list[tuple[str, int | None, int | None, str]]:  # type: ignore[no-untyped-def]
    out = []
    for e in run.history():
        payload = {k: v for k, v in e.payload.items() if k not in ("line",)}
        out.append((e.kind, e.step, e.slot, repr(sorted(payload.items()))))
    return out


def test_cache_hit_and_cache_miss_give_identical_histories(cluster: Cluster) -> None:
    """The same workflow advanced by live cached generators and by replay on every step."""
    cached_worker = cluster.start_worker(concurrency=1, pool="solo")
    a = cluster.ns.gathers.start(workflow_id="cache-on")
    b = cluster.ns.sequence.start(6, workflow_id="seq-on")
    a.result(timeout=30), b.result(timeout=30)
    cluster.kill(cached_worker)
    cluster.start_worker(concurrency=1, pool="solo", BATON_TEST_CACHE_SIZE="0")
    c = cluster.ns.gathers.start(workflow_id="cache-off")
    d = cluster.ns.sequence.start(6, workflow_id="seq-off")
    assert c.result(timeout=30) == a.result() and d.result(timeout=30) == b.result() == 6
    assert _shape(a) == _shape(c)
    assert _shape(b) == _shape(d)
