"""Soak: the chaos suite's worker churn, longer and bigger, with optional broker wipes and
database restarts. Not part of CI (the CI-sized version is tests/chaos/test_churn.py).

Runs are started in waves over ``--duration`` seconds (the same mix as the churn test:
sequences, fan-outs, timers, signals, child runs), a random worker is SIGKILLed every
``--kill-every`` seconds and replaced, and optionally a private Redis broker is restarted
empty every ``--wipe-broker-every`` seconds and a private PostgreSQL restarted every
``--restart-db-every`` seconds (``--db private-pg``). At the end every run is checked on the
store (``tests.chaos.support.verify_runs``) and the figures are printed as JSON.

Run: ``.venv/bin/python bench/soak.py [--runs 2000] [--duration 300] [--workers 4]
[--kill-every 5] [--db sqlite|postgres|private-pg] [--wipe-broker-every 60] [--restart-db-every 90]
[--eager-steps N] [--json FILE]``. Uses Redis db ``TEST_REDIS_DB`` (default 7) on 127.0.0.1:6379 for counters
(and as the broker unless wiping), flushed at start; never restarts the shared servers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos.support import (  # noqa: E402 - after the path set-up
    REDIS,
    ChaosCluster,
    PgServer,
    RedisServer,
    verify_runs,
    wait_all,
)
from tests.chaos.test_churn import start_mix  # noqa: E402

PG = os.environ.get("TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextmanager
def shared_pg_schema() -> Iterator[str]:
    from tests.conftest import _pg_schema_url

    gen = _pg_schema_url()
    try:
        yield next(gen)
    finally:
        next(gen, None)


def eager_env(args: argparse.Namespace) -> dict[str, str]:
    """Worker environment for ``--eager-steps`` (read by tests/chaos/chaos_app.py)."""
    return {"BATON_TEST_EAGER_STEPS": str(args.eager_steps)} if args.eager_steps else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--duration", type=float, default=300.0, help="seconds over which runs are started")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--kill-every", type=float, default=5.0)
    ap.add_argument("--wipe-broker-every", type=float, default=0.0, help="0: never (shared Redis as broker)")
    ap.add_argument("--restart-db-every", type=float, default=0.0, help="needs --db private-pg")
    ap.add_argument("--db", default="sqlite", help="sqlite, postgres (a schema on TEST_PG_URL) or private-pg")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the last runs")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--eager-steps", type=int, default=0, help="Baton(eager_steps=N) in the workers")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.restart_db_every and args.db != "private-pg":
        ap.error("--restart-db-every restarts a private server: use --db private-pg")

    import redis

    rng = random.Random(args.seed)
    counter = f"{REDIS}/{os.environ.get('TEST_REDIS_DB', '7')}"
    redis.Redis.from_url(counter).flushdb()
    tmp = Path(tempfile.mkdtemp(prefix="baton-soak-"))
    with ExitStack() as stack:
        pg: PgServer | None = None
        if args.db == "sqlite":
            db = f"sqlite:///{tmp / 'baton.sqlite3'}"
        elif args.db == "postgres":
            db = stack.enter_context(shared_pg_schema())
        elif args.db == "private-pg":
            pg = PgServer()
            stack.callback(pg.destroy)
            pg.init()
            pg.start()
            db = stack.enter_context(pg.schema())
        else:
            db = args.db
        broker_server: RedisServer | None = None
        broker = counter
        if args.wipe_broker_every:
            broker_server = RedisServer(tmp)
            broker_server.start()
            stack.callback(broker_server.stop)
            broker = broker_server.url
        chaos = ChaosCluster(broker, db, tmp)
        stack.callback(chaos.stop)
        chaos.start_workers(args.workers, concurrency=args.concurrency, **eager_env(args))

        began = time.monotonic()
        runs: list[tuple[Any, Any]] = []
        waiters: list[tuple[Any, int]] = []
        wave = max(1, args.runs // max(1, int(args.duration / 2)))
        next_kill = began + args.kill_every
        next_wipe = began + args.wipe_broker_every if args.wipe_broker_every else float("inf")
        next_restart = began + args.restart_db_every if args.restart_db_every else float("inf")
        wipes = restarts = 0
        lost_messages = 0
        while len(runs) < args.runs or time.monotonic() - began < args.duration:
            now = time.monotonic()
            if len(runs) < args.runs:
                more, sigs = start_mix(chaos.ns, total=min(wave, args.runs - len(runs)), offset=len(runs))
                runs += more
                waiters += sigs
            for h, value in waiters:
                h.signal("go", value)
            waiters = []
            if now >= next_kill and len(chaos.alive()) >= 2:
                chaos.kill_random(rng)
                chaos.start_worker(args.concurrency, wait=False, **eager_env(args))
                next_kill = now + args.kill_every
            if now >= next_wipe and broker_server is not None:
                client = broker_server.client()
                lost_messages += int(client.llen(chaos.queue)) + int(client.hlen("unacked"))
                broker_server.kill()
                broker_server.start()
                wipes += 1
                next_wipe = now + args.wipe_broker_every
            if now >= next_restart and pg is not None:
                pg.stop("immediate" if restarts % 2 else "fast")
                time.sleep(2.0)
                pg.start()
                restarts += 1
                next_restart = now + args.restart_db_every
            chaos.replace_dead()
            if time.monotonic() - began > args.duration + args.timeout:
                break
            time.sleep(2.0)
        chaos_over = time.monotonic()
        wait_all([h for h, _ in runs], args.timeout)
        finished = time.monotonic()
        report = verify_runs(chaos.baton, runs)
        figures = {
            "db": args.db, "runs": report.runs, "activities": report.activities, "timers": report.timers,
            "signals": report.signals, "children": report.children, "kills": chaos.kills,
            "redispatched": report.redispatched, "extra_dispatches": report.dispatches - report.activities,
            "broker_wipes": wipes, "messages_lost_in_wipes": lost_messages, "db_restarts": restarts,
            "seconds": round(finished - began, 1), "drain_after_chaos_s": round(finished - chaos_over, 1),
            "activities_per_s": round(report.activities / max(finished - began, 1e-9), 1),
        }
        print(json.dumps(figures, indent=2))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
