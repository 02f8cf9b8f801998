"""The benchmarks' environment: a fresh PostgreSQL schema (or SQLite file) and Redis dbs, one
``celery worker`` per side, and the client helpers that start runs, chains and chords and wait for
them. Used by ``bench/run.py`` (the scenarios) and ``bench/profile.py``."""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import Worker, cpu_seconds

REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379")
PG = os.environ.get("BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def wait_quiet(limit: float, timeout: float) -> None:
    """Wait until the 1-minute load average drops below ``limit`` (other work on a shared machine)."""
    deadline = time.monotonic() + timeout
    while float(loadavg().split()[0]) >= limit and time.monotonic() < deadline:
        log(f"waiting for a quieter machine: load {loadavg()} (want < {limit})")
        time.sleep(15)


# ---------------------------------------------------------------- the bench environment


@dataclass
class Env:
    store: str
    pool: str
    concurrency: int
    redis_dbs: tuple[int, int, int]
    tmp: Path
    keep: bool = False
    db_url: str = ""
    client_db_url: str = ""
    schema: str = ""
    queue: str = field(default_factory=lambda: f"bench{uuid.uuid4().hex[:6]}")
    baton_ns: Any = None
    bare_ns: Any = None
    baton_w: Worker | None = None
    bare_w: Worker | None = None
    cache_size: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    profile_replay: bool = False

    @property
    def baton_broker(self) -> str:
        return f"{REDIS}/{self.redis_dbs[0]}"

    @property
    def bare_broker(self) -> str:
        return f"{REDIS}/{self.redis_dbs[1]}"

    @property
    def bare_backend(self) -> str:
        return f"{REDIS}/{self.redis_dbs[2]}"

    # ------------------------------------------------------------ setup / teardown
    def open(self) -> Env:
        import redis

        for db in self.redis_dbs:
            redis.Redis.from_url(f"{REDIS}/{db}").flushdb()
        if self.store == "pg":
            import sqlalchemy as sa

            self.schema = f"bench_{uuid.uuid4().hex[:10]}"
            admin = sa.create_engine(PG, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(sa.text(f'CREATE SCHEMA "{self.schema}"'))
            admin.dispose()
            # Workers tag their connections (application_name) so that their PostgreSQL backends' CPU
            # can be counted; the client uses another name.
            self.db_url = f"{PG}?options=-csearch_path%3D{self.schema}&application_name={self.schema}_w"
            self.client_db_url = f"{PG}?options=-csearch_path%3D{self.schema}&application_name={self.schema}_c"
            with sa.create_engine(PG).begin() as c:  # the floor's table (bench.noop_pg writes one row per task)
                c.execute(sa.text(f'CREATE TABLE "{self.schema}".bench_floor (id bigserial PRIMARY KEY, x text, '
                                  'at timestamptz)'))
        else:
            self.db_url = f"sqlite:///{self.tmp / 'baton.sqlite3'}"
            self.client_db_url = self.db_url
        from bench.app import build_bare, build_baton

        self.baton_ns = build_baton(self.baton_broker, self.client_db_url, self.queue)
        self.bare_ns = build_bare(self.bare_broker, self.bare_backend, self.queue)
        return self

    def close(self) -> None:
        # The bare side's result backend keeps every AsyncResult it was handed until its task is
        # ready; one not collected by then unsubscribes during interpreter shutdown (a traceback).
        backend = self.bare_ns.app.backend if getattr(self, "bare_ns", None) is not None else None
        for waiters in list(getattr(backend, "_pending_results", ({},))[0].values()):
            for result in list(waiters.values()):
                backend.remove_pending_result(result)
        for w in (self.baton_w, self.bare_w):
            if w is not None:
                w.stop()
        from persistence.store import Store

        for st in list(Store._cache.values()):
            st.engine.dispose()
        Store.forget_all()
        if self.store == "pg" and self.schema and not self.keep:
            import sqlalchemy as sa

            admin = sa.create_engine(PG, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(sa.text(f'DROP SCHEMA "{self.schema}" CASCADE'))
            admin.dispose()

    @property
    def floor(self) -> bool:
        """Whether the floor side runs: bare Celery plus one INSERT and COMMIT per task (PostgreSQL)."""
        return self.store == "pg"

    def pg_backends(self, tag: str = "w") -> list[int]:
        """PIDs of the PostgreSQL backends serving the Baton worker's connections (``w``) or the
        bare worker's floor task (``f``)."""
        if self.store != "pg":
            return []
        from sqlalchemy import text

        with store_of(self).read() as c:
            return [int(r[0]) for r in c.execute(text("SELECT pid FROM pg_stat_activity WHERE application_name = "
                                                      ":n"), {"n": f"{self.schema}_{tag}"})]

    def cpu(self) -> dict[str, Any]:
        """CPU seconds so far: Baton worker, its PostgreSQL backends (by pid), bare worker."""
        return {"baton": self.baton_w.cpu() if self.baton_w else 0.0,
                "baton_main": self.baton_w.cpu_main() if self.baton_w else 0.0,
                "pg": {pid: cpu_seconds([pid]) for pid in self.pg_backends()},
                "floor_pg": {pid: cpu_seconds([pid]) for pid in self.pg_backends("f")},
                "bare": self.bare_w.cpu() if self.bare_w else 0.0,
                "bare_main": self.bare_w.cpu_main() if self.bare_w else 0.0}

    def baton_env(self) -> dict[str, str]:
        env = {"BENCH_SIDE": "baton", "BENCH_BROKER": self.baton_broker, "BENCH_DB": self.db_url,
               "BENCH_QUEUE": self.queue}
        if self.cache_size is not None:
            env["BENCH_CACHE_SIZE"] = str(self.cache_size)
        env.update(self.extra_env)
        return env

    def bare_env(self) -> dict[str, str]:
        env = {"BENCH_SIDE": "bare", "BENCH_BROKER": self.bare_broker, "BENCH_BACKEND": self.bare_backend,
               "BENCH_QUEUE": self.queue}
        if self.floor:
            env["BENCH_FLOOR_DB"] = (PG.replace("+psycopg", "") + f"?options=-csearch_path%3D{self.schema}"
                                     f"&application_name={self.schema}_f")
        return env

    def start_baton(self) -> Worker:
        self.baton_w = self._start("baton", self.baton_w, self.baton_env(), warm_baton)
        return self.baton_w

    def start_bare(self) -> Worker:
        self.bare_w = self._start("bare", self.bare_w, self.bare_env(), warm_bare)
        return self.bare_w

    def _start(self, side: str, old: Worker | None, env: dict[str, str], warm: Callable[[Env], Any]) -> Worker:
        """(Re)start one side's worker and warm it up."""
        if old is not None:
            old.stop()
        worker = Worker(side, env, self.queue, self.tmp, self.pool, self.concurrency).start()
        warm(self)
        return worker


# ---------------------------------------------------------------- Baton client helpers


def store_of(env: Env) -> Any:
    return env.baton_ns.baton.store


def run_rows(env: Env, ids: list[str]) -> list[Any]:
    """The runs' hot columns, read 1,000 ids per statement."""
    from sqlalchemy import select

    from persistence.store import runs

    cols = (runs.c.run_id, runs.c.status, runs.c.step, runs.c.created_at, runs.c.finished_at)
    rows: list[Any] = []
    with store_of(env).read() as c:
        for i in range(0, len(ids), 1000):
            rows += c.execute(select(*cols).where(runs.c.run_id.in_(ids[i:i + 1000])))
    return rows


def wait_runs(env: Env, ids: list[str], timeout: float, pred: Callable[[Any], bool] | None = None,
              what: str = "runs to complete", interval: float = 0.05) -> None:
    check = pred or (lambda r: r.status == "completed")

    def done() -> bool:
        if env.baton_w is not None:
            env.baton_w.check()
        rows = run_rows(env, ids)  # one read per poll: the client's CPU competes with the workers
        failed = [r for r in rows if r.status in ("failed", "blocked", "cancelled")]
        if failed:
            raise RuntimeError(f"run {failed[0].run_id} ended {failed[0].status}")
        return sum(1 for r in rows if check(r)) == len(ids)

    wait_for(done, timeout, f"{len(ids)} {what}", interval)


def finished_at(env: Env, ids: list[str]) -> float:
    from persistence.store import aware

    return max(aware(r.finished_at).timestamp() for r in run_rows(env, ids))  # SQLite's are naive UTC


def step_times(env: Env, run_id: str) -> dict[int, float]:
    """When each step was decided (the ``at`` of its ``step_scheduled`` event), by step number."""
    from sqlalchemy import select

    from persistence.store import aware, events_t

    with store_of(env).read() as c:
        rows = c.execute(select(events_t.c.step, events_t.c.at).where(
            events_t.c.run_id == run_id, events_t.c.kind == "step_scheduled").order_by(events_t.c.step))
        return {int(r.step): aware(r.at).timestamp() for r in rows}


def baton_one(env: Env, wf: Any, *args: Any, timeout: float = 300) -> float:
    """Start one run, wait for it; seconds from the start call to its commit of completion."""
    t0 = time.time()
    h = wf.start(*args)
    wait_runs(env, [h.id], timeout, interval=0.05)  # the time is read from the run's row, not the poll
    return finished_at(env, [h.id]) - t0


def warm_baton(env: Env) -> None:
    ns = env.baton_ns
    deadline = 90
    ids = [ns.seq.start(10).id, ns.fan.start(10).id, ns.seq.start(10).id]
    wait_runs(env, ids, deadline, what="warm-up runs")


# ---------------------------------------------------------------- bare Celery client helpers


def bare_redis(env: Env) -> Any:
    import redis

    if not hasattr(env, "_r"):
        env._r = redis.Redis.from_url(env.bare_broker, socket_timeout=60)  # type: ignore[attr-defined]
    return env._r  # type: ignore[attr-defined]


def bare_wait(env: Env, key: str, n: int, timeout: float) -> list[float]:
    r = bare_redis(env)
    out: list[float] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"bare side: {len(out)}/{n} notifications on {key}")
        item = r.blpop([key], timeout=min(5, max(1, int(left))))
        if env.bare_w is not None:
            env.bare_w.check()
        if item is not None:
            out.append(float(item[1]))
    return out


def bare_chain(env: Env, n: int, notify: str, stamp: str | None = None, floor: bool = False) -> Any:
    """A chain of ``n`` no-op tasks; with ``floor``, each also INSERTs and COMMITs one row."""
    from celery import chain

    noop = env.bare_ns.noop_pg if floor else env.bare_ns.noop
    sigs = [noop.si(i, stamp=stamp).set(ignore_result=True) for i in range(n - 1)]
    sigs.append(noop.si(n - 1, stamp=stamp, notify=notify).set(ignore_result=True))
    return chain(*sigs)


def bare_chord(env: Env, n: int, notify: str, floor: bool = False) -> Any:
    from celery import chord

    noop = env.bare_ns.noop
    header = env.bare_ns.noop_pg if floor else noop
    return chord([header.si(i) for i in range(n)], noop.si(None, notify=notify).set(ignore_result=True))


def warm_bare(env: Env) -> None:
    key = f"warm:{uuid.uuid4().hex}"
    bare_chain(env, 10, key).apply_async()
    bare_chord(env, 10, key).apply_async()
    bare_chain(env, 10, key).apply_async()
    n = 3
    if env.floor:
        bare_chain(env, 10, key, floor=True).apply_async()
        n += 1
    bare_wait(env, key, n, 90)


def med(xs: list[float]) -> float:
    return statistics.median(xs)
