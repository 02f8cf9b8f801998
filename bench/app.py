"""The Celery apps the benchmarks run: Baton's and the bare-Celery equivalent.

``celery -A bench.app worker`` builds one side from environment variables:

- ``BENCH_SIDE``: ``baton`` (default) or ``bare``;
- ``BENCH_BROKER``: the Redis broker URL;
- ``BENCH_DB``: Baton's database URL (Baton side);
- ``BENCH_BACKEND``: the result backend URL (bare side; chords need one);
- ``BENCH_FLOOR_DB``: a psycopg conninfo for ``bench.noop_pg`` (bare side), the no-op plus one
  INSERT and COMMIT: bare Celery with the least any design that records each step durably pays;
- ``BENCH_QUEUE``: the queue both the client and the worker use;
- ``BENCH_CACHE_SIZE``: Baton's live-generator cache size per process (default: Baton's own);
- ``BENCH_EAGER_STEPS``: ``Baton(eager_steps=...)`` (default 0: every activity is a message);
- ``BENCH_TASK_EVENTS=1``: both sides' workers send task events (``worker_send_task_events``, as ``-E``);
- ``BENCH_BARE_DEFAULTS=1``: the bare side keeps Celery's defaults instead of Baton's delivery settings;
- ``BENCH_SQL_STATS=<prefix>``: count and time every SQL statement SQLAlchemy runs (``bench/profile.py
  --sql``; the hot path's driver SQL, ``persistence/hot.py``, bypasses it);
- ``BENCH_CPROFILE=<prefix>``: cProfile each pool process, written to ``<prefix>.<pid>.prof`` every 100 tasks
  (``python -m pstats``); with ``BENCH_CPROFILE_CPU=1`` timed by process CPU instead of wall time.

The client process (``bench/run.py``) calls :func:`build_baton` and :func:`build_bare` itself with
the same URLs, so both sides share task names: ``bench.noop`` on each.

On the bare side ``bench.noop`` can also stamp its run time into a Redis list (``stamp``) and push
to a list the client waits on (``notify``), which is how the client learns that a chain or a chord
callback has finished without polling a result backend.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from celery import Celery


class NS:
    """A bag of built objects, by name."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _base_app(name: str, broker: str, queue: str) -> Celery:
    app = Celery(name, broker=broker, set_as_current=False)
    app.conf.task_default_queue = queue
    app.conf.broker_transport_options = {"visibility_timeout": 3600}
    app.conf.worker_hijack_root_logger = False
    app.conf.worker_redirect_stdouts = False
    if os.environ.get("BENCH_TASK_EVENTS"):  # both sides' workers send task events, as under Flower (-E)
        app.conf.worker_send_task_events = True
    return app


