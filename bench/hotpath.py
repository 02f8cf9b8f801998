"""Baton's hot path alone, in one process: what one step costs without a Celery worker around it.

Starts a ``bench_seq`` run of ``--steps`` steps on a fresh PostgreSQL schema (or SQLite file), then
plays the worker's part in a loop: for the step's scheduled attempt, ``task_postrun``'s work
(record the result, advance the cached generator, commit, publish the next attempt to Redis).
Prints wall and CPU time per step, with ``--profile`` the top functions by cumulative time
(cProfile), and with ``--split`` the CPU per step of each part of the step (this thread's CPU,
without cProfile's overhead per call). Nothing consumes the published messages: the queue is
purged at the end.

Run: ``.venv/bin/python bench/hotpath.py [--store pg|sqlite] [--steps 500] [--profile]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder (bench/profile.py) would shadow the standard library's profile.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import cProfile  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

from sqlalchemy import create_engine, text  # noqa: E402

from bench.app import build_baton  # noqa: E402
from bench.procs import cpu_seconds  # noqa: E402
from persistence import runtime as rt  # noqa: E402
from tasks import advance as adv  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", choices=("pg", "sqlite"), default="pg")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=35)
    ap.add_argument("--split", action="store_true", help="CPU per step of each part of the step (no cProfile)")
    ap.add_argument("--sent-events", action="store_true", help="publish task-sent events too")
    ap.add_argument("--no-guess", action="store_true", help="PostgreSQL: always lock, then decide (two round trips)")
    ap.add_argument("--no-handoff", action="store_true",
                    help="PostgreSQL: the ending's decision, taken by the cached generator, is not handed to the "
                         "usual path (which then replays the whole history)")
    ap.add_argument("--cold", action="store_true",
                    help="drop the cached generator before each step (a cache miss: replay; use few --steps)")
    ap.add_argument("--redis", default=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379") + "/14")
    args = ap.parse_args()

    pg = os.environ.get("BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    schema = f"hot_{uuid.uuid4().hex[:8]}"
    if args.store == "pg":
        admin = create_engine(pg, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f"CREATE SCHEMA {schema}"))
        url = f"{pg}?options=-csearch_path%3D{schema}"
    else:
        url = f"sqlite:///{tempfile.mkdtemp()}/hot.db"
    queue = f"hot{uuid.uuid4().hex[:6]}"
    split = _split() if args.split else None
    ns = build_baton(args.redis, url, queue)
    runtime = ns.baton.runtime
    runtime.app.conf.task_send_sent_event = args.sent_events
    try:
        if os.environ.get("HOT_DDL"):
            runtime.store.ensure_schema()
            with runtime.store.tx() as c:
                c.execute(text(os.environ["HOT_DDL"]))
        handle = ns.seq.start(args.steps)
        adv.advance(runtime, handle.run_id, publisher="hot/1")  # what the baton.advance task does
        store = runtime.store
        me = "hot/1"
        run_id = handle.run_id

        def step(i: int) -> None:
            tid = rt.task_id(run_id, i + 1, 0, 1)
            if args.cold:
                runtime.cache.clear()
            # as tasks.activities.on_postrun does (one round trip when the cached generator can decide)
            adv.record(runtime, tid, "bench.noop", True, i, me, None, try_guess=not args.no_guess,
                       hand_over=not args.no_handoff)

        warm = min(20, args.steps // 5)
        for i in range(warm):
            step(i)
        prof = cProfile.Profile(time.process_time) if args.profile else None  # CPU-timed: waits cost nothing
        backend = None
        if args.store == "pg":  # the backend serving the (single, reused) pooled connection
            with store.engine.connect() as c:
                backend = int(c.execute(text("SELECT pg_backend_pid()")).scalar())
                if os.environ.get("HOT_PREP"):
                    v = os.environ["HOT_PREP"]
                    c.connection.driver_connection.prepare_threshold = None if v == "none" else int(v)
        b0 = cpu_seconds([backend]) if backend else 0.0
        if split is not None:
            split.clear()  # count the measured steps only
        w0, c0 = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        for i in range(warm, args.steps - 1):
            step(i)
        e0, t0 = time.perf_counter(), time.thread_time()
        step(args.steps - 1)  # the run's ending
        ending, ending_cpu = time.perf_counter() - e0, time.thread_time() - t0
        if prof:
            prof.disable()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        pg_cpu = (cpu_seconds([backend]) if backend else 0.0) - b0
        n = args.steps - warm
        assert handle.status() == "completed", handle.info()
        print(f"{args.store}: {n} steps, wall {1000 * wall / n:.3f} ms/step, CPU {1000 * cpu / n:.3f} ms/step "
              f"(cache hits {runtime.cache.hits}, misses {runtime.cache.misses}); the ending step "
              f"{1000 * ending:.1f} ms ({1000 * ending_cpu:.1f} ms CPU)"
              + (f"; PostgreSQL backend CPU {1000 * pg_cpu / n:.3f} ms/step" if backend else ""))
        if split is not None:
            for name, (calls, seconds) in sorted(split.items(), key=lambda kv: -kv[1][1]):
                print(f"  {name:38s} {1000 * seconds / n:7.3f} ms CPU/step  ({calls / n:.2f} calls/step)")
        if prof:
            pstats.Stats(prof).sort_stats("cumulative").print_stats(args.top)
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    finally:
        with runtime.app.connection_for_write() as conn:
            conn.default_channel.client.delete(queue)
        if args.store == "pg":
            with admin.connect() as c:
                c.execute(text(f"DROP SCHEMA {schema} CASCADE"))


def _split() -> dict[str, list[float]]:
    """Wrap the parts of a step to add up their calls and this thread's CPU (``--split``); nested
    parts count inside their callers too."""
    import functools

    from persistence import hot
    from persistence import recording as rec
    from sdk.replay import Instance
    from tasks import dispatch

    totals: dict[str, list[float]] = {}
    parts = [(adv, "record", "record (all of it)"), (adv, "guess", "guess: decide before the lock, commit"),
             (Instance, "activate", "engine: activate"), (rec, "commit_guessed", "commit_guessed (rows + write)"),
             (hot, "write", "hot.write (driver pipeline + COMMIT)"), (adv, "_decide", "usual path: _decide"),
             (rec, "record_attempt", "usual path: lock + record"), (dispatch, "publish", "publish (kombu send_task)")]
    for owner, attr, label in parts:
        fn = getattr(owner, attr)

        def timed(*a: object, _fn=fn, _label=label, **k: object) -> object:
            t0 = time.thread_time()
            try:
                return _fn(*a, **k)
            finally:
                entry = totals.setdefault(_label, [0, 0.0])
                entry[0] += 1
                entry[1] += time.thread_time() - t0

        setattr(owner, attr, functools.wraps(fn)(timed))
    return totals


if __name__ == "__main__":
    main()
