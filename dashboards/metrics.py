"""Prometheus metrics for Baton, computed from the store at scrape time.

Everything is derived from the tables, so every dashboard or Flower process reports the
same totals and nothing is lost on restart. Flower's own ``/metrics`` covers Celery task
events; these cover workflows. Served at ``/metrics`` by ``baton dashboard`` and at
``/workflows/metrics`` inside ``baton flower``.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from sqlalchemy import Float, case, cast, func, select

from persistence import dialect
from persistence.models import utcnow
from persistence.store import tasks_t, timers_t, workers_t
from sdk.events import RunStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


def _duration(url: str) -> Any:
    """Seconds from an attempt's start to its finish, in SQL, per dialect."""
    started, finished = tasks_t.c.started_at, tasks_t.c.finished_at
    if dialect.is_sqlite(url):
        return (func.julianday(finished) - func.julianday(started)) * 86400.0
    return cast(func.extract("epoch", finished - started), Float)


class BatonCollector:
    """A prometheus_client collector reading one Baton store."""

    def __init__(self, baton: Any) -> None:
        self.baton = baton

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        store = self.baton.store
        counts = store.count_runs()
        runs = GaugeMetricFamily("baton_runs", "Workflow runs by status.", labels=["status"])
        for status in RunStatus:
            runs.add_metric([status.value], counts.get(status.value, 0))
        yield runs

        started = CounterMetricFamily("baton_steps_started", "Activity attempts (workflow steps) started on a "
                                      "worker.", labels=["task"])
        completed = CounterMetricFamily("baton_steps_completed", "Activity attempts that returned a result.",
                                        labels=["task"])
        failed = CounterMetricFamily("baton_steps_failed", "Activity attempts that raised (or timed out).",
                                     labels=["task"])
        recovered = CounterMetricFamily("baton_sweeper_recoveries", "Activity messages the sweeper re-sent "
                                        "after a lost worker or a lost message.")
        latency = HistogramMetricFamily("baton_step_latency_seconds", "Run time of finished activity attempts, "
                                        "from start on a worker to recorded result.", labels=["task"])
        dur = _duration(store.url)
        finished = tasks_t.c.finished_at.is_not(None) & tasks_t.c.started_at.is_not(None)
        q_counts = select(
            tasks_t.c.task,
            func.sum(case((tasks_t.c.started_at.is_not(None), 1), else_=0)),
            func.sum(case((tasks_t.c.state == "done", 1), else_=0)),
            func.sum(case((tasks_t.c.state == "failed", 1), else_=0)),
            func.sum(case((tasks_t.c.dispatches > 1, tasks_t.c.dispatches - 1), else_=0)),
        ).group_by(tasks_t.c.task)
        q_hist = select(
            tasks_t.c.task, func.count(), func.sum(dur),
            *[func.sum(case((dur <= b, 1), else_=0)) for b in LATENCY_BUCKETS],
        ).where(finished).group_by(tasks_t.c.task)
        alive_since = utcnow() - timedelta(seconds=float(getattr(self.baton, "dead_after", 10.0)))
        with store.read() as conn:
            rows = conn.execute(q_counts).all()
            hist = conn.execute(q_hist).all()
            alive = conn.execute(select(func.count()).select_from(workers_t)
                                 .where(workers_t.c.last_beat >= alive_since)).scalar() or 0
            pending = conn.execute(select(func.count()).select_from(timers_t)
                                   .where(timers_t.c.fired.is_(False))).scalar() or 0
        resent = 0
        for task, n_started, n_done, n_failed, n_resent in rows:
            started.add_metric([task], int(n_started or 0))
            completed.add_metric([task], int(n_done or 0))
            failed.add_metric([task], int(n_failed or 0))
            resent += int(n_resent or 0)
        recovered.add_metric([], resent)
        for task, count, total, *cumulative in hist:
            buckets = [(_le(b), int(c or 0)) for b, c in zip(LATENCY_BUCKETS, cumulative)]
            buckets.append(("+Inf", int(count or 0)))
            latency.add_metric([task], buckets, float(total or 0.0))
        yield started
        yield completed
        yield failed
        yield latency
        yield recovered
        workers = GaugeMetricFamily("baton_workers_alive", "Workers whose heartbeat is fresh.")
        workers.add_metric([], int(alive))
        yield workers
        timers = GaugeMetricFamily("baton_timers_pending", "Durable timers not yet fired.")
        timers.add_metric([], int(pending))
        yield timers


def _le(bound: float) -> str:
    return repr(float(bound))


def registry(baton: Any) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(BatonCollector(baton))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``reg``."""
    return generate_latest(reg)
