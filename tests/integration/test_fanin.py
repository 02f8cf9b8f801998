"""The deferred fan-in on real workers, SQLite and PostgreSQL: a fan-out's results wait in their
attempt rows (no generator run, no history write) until the last open slot, whose completion
moves them all into the history, in the order they finished, and decides."""

from __future__ import annotations

import pytest

from tests.conftest import Cluster, wait_for

pytestmark = pytest.mark.timeout(120)


def _step_rows(cluster: Cluster, run_id: str, step: int = 1) -> list:  # type: ignore[type-arg]
    return [t for t in cluster.baton.store.task_rows(run_id) if t.step == step]


def _completed(run: object) -> list:  # type: ignore[type-arg]
    return [e for e in run.history() if e.kind == "activity_completed" and e.step == 1]  # type: ignore[attr-defined]


def test_results_wait_in_their_rows_until_the_last_slot(cluster: Cluster) -> None:
    cluster.start_worker(concurrency=2)
    key = f"gate-{cluster.queue}"
    run = cluster.ns.gated_fanout.start(5, key)
    store = cluster.baton.store

    wait_for(lambda: sum(t.state == "done" for t in _step_rows(cluster, run.run_id)) == 5, 30,
             "the five squares to finish")
    rows = {t.slot: t for t in _step_rows(cluster, run.run_id)}
    assert all(rows[i].result is not None for i in range(5)), "a finished slot's result is not kept in its row"
    assert rows[5].result is None and rows[5].state not in ("done", "failed", "cancelled")
    assert _completed(run) == [], "results reached the history before the fan-out completed"
    row = store.get_run(run.run_id)
    assert (row.fan_step, row.fan_open, row.step) == (1, 1, 1)

    cluster.ns.counter.set(f"gate:{key}", 1)
    assert run.result(timeout=30) == [[0, 1, 4, 9, 16, -1], 30 - 1 + 1000]
    done = _completed(run)
    assert sorted(e.slot for e in done) == list(range(6))
    assert done[-1].slot == 5, "the gated slot finished last, so its event comes last"
    assert [e.seq for e in done] == list(range(done[0].seq, done[0].seq + 6)), "harvested events are not contiguous"
    assert all(t.result is None for t in cluster.baton.store.task_rows(run.run_id)), "a kept result was not taken"
    row = store.get_run(run.run_id)
    assert row.fan_step is None and row.fan_open is None


def test_a_retried_slot_and_a_failure_keep_the_count_right(cluster: Cluster) -> None:
    cluster.start_worker(concurrency=2)
    key, retry_key = f"gate-{cluster.queue}", f"flaky-{cluster.queue}"
    run = cluster.ns.gated_fanout.start(3, key, retry_key)

    def retried_and_done() -> bool:
        rows = [t for t in _step_rows(cluster, run.run_id) if t.slot == 4]
        return any(t.attempt == 2 and t.state == "done" for t in rows)

    wait_for(retried_and_done, 30, "the flaky slot to succeed on its second attempt")
    wait_for(lambda: sum(t.state == "done" for t in _step_rows(cluster, run.run_id)) == 4, 30,
             "the squares and the retried slot to finish")
    row = cluster.baton.store.get_run(run.run_id)
    assert (row.fan_step, row.fan_open) == (1, 1), "only the gated slot should be open"
    cluster.ns.counter.set(f"gate:{key}", 1)
    assert run.result(timeout=30) == [[0, 1, 4, -1, 2], 6 + 1000]
    hist = run.history()
    failed = [e for e in hist if e.kind == "activity_failed"]
    assert [(e.slot, e.payload["attempt"]) for e in failed] == [(4, 1)]
    done = {(e.slot, e.payload["attempt"]) for e in hist if e.kind == "activity_completed" and e.step == 1}
    assert done == {(0, 1), (1, 1), (2, 1), (3, 1), (4, 2)}
    keys = [e.key for e in hist if e.key]
    assert len(keys) == len(set(keys))


def test_cancel_during_a_fan_out_takes_the_kept_results_and_ends_cleanly(cluster: Cluster) -> None:
    cluster.start_worker(concurrency=2)
    key = f"gate-{cluster.queue}"
    run = cluster.ns.gated_fanout.start(4, key)
    wait_for(lambda: sum(t.state == "done" for t in _step_rows(cluster, run.run_id)) == 4, 30,
             "the squares to finish")
    run.cancel("test")
    wait_for(lambda: run.status() == "cancelled", 30, "the run to be cancelled")
    cluster.ns.counter.set(f"gate:{key}", 1)  # let the gated task end; its late result is ignored
    rows = cluster.baton.store.task_rows(run.run_id)
    assert all(t.result is None for t in rows), "kept results were left behind"
    gated = next(t for t in rows if t.slot == 4)
    assert gated.state in ("cancelled", "done")
    hist = run.history()
    keys = [e.key for e in hist if e.key]
    assert len(keys) == len(set(keys))
    assert hist[-1].kind == "cancelled"
