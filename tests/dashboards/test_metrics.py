"""/metrics in Prometheus text format, with exact values from known rows (the SQL is checked on
PostgreSQL too by test_api)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert

from dashboards import metrics
from persistence.models import utcnow
from persistence.store import tasks_t, timers_t
from tests.dashboards.support import Session, dashboard

pytestmark = pytest.mark.timeout(60)


def _task(run_id: str, step: int, attempt: int, task: str, state: str, took: float | None,
          dispatches: int = 1) -> dict[str, Any]:
    start = utcnow() - timedelta(seconds=60)
    return {"id": f"{run_id}:{step}:0:{attempt}", "run_id": run_id, "step": step, "slot": 0, "attempt": attempt,
            "task": task, "args": "[]", "kwargs": "{}", "options": "{}", "state": state, "dispatches": dispatches,
            "created_at": start, "published_at": start, "started_at": start if took is not None else None,
            "finished_at": start + timedelta(seconds=took) if took is not None and state != "started" else None}


def test_metrics_exposition_from_known_rows(offline_baton: Any) -> None:
    run = offline_baton.ns_idle.start("m", workflow_id="metrics-run")
    rows = [
        _task(run.run_id, 1, 1, "t.fast", "done", 0.02),
        _task(run.run_id, 2, 1, "t.fast", "done", 0.3, dispatches=3),  # re-sent twice by the sweeper
        _task(run.run_id, 3, 1, "t.slow", "failed", 12.0),
        _task(run.run_id, 3, 2, "t.slow", "started", 1.0, dispatches=2),
        _task(run.run_id, 4, 1, "t.slow", "scheduled", None),
    ]
    with offline_baton.store.tx() as conn:
        conn.execute(insert(tasks_t), rows)
        conn.execute(insert(timers_t).values(run_id=run.run_id, step=5, slot=0, attempt=0, kind="sleep",
                                             fire_at=utcnow() + timedelta(hours=1), fired=False))
    with dashboard(offline_baton) as srv:
        resp = Session(srv.url).get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE baton_step_latency_seconds histogram" in resp.text
    fams = {f.name: f for f in text_string_to_metric_families(resp.text)}

    def value(family: str, sample: str, **labels: str) -> float:
        return next(s.value for s in fams[family].samples if s.name == sample and s.labels == labels)

    assert value("baton_runs", "baton_runs", status="running") == 1
    assert value("baton_runs", "baton_runs", status="completed") == 0
    assert value("baton_steps_started", "baton_steps_started_total", task="t.fast") == 2
    assert value("baton_steps_started", "baton_steps_started_total", task="t.slow") == 2
    assert value("baton_steps_completed", "baton_steps_completed_total", task="t.fast") == 2
    assert value("baton_steps_failed", "baton_steps_failed_total", task="t.slow") == 1
    assert value("baton_sweeper_recoveries", "baton_sweeper_recoveries_total") == 3
    assert value("baton_timers_pending", "baton_timers_pending") == 1
    hist = "baton_step_latency_seconds"
    assert value(hist, hist + "_count", task="t.fast") == 2
    assert value(hist, hist + "_sum", task="t.fast") == pytest.approx(0.32, abs=0.01)
    assert value(hist, hist + "_bucket", task="t.fast", le="0.025") == 1
    assert value(hist, hist + "_bucket", task="t.fast", le="0.25") == 1
    assert value(hist, hist + "_bucket", task="t.fast", le="0.5") == 2
    assert value(hist, hist + "_bucket", task="t.slow", le="10.0") == 0
    assert value(hist, hist + "_bucket", task="t.slow", le="30.0") == 1  # the unfinished attempt is not counted
    assert value(hist, hist + "_bucket", task="t.slow", le="+Inf") == 1


def test_metric_names_are_stable(offline_baton: Any) -> None:
    text = metrics.render(metrics.registry(offline_baton)).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"baton_runs", "baton_steps_started", "baton_steps_completed", "baton_steps_failed",
            "baton_step_latency_seconds", "baton_sweeper_recoveries", "baton_workers_alive",
            "baton_timers_pending"} <= names


def _totals(collector: metrics.BatonCollector, baton: Any) -> dict[str, tuple[int, int, int, int, int]]:
    with baton.store.read() as conn:
        got = collector.tasks(conn, baton.store.url)
    return {task: (t.started, t.done, t.failed, t.count, sum(t.buckets)) for task, t in got.items()}


def test_a_scrape_reads_only_what_settled_since_the_last_and_what_is_in_flight(db_url: str) -> None:
    """Attempts settled over a minute ago are added up once and kept: deleting them afterwards
    changes nothing (so the next scrape did not read them again), while an attempt settling in the
    meantime is counted at the next scrape. On both databases: the bucket is SQL per dialect."""
    from celery import Celery
    from sqlalchemy import delete, update

    from sdk import Baton

    baton = Baton(Celery("metrics_incr", broker="memory://", set_as_current=False), database_url=db_url)
    old = utcnow() - timedelta(hours=2)

    def settled_at(row: dict[str, Any], when: Any) -> dict[str, Any]:
        took = row["finished_at"] - row["started_at"]
        return {**row, "started_at": when - took, "finished_at": when}

    rows = [settled_at(_task("r", 1, 1, "t.a", "done", 0.02), old),
            settled_at(_task("r", 2, 1, "t.a", "done", 40.0), old),
            settled_at(_task("r", 3, 1, "t.a", "failed", 0.2), old),
            _task("r", 4, 1, "t.a", "done", 0.3),  # settled 59.7 s ago: not yet kept
            _task("r", 5, 1, "t.a", "started", 1.0),  # in flight
            {**_task("r", 6, 1, "t.a", "cancelled", None), "finished_at": old}]  # never started
    with baton.store.tx() as conn:
        conn.execute(insert(tasks_t), rows)
    collector = metrics.BatonCollector(baton)
    first = _totals(collector, baton)
    assert first == {"t.a": (5, 3, 1, 4, 4)}
    assert (collector.kept["t.a"].done, collector.kept["t.a"].failed) == (2, 1)
    bounds = metrics.LATENCY_BUCKETS
    assert collector.kept["t.a"].buckets == [int(i in (bounds.index(0.025), bounds.index(0.25), bounds.index(60.0)))
                                             for i in range(len(bounds) + 1)]
    with baton.store.tx() as conn:
        conn.execute(delete(tasks_t).where(tasks_t.c.step <= 3))  # what was kept is not read again
        conn.execute(update(tasks_t).where(tasks_t.c.step == 5).values(state="done", finished_at=utcnow()))
    assert _totals(collector, baton) == {"t.a": (5, 4, 1, 5, 5)}
    assert _totals(metrics.BatonCollector(baton), baton) == {"t.a": (2, 2, 0, 2, 2)}  # a new process: the rows
    baton.store.engine.dispose()