def build_baton(broker: str, database_url: str, queue: str = "bench", cache_size: int | None = None) -> NS:
    """A Celery app with Baton bound to ``database_url``, the no-op task and the bench workflows."""
    from sdk import Baton, wait_signal

    app = _base_app("bench_baton", broker, queue)
    kw: dict[str, Any] = {}
    if cache_size is not None:
        kw["cache_size"] = cache_size
    if os.environ.get("BENCH_EAGER_STEPS"):
        kw["eager_steps"] = int(os.environ["BENCH_EAGER_STEPS"])
    baton = Baton(app, database_url=database_url, **kw)

    @app.task(name="bench.noop")
    def noop(x: Any = None) -> Any:
        return x

    @baton.workflow(name="bench_seq")
    def seq(n: int):  # type: ignore[no-untyped-def]
        """``n`` steps, one no-op task each."""
        for i in range(n):
            yield noop.s(i)
        return n

    @baton.workflow(name="bench_fan")
    def fan(n: int):  # type: ignore[no-untyped-def]
        """One yield of ``n`` no-op tasks (fan-out / fan-in)."""
        results = yield [noop.s(i) for i in range(n)]
        return len(results)

    @baton.workflow(name="bench_long")
    def long(n: int):  # type: ignore[no-untyped-def]
        """``n`` steps, then two signal hops (warm, then cold after a worker restart), each followed by a task."""
        for i in range(n):
            yield noop.s(i)
        yield wait_signal("warm")
        yield noop.s("after-warm")
        yield wait_signal("cold")
        yield noop.s("after-cold")
        return n

    @baton.workflow(name="bench_parked")
    def parked(i: int):  # type: ignore[no-untyped-def]
        """One task, then parked on a signal: a live generator each worker process may cache."""
        yield noop.s(i)
        yield wait_signal("go")
        return i

    @app.task(name="bench.reply")
    def reply(messages: list[Any], size: int) -> dict[str, str]:
        """A stand-in model call: reads the conversation, answers ``size`` characters."""
        return {"role": "assistant", "content": f"{len(messages)}:" + "r" * size}

    @baton.workflow(name="bench_agent")
    def agent(n: int, size: int = 2000, send_all: bool = True):  # type: ignore[no-untyped-def]
        """An agent loop: the conversation grows by one reply per step and lives in a local; each
        step's call gets the whole conversation (``send_all``) or only its last message."""
        messages = [{"role": "user", "content": "u" * size}]
        for _ in range(n):
            answer = yield reply.s(messages if send_all else messages[-1:], size)
            messages.append(answer)
        return len(messages)

    return NS(app=app, baton=baton, noop=noop, seq=seq, fan=fan, long=long, parked=parked, agent=agent)


def per_process(make: Callable[[], Any]) -> Callable[[], Any]:
    """``make()``'s result, made once per process (a pool child must not share its parent's
    connection)."""
    held: dict[str, Any] = {}

    def get() -> Any:
        if held.get("pid") != os.getpid():
            held["obj"], held["pid"] = make(), os.getpid()
        return held["obj"]

    return get


def build_bare(broker: str, backend: str, queue: str = "bench") -> NS:
    """A plain Celery app with a result backend and the same no-op task."""
    import redis

    app = _base_app("bench_bare", broker, queue)
    app.conf.result_backend = backend
    app.conf.result_expires = 600
    # The reliability settings Baton applies to its own app, so that both sides run under the
    # same acknowledgement and prefetch rules (see tasks/wiring.py RELIABLE_DEFAULTS).
    from tasks.wiring import RELIABLE_DEFAULTS

    if os.environ.get("BENCH_BARE_DEFAULTS") != "1":
        for key, value in RELIABLE_DEFAULTS.items():
            app.conf[key] = value
    # Baton turns on task-sent events for Flower; that is a cost of Baton's, not of Celery's.
    app.conf.task_send_sent_event = False
    r = per_process(lambda: redis.Redis.from_url(broker))

    @app.task(name="bench.noop")
    def noop(x: Any = None, stamp: str | None = None, notify: str | None = None) -> Any:
        if stamp:
            r().rpush(stamp, f"{x}:{time.time():.6f}")
        if notify:
            r().rpush(notify, f"{time.time():.6f}")
        return x

    def connect_floor() -> Any:
        import psycopg

        return psycopg.connect(os.environ["BENCH_FLOOR_DB"], autocommit=True)

    pg = per_process(connect_floor)

    @app.task(name="bench.noop_pg")
    def noop_pg(x: Any = None, stamp: str | None = None, notify: str | None = None) -> Any:
        """The no-op plus the least a durable step needs: one row INSERTed and COMMITted (raw
        driver, autocommit, synchronous commit) before the task ends."""
        pg().execute("INSERT INTO bench_floor (x, at) VALUES (%s, now())", (str(x),))
        return noop(x, stamp, notify)

    return NS(app=app, noop=noop, noop_pg=noop_pg, redis=r)


