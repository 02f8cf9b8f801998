"""Machinery for the chaos and bad-input suites: private servers to break, worker clusters to
kill, and the store invariants every fault test asserts.

* :class:`RedisServer` — a private ``redis-server`` (no persistence) on a free port, which a
  test may SIGKILL and restart empty: every queued and unacknowledged message is gone.
* :class:`PgServer` — a private PostgreSQL cluster (``initdb`` in a temporary directory, run as
  the ``postgres`` user) that a test may stop (``fast`` or ``immediate``) and start again.
  The machine's shared Redis and PostgreSQL are never touched.
* :class:`ChaosCluster` — real ``celery worker`` subprocesses running ``tests.chaos.chaos_app``
  with Baton's recovery knobs shortened, plus the test process's own Baton.
* :func:`verify_runs` — what "survived" means, read from the store: every run completed with
  the right result, every scheduled step resolved, each step's completion recorded once, no
  attempt left in flight, every timer fired and every signal consumed.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
REDIS = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")


def pg_bin() -> Path:
    """Where ``initdb`` and ``pg_ctl`` live: ``TEST_PG_BIN``, the newest Debian server, or the PATH."""
    if os.environ.get("TEST_PG_BIN"):
        return Path(os.environ["TEST_PG_BIN"])
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3])
                    if p.parts[-3].isdigit() else 0)
    if debian:
        return debian[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl) found: install the server package "
                       "or set TEST_PG_BIN to their directory")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until truthy; database errors count as "not yet" (the store may be down)."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = predicate()
        except (OperationalError, DBAPIError) as exc:
            value, last = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f" (last database error: {str(last).splitlines()[0]})" if last else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


def counter_url() -> str:
    """The Redis db that holds task counters: the test's own db on the shared server (never wiped)."""
    return f"{REDIS}/{os.environ.get('TEST_REDIS_DB', '7')}"


def count(key: str) -> int:
    import redis

    client = redis.Redis.from_url(counter_url())
    try:
        return int(client.get(f"chaos:{key}") or 0)
    finally:
        client.close()


# ---------------------------------------------------------------- private servers


