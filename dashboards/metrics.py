"""Prometheus metrics for Baton, computed from the store at scrape time.

Everything is derived from the tables, so every dashboard or Flower process reports the
same totals and nothing is lost on restart. Flower's own ``/metrics`` covers Celery task
events; these cover workflows. Served at ``/metrics`` by ``baton dashboard`` and at
``/workflows/metrics`` inside ``baton flower``.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from sqlalchemy import Float, case, cast, func, null, select

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


IN_FLIGHT = ("scheduled", "started")  # the other states (done, failed, cancelled) set finished_at
LAG = timedelta(seconds=60)  # attempts settled longer ago than this are added up once and kept


@dataclass
class _Totals:
    """One task's attempts, added up: the counters and the latency histogram."""

    started: int = 0
    done: int = 0
    failed: int = 0
    resent: int = 0
    count: int = 0
    total: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))

    def add(self, other: _Totals) -> None:
        self.started += other.started
        self.done += other.done
        self.failed += other.failed
        self.resent += other.resent
        self.count += other.count
        self.total += other.total
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets)]


def _tally(conn: Any, url: str, where: Any) -> dict[str, _Totals]:
    """Add up the attempts ``where`` selects, per task: one scan, grouped by task, state and
    latency bucket (the bucket computed once per row, by the first bound it is under)."""
    dur = _duration(url)
    bucket = case((tasks_t.c.started_at.is_(None), null()), *[(dur <= b, i) for i, b in enumerate(LATENCY_BUCKETS)],
                  else_=len(LATENCY_BUCKETS))
    q = select(
        tasks_t.c.task, tasks_t.c.state, bucket, func.count(), func.count(tasks_t.c.started_at),
        func.sum(case((tasks_t.c.dispatches > 1, tasks_t.c.dispatches - 1), else_=0)), func.sum(dur),
    ).where(where).group_by(tasks_t.c.task, tasks_t.c.state, bucket)
    out: dict[str, _Totals] = {}
    for task, state, b, n, n_started, resent, total in conn.execute(q):
        t = out.setdefault(task, _Totals())
        t.started += int(n_started or 0)
        t.resent += int(resent or 0)
        if state == "done":
            t.done += int(n)
        elif state == "failed":
            t.failed += int(n)
        if state in ("done", "failed") and b is not None:  # settled, and had started: a latency
            t.count += int(n)
            t.total += float(total)
            t.buckets[int(b)] += int(n)
    return out


class BatonCollector:
    """A prometheus_client collector reading one Baton store.

    Attempts that settled more than :data:`LAG` ago are added up once (on the first scrape,
    a scan of all of them) and kept; each scrape then reads, through the index on
    ``finished_at``, only those settled since, plus those still in flight (through the index on
    ``state``). So a scrape costs what happened lately, not the store's whole history (the two
    full scans it replaced took 4.8 s at 1.6 million attempts). An attempt that commits its
    settlement more than a minute after it took its time would be missed by this process; no
    Baton transaction stays open that long.
    """

    def __init__(self, baton: Any) -> None:
        self.baton = baton
        self.kept: dict[str, _Totals] = {}
        self.mark: datetime | None = None  # attempts settled up to here are in ``kept``
        self.lock = threading.Lock()

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time; nothing to pre-register

    def tasks(self, conn: Any, url: str) -> dict[str, _Totals]:
        """Every attempt's totals, per task: those kept, the recently settled and those in flight."""
        finished = tasks_t.c.finished_at
        with self.lock:
            mark = utcnow() - LAG
            settled = finished.is_not(None) & (finished <= mark)
            if self.mark is not None:
                settled &= finished > self.mark
            for task, t in _tally(conn, url, settled).items():
                self.kept.setdefault(task, _Totals()).add(t)
            self.mark = mark
            out: defaultdict[str, _Totals] = defaultdict(_Totals)
            for task, t in self.kept.items():
                out[task].add(t)
        for part in (_tally(conn, url, finished.is_not(None) & (finished > mark)),  # settled lately
                     _tally(conn, url, tasks_t.c.state.in_(IN_FLIGHT))):
            for task, t in part.items():
                out[task].add(t)
        return dict(out)

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
        alive_since = utcnow() - timedelta(seconds=float(getattr(self.baton, "dead_after", 10.0)))
        with store.read() as conn:
            totals = self.tasks(conn, store.url)
            alive = conn.execute(select(func.count()).select_from(workers_t)
                                 .where(workers_t.c.last_beat >= alive_since)).scalar() or 0
            pending = conn.execute(select(func.count()).select_from(timers_t)
                                   .where(timers_t.c.fired.is_(False))).scalar() or 0
        resent = 0
        for task in sorted(totals):
            t = totals[task]
            started.add_metric([task], t.started)
            completed.add_metric([task], t.done)
            failed.add_metric([task], t.failed)
            resent += t.resent
            if t.count:
                cumulative = list(accumulate(t.buckets))
                buckets = [(_le(b), c) for b, c in zip(LATENCY_BUCKETS, cumulative)]
                buckets.append(("+Inf", t.count))
                latency.add_metric([task], buckets, t.total)
        recovered.add_metric([], resent)
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