def install_sql_stats(path_prefix: str) -> None:
    """Count and time every SQL statement this process runs (all engines); each process writes
    ``<path_prefix>.<pid>.json`` every 200 statements: {statement head: [count, seconds]}, plus
    the number of transactions (``BEGIN``s) and pool checkouts."""
    import json
    import re

    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool

    stats: dict[str, list[float]] = {}
    state = {"n": 0}

    def head(sql: str) -> str:
        text = re.sub(r"\s+", " ", sql).strip()
        text = re.sub(r"\(%\(.*", "(...)", text)
        return text[:110]

    def bump(key: str, seconds: float = 0.0) -> None:
        entry = stats.setdefault(key, [0, 0.0])
        entry[0] += 1
        entry[1] += seconds
        state["n"] += 1
        if state["n"] % 200 == 0:
            with open(f"{path_prefix}.{os.getpid()}.json", "w") as f:
                json.dump(stats, f)

    @event.listens_for(Engine, "before_cursor_execute")
    def _before(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        conn.info.setdefault("bench_t", []).append(time.perf_counter())

    @event.listens_for(Engine, "after_cursor_execute")
    def _after(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        t0 = conn.info["bench_t"].pop()
        bump(head(statement), time.perf_counter() - t0)

    @event.listens_for(Engine, "begin")
    def _begin(conn: Any) -> None:
        bump("(transaction BEGIN)")

    @event.listens_for(Engine, "commit")
    def _commit(conn: Any) -> None:
        conn.info["bench_c"] = time.perf_counter()
        bump("(COMMIT issued)")

    @event.listens_for(Pool, "checkout")
    def _checkout(dbapi_conn: Any, rec: Any, proxy: Any) -> None:
        bump("(pool checkout)")


def install_cprofile(path_prefix: str) -> None:
    """Profile every pool process from its start; dump the stats every 100 tasks."""
    import cProfile

    from celery import signals

    state: dict[str, Any] = {"n": 0}
    # BENCH_CPROFILE_CPU=1: time by process CPU, not wall (waits on PostgreSQL and Redis then cost nothing)
    timer = time.process_time if os.environ.get("BENCH_CPROFILE_CPU") else time.perf_counter

    def start(**_: Any) -> None:
        state["prof"] = cProfile.Profile(timer)
        state["prof"].enable()

    def done(**_: Any) -> None:
        state["n"] += 1
        if "prof" in state and state["n"] % 100 == 0:
            state["prof"].dump_stats(f"{path_prefix}.{os.getpid()}.prof")
            state["prof"].enable()  # dump_stats disables the profiler

    def main_ready(**_: Any) -> None:  # the main process (event loop, acks, sweeper): dump every 2 s
        import threading

        prof = cProfile.Profile(timer)
        prof.enable()

        def dump() -> None:
            while True:
                time.sleep(2)
                prof.dump_stats(f"{path_prefix}.main.{os.getpid()}.prof")
                prof.enable()

        threading.Thread(target=dump, daemon=True).start()

    signals.worker_process_init.connect(start, weak=False)
    signals.task_postrun.connect(done, weak=False)
    signals.worker_ready.connect(main_ready, weak=False)


def _from_env() -> NS:
    if os.environ.get("BENCH_SQL_STATS"):
        install_sql_stats(os.environ["BENCH_SQL_STATS"])
    if os.environ.get("BENCH_CPROFILE"):
        install_cprofile(os.environ["BENCH_CPROFILE"])
    side = os.environ.get("BENCH_SIDE", "baton")
    broker = os.environ["BENCH_BROKER"]
    queue = os.environ.get("BENCH_QUEUE", "bench")
    if side == "bare":
        return build_bare(broker, os.environ["BENCH_BACKEND"], queue)
    size = os.environ.get("BENCH_CACHE_SIZE")
    return build_baton(broker, os.environ["BENCH_DB"], queue, int(size) if size else None)


if os.environ.get("BENCH_BROKER"):
    ns = _from_env()
    app = ns.app
