"""Shared fixtures: fresh databases (SQLite file, PostgreSQL schema), a flushed Redis db,
and real ``celery worker`` subprocesses that tests can SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
REDIS = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
PG = os.environ.get("TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgres"]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _pg_schema_url() -> Iterator[str]:
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'baton.sqlite3'}"
    else:
        yield from _pg_schema_url()


@pytest.fixture
def broker_url() -> Iterator[str]:
    import redis

    url = f"{REDIS}/{os.environ.get('TEST_REDIS_DB', '7')}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


class Cluster:
    """Worker subprocesses for one test, plus the test process's own Baton."""

    def __init__(self, broker: str, db: str, tmp: Path) -> None:
        from tests.fixtures.flows import build

        self.broker = broker
        self.db = db
        self.tmp = tmp
        self.queue = f"q{uuid.uuid4().hex[:8]}"
        self.ns = build(broker, db, queue=self.queue)
        self.baton = self.ns.baton
        self.procs: list[subprocess.Popen[bytes]] = []
        self.n = 0

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(BATON_TEST_BROKER=self.broker, BATON_DATABASE_URL=self.db, BATON_TEST_QUEUE=self.queue,
                   PYTHONPATH=str(ROOT))
        env.update(extra)
        return env

    def start_worker(self, concurrency: int = 2, pool: str = "prefork", wait: bool = True,
                     **env: str) -> subprocess.Popen[bytes]:
        self.n += 1
        name = f"w{self.n}-{self.queue}@%h"
        log = open(self.tmp / f"worker{self.n}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.fixtures.worker_app", "worker", "-P", pool,
             "-c", str(concurrency), "-n", name, "-Q", self.queue, "--without-mingle", "--without-gossip",
             "-l", "INFO"],
            cwd=ROOT, env=self.env(**env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.procs.append(proc)
        if wait:
            self.wait_ready(proc)
        return proc

    def wait_ready(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
        """Ready once its heartbeat row exists (written by the sweeper thread at its first tick)."""
        def beating() -> bool:
            assert proc.poll() is None, f"worker exited with {proc.returncode}: {self.logs()[-3000:]}"
            return any(str(proc.pid) in w.id for w in self.baton.store.workers())
        wait_for(beating, timeout, f"worker pid {proc.pid} to heartbeat")

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("worker*.log")))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(proc)


@pytest.fixture
def cluster(broker_url: str, db_url: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(broker_url, db_url, tmp_path)
    try:
        yield c
    finally:
        c.stop()
        for store in list(__import__("persistence.store", fromlist=["Store"]).Store._cache.values()):
            store.engine.dispose()
        __import__("persistence.store", fromlist=["Store"]).Store.forget_all()


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each test process gets its own Redis db (they flush it per test)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and "TEST_REDIS_DB_BASE_SET" not in os.environ:
        base = int(os.environ.get("TEST_REDIS_DB", "7"))
        os.environ["TEST_REDIS_DB"] = str(base + int(worker[2:]))
        os.environ["TEST_REDIS_DB_BASE_SET"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.fspath)
        if "/integration/" in path:
            item.add_marker(pytest.mark.integration)
        if "/chaos/" in path:
            item.add_marker(pytest.mark.chaos)