class RedisServer:
    """A private, non-persistent redis-server a test may kill and restart empty."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.starts += 1
        log = open(self.dir / f"redis{self.starts}.log", "wb")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self.ping, 20, f"private redis on port {self.port}")

    def ping(self) -> bool:
        import redis

        try:
            client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except redis.RedisError:
            return False

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_connect_timeout=2)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()


class PgServer:
    """A private PostgreSQL cluster in a temporary directory, restartable mid-test."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="baton-chaos-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.log = self.dir / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args: str, timeout: float = 120) -> None:
        cmd = ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({res.returncode}): {res.stderr[-2000:]}")

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._as_postgres(str(pg_bin() / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                          "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c max_connections=200 -c shared_buffers=32MB")
        self._as_postgres(str(pg_bin() / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w",
                          "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(pg_bin() / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        if self.running():
            try:
                self.stop("immediate")
            except Exception:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    @contextmanager
    def schema(self) -> Iterator[str]:
        """A fresh schema on this server, as a database URL (like the shared ``db_url`` fixture)."""
        import sqlalchemy as sa

        name = f"c_{uuid.uuid4().hex[:10]}"
        admin = sa.create_engine(self.url, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE SCHEMA "{name}"'))
        admin.dispose()
        yield f"{self.url}?options=-csearch_path%3D{name}"


# ---------------------------------------------------------------- workers


class ChaosCluster:
    """Worker subprocesses on ``tests.chaos.chaos_app``, plus the test process's Baton."""

    def __init__(self, broker: str, db: str, tmp: Path, *, dead_after: float = 3.0, lost_after: float = 8.0,
                 sweep_interval: float = 0.5) -> None:
        from tests.chaos.flows_chaos import build

        self.broker = broker
        self.db = db
        self.tmp = tmp
        self.queue = f"c{uuid.uuid4().hex[:8]}"
        self.knobs = {"dead_after": dead_after, "lost_after": lost_after, "sweep_interval": sweep_interval}
        self.ns = build(broker, db, queue=self.queue, counter_url=counter_url(), **self.knobs)
        self.baton = self.ns.baton
        self.procs: list[subprocess.Popen[bytes]] = []
        self.envs: dict[int, dict[str, str]] = {}
        self.n = 0
        self.kills = 0
        self.replaced = 0

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(BATON_TEST_BROKER=self.broker, BATON_DATABASE_URL=self.db, BATON_TEST_QUEUE=self.queue,
                   BATON_TEST_COUNTER_URL=counter_url(), PYTHONPATH=str(ROOT),
                   BATON_TEST_DEAD_AFTER=str(self.knobs["dead_after"]),
                   BATON_TEST_LOST_AFTER=str(self.knobs["lost_after"]),
                   BATON_TEST_SWEEP_INTERVAL=str(self.knobs["sweep_interval"]))
        env.update(extra)
        return env

    def start_worker(self, concurrency: int = 2, pool: str = "prefork", wait: bool = True,
                     queues: tuple[str, ...] = (), **env: str) -> subprocess.Popen[bytes]:
        """One worker on the cluster's queue (plus ``queues``, to route activities to it)."""
        self.n += 1
        name = f"c{self.n}-{self.queue}@%h"
        log = open(self.tmp / f"worker{self.n:03d}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.chaos.chaos_app", "worker", "-P", pool,
             "-c", str(concurrency), "-n", name, "-Q", ",".join([self.queue, *queues]),
             "--without-mingle", "--without-gossip",
             "--without-heartbeat", "-l", "INFO"],
            cwd=ROOT, env=self.env(**env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.procs.append(proc)
        self.envs[proc.pid] = {"concurrency": str(concurrency), "pool": pool, "queues": ",".join(queues), **env}
        if wait:
            self.wait_ready(proc)
        return proc

    def start_workers(self, n: int, concurrency: int = 2, pool: str = "prefork", queues: tuple[str, ...] = (),
                      **env: str) -> list[subprocess.Popen[bytes]]:
        """Start ``n`` workers at once (their start-up overlaps), then wait for all of them."""
        procs = [self.start_worker(concurrency, pool, wait=False, queues=queues, **env) for _ in range(n)]
        for proc in procs:
            self.wait_ready(proc)
        return procs

    def wait_ready(self, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
        """Ready once its heartbeat row exists (the sweeper thread writes it at its first tick)."""
        def beating() -> bool:
            assert proc.poll() is None, f"worker exited with {proc.returncode}: {self.logs()[-3000:]}"
            return any(w.id.endswith(f"/{proc.pid}") for w in self.baton.store.workers())
        wait_until(beating, timeout, f"worker pid {proc.pid} to heartbeat")

    def worker_id(self, proc: subprocess.Popen[bytes]) -> str | None:
        return next((w.id for w in self.baton.store.workers() if w.id.endswith(f"/{proc.pid}")), None)

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        self.kills += 1

    def busy_pids(self) -> set[int]:
        """Main-process pids of the workers holding a started attempt right now."""
        from sqlalchemy import select

        from persistence.store import tasks_t

        with self.baton.store.read() as conn:
            held = conn.execute(select(tasks_t.c.worker).where(tasks_t.c.state == "started")).scalars().all()
        return {int(w.rsplit("/", 1)[1]) for w in held if w and w.rsplit("/", 1)[1].isdigit()}

    def kill_random(self, rng: random.Random, prefer_busy: bool = True) -> subprocess.Popen[bytes] | None:
        """SIGKILL a random live worker (even one still starting); by default one caught running
        an activity, if any is."""
        live = self.alive()
        if not live:
            return None
        busy = self.busy_pids() if prefer_busy else set()
        victim = rng.choice([p for p in live if p.pid in busy] or live)
        self.kill(victim)
        return victim

    def replace_dead(self, wait: bool = False) -> int:
        """Start a replacement (same settings) for every worker that exited on its own."""
        started = 0
        for proc in list(self.procs):
            if proc.poll() is not None and self.envs.get(proc.pid, {}).get("replaced") != "1":
                spec = dict(self.envs[proc.pid])
                spec_env = {k: v for k, v in spec.items() if k not in ("concurrency", "pool", "replaced", "queues")}
                self.envs[proc.pid]["replaced"] = "1"
                self.start_worker(int(spec["concurrency"]), spec["pool"], wait=wait,
                                  queues=tuple(q for q in spec["queues"].split(",") if q), **spec_env)
                self.replaced += 1
                started += 1
        return started

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("worker*.log")))

    def stop(self) -> None:
        # No graceful shutdown: nothing here needs one, and a warm shutdown waits for tasks.
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
        for proc in self.procs:
            proc.wait(10)
        from persistence.store import Store

        for key, store in list(Store._cache.items()):
            if key[0] == self.db:
                store.engine.dispose()
                if store.reader is not store.engine:
                    store.reader.dispose()
                Store._cache.pop(key, None)


@contextmanager
def backend_cluster(backend: str, tmp: Path, **knobs: float) -> Iterator[ChaosCluster]:
    """A cluster on a fresh database of ``backend`` (sqlite file or PostgreSQL schema) and the
    test Redis db (flushed), for fixtures wider than one test (the root ``db_url`` is per test)."""
    import redis

    from tests.conftest import _pg_schema_url

    schema = None
    if backend == "sqlite":
        db = f"sqlite:///{tmp / 'baton.sqlite3'}"
    else:
        schema = _pg_schema_url()
        db = next(schema)
    broker = counter_url()
    redis.Redis.from_url(broker).flushdb()
    cluster = ChaosCluster(broker, db, tmp, **knobs)
    try:
        yield cluster
    finally:
        cluster.stop()
        if schema is not None:
            next(schema, None)


# ---------------------------------------------------------------- what "survived" means


@dataclass
class Report:
    """Figures from :func:`verify_runs`, for the test's closing note."""

    runs: int = 0
    activities: int = 0
    redispatched: int = 0
    dispatches: int = 0
    timers: int = 0
    signals: int = 0
    children: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"runs={self.runs} activities={self.activities} redispatched={self.redispatched} "
                f"extra_dispatches={self.dispatches - self.activities} timers={self.timers} "
                f"signals={self.signals} children={self.children}")


def verify_runs(baton: Any, expected: list[tuple[Any, Any]], failures_ok: bool = False) -> Report:
    """Assert, from the store, that every ``(handle, result)`` pair survived intact.

    For each run (and each child run it started): it completed with the expected result; its
    history's seqs are contiguous and fully decided; every scheduled step resolved; every
    activity slot has exactly one completion event and its final attempt row is ``done``; no
    attempt is left scheduled, published or started; every timer fired; every signal was
    consumed. Failed attempts are problems unless ``failures_ok`` (a test of retries). All
    problems are collected, then reported together.
    """
    from collections import defaultdict

    from sqlalchemy import select

    from persistence.store import events_t, row_event, runs, signals_t, tasks_t, timers_t
    from sdk import serde

    store = baton.store
    rep = Report()
    seen: set[str] = set()
    # One read per table (the database belongs to the test), grouped by run in memory.
    with store.read() as conn:
        run_rows = {r.run_id: r for r in conn.execute(select(runs))}
        events_by: dict[str, list[Any]] = defaultdict(list)
        for r in conn.execute(select(events_t).order_by(events_t.c.run_id, events_t.c.seq)):
            events_by[r.run_id].append(row_event(r))
        tasks_by: dict[str, list[Any]] = defaultdict(list)
        for r in conn.execute(select(tasks_t)):
            tasks_by[r.run_id].append(r)
        timers_by: dict[str, list[Any]] = defaultdict(list)
        for r in conn.execute(select(timers_t)):
            timers_by[r.run_id].append(r)
        signals_by: dict[str, list[Any]] = defaultdict(list)
        for r in conn.execute(select(signals_t)):
            signals_by[r.run_id].append(r)
    children_of: dict[str, list[str]] = defaultdict(list)
    for r in run_rows.values():
        if r.parent_run_id:
            children_of[r.parent_run_id].append(r.run_id)

    def newest(run_id: str) -> str:
        row = run_rows.get(run_id)
        while row is not None and row.next_run_id and row.next_run_id in run_rows:
            row = run_rows[row.next_run_id]
        return row.run_id if row is not None else run_id

    def check(run_id: str, want: Any, check_result: bool) -> None:
        if run_id in seen:
            return
        seen.add(run_id)
        rep.runs += 1
        row = run_rows.get(run_id)
        if row is None:
            rep.problems.append(f"{run_id}: no run row")
            return
        if row.status != "completed":
            rep.problems.append(f"{run_id}: status {row.status} at step {row.step}, error {row.error}")
            return
        if check_result and serde.loads(row.result) != want:
            rep.problems.append(f"{run_id}: result {serde.loads(row.result)!r}, expected {want!r}")
        events = events_by[run_id]
        seqs = [e.seq for e in events]
        if seqs != list(range(1, len(events) + 1)) or row.last_seq != len(events):
            rep.problems.append(f"{run_id}: history seqs not contiguous 1..{row.last_seq}: {seqs[:5]}...")
        if row.decided_seq != row.last_seq or row.needs_advance:
            rep.problems.append(f"{run_id}: decided_seq {row.decided_seq} != last_seq {row.last_seq} "
                                f"or needs_advance {row.needs_advance}")
        steps = {e.step: e for e in events if e.kind == "step_scheduled"}
        if sorted(steps) != list(range(1, len(steps) + 1)):
            rep.problems.append(f"{run_id}: step numbers {sorted(steps)} have a gap")
        inputs = Counter((e.kind, e.step, e.slot) for e in events
                         if e.kind in ("activity_completed", "timer_fired", "signal_received", "child_completed"))
        failures = [e for e in events if e.kind in ("activity_failed", "child_failed")]
        if failures and not failures_ok:
            shown = [(e.kind, e.step, e.payload) for e in failures]
            rep.problems.append(f"{run_id}: unexpected failure events {shown}")
        twice = {k: n for k, n in inputs.items() if n > 1}
        if twice:
            rep.problems.append(f"{run_id}: completions recorded more than once: {twice}")
        for k, ev in steps.items():
            leaves = ev.payload.get("command", {}).get("leaves", [])
            if ev.payload.get("command", {}).get("mode") == "value":
                continue
            for slot, leaf in enumerate(leaves):
                kind = {"activity": "activity_completed", "timer": "timer_fired", "signal": "signal_received",
                        "child": "child_completed"}[leaf["kind"]]
                if inputs.get((kind, k, slot), 0) != 1:
                    rep.problems.append(f"{run_id}: step {k} slot {slot} ({leaf['kind']} {leaf['name']}) has "
                                        f"{inputs.get((kind, k, slot), 0)} {kind} events, expected 1")
                if leaf["kind"] == "activity":
                    rep.activities += 1
                elif leaf["kind"] == "timer":
                    rep.timers += 1
                elif leaf["kind"] == "signal":
                    rep.signals += 1
        final: dict[tuple[int, int], Any] = {}
        for t in tasks_by[run_id]:
            rep.dispatches += max(1, t.dispatches)
            if t.dispatches > 1:
                rep.redispatched += 1
            if t.state in ("scheduled", "published", "started"):
                rep.problems.append(f"{run_id}: task {t.id} left {t.state}")
            if (t.step, t.slot) not in final or t.attempt > final[(t.step, t.slot)].attempt:
                final[(t.step, t.slot)] = t
        for (k, slot), t in final.items():
            if t.state != "done":
                rep.problems.append(f"{run_id}: final attempt of step {k} slot {slot} is {t.state}")
        for t in timers_by[run_id]:
            if not t.fired:
                rep.problems.append(f"{run_id}: timer {t.id} ({t.kind}) never fired")
        for sig in signals_by[run_id]:
            if sig.consumed_step is None:
                rep.problems.append(f"{run_id}: signal {sig.id} ({sig.name}) never consumed")
        for child in children_of[run_id]:
            rep.children += 1
            check(child, None, False)

    for handle, want in expected:
        check(newest(handle.id), want, True)
    assert not rep.problems, f"{len(rep.problems)} problem(s):\n" + "\n".join(rep.problems[:40])
    return rep


def wait_all(handles: list[Any], timeout: float, what: str = "every run to finish",
             each: Callable[[], Any] | None = None) -> None:
    """Wait until no run is still running (a store outage counts as "not yet"); ``each`` is
    called at every look (e.g. to restart workers, as a supervisor would)."""
    from sqlalchemy import select

    from persistence.store import runs

    pending = {h.id: h for h in handles}
    if not handles:
        return
    store = handles[0].baton.store

    def done() -> bool:
        if each is not None:
            each()
        ids = list(pending)
        with store.read() as conn:
            rows = conn.execute(select(runs.c.run_id, runs.c.status, runs.c.next_run_id)
                                .where(runs.c.run_id.in_(ids))).all()
        for r in rows:
            if r.next_run_id:  # a continue-as-new chain: ask the handle, which follows it
                if pending[r.run_id].status() != "running":
                    pending.pop(r.run_id)
            elif r.status != "running":
                pending.pop(r.run_id)
        return not pending

    try:
        wait_until(done, timeout, what, interval=0.25)
    except AssertionError as exc:
        stuck = list(pending.values())[:10]
        lines = []
        for h in stuck:
            ck = h.checkpoint()
            tasks = [(t.id.rsplit(":", 3)[1:], t.state, t.worker, t.dispatches) for t in store.task_rows(h.run_id)]
            lines.append(f"{h.id}@step{ck.step if ck else 0} tasks={tasks[-4:]}")
        workers = [w.id for w in store.workers()]
        raise AssertionError(f"{exc}; {len(pending)} still running:\n" + "\n".join(lines) +
                             f"\nworkers heartbeating: {workers}") from None
