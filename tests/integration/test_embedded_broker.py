"""The embedded Redis broker (tasks/embedded.py) with real ``celery worker`` subprocesses.

Every wait polls with a deadline; workers and servers are SIGKILLed (os.killpg) in teardown.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from tasks.embedded import (
    REDIS_SERVER_ENV,
    EmbeddedBrokerError,
    embedded_broker_url,
    is_running,
    server_pid,
    stop_embedded_broker,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
APP_MODULE = "tests.fixtures.embedded_app"
BROKER_ENV = "BATON_EMBEDDED_TEST_BROKER_URL"  # names match tests/fixtures/embedded_app.py
RECORD_DB_ENV = "BATON_EMBEDDED_TEST_RECORD_DB"
TASK_NAME = "embedded_app.record"
QUEUE = "celery"
N_TASKS = 2000
N_PUBLISHERS = 4


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def socket_of(url: str) -> str:
    assert url.startswith("redis+socket://"), url
    return url.removeprefix("redis+socket://")


def kill_server(data_dir: Path) -> None:
    """SIGKILL the embedded server of data_dir (daemonized redis is its own process group leader)."""
    pids: set[int] = set()
    pid = server_pid(data_dir) if data_dir.is_dir() else None
    if pid is not None:
        pids.add(pid)
    pidfile = data_dir / "redis.pid"
    if pidfile.exists():
        text = pidfile.read_text().strip()
        if text.isdigit():
            pids.add(int(text))
    for p in pids:
        try:
            os.killpg(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(lambda: not is_running(data_dir), 10, f"the embedded redis in {data_dir} to die")


@pytest.fixture
def broker_dir(tmp_path: Path) -> Iterator[Path]:
    data_dir = tmp_path / "broker"
    yield data_dir
    kill_server(data_dir)


@pytest.fixture
def broker_url(broker_dir: Path) -> str:
    return embedded_broker_url(broker_dir)


@pytest.fixture
def record_db(tmp_path: Path) -> Path:
    path = tmp_path / "record.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE attempts (seq INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER NOT NULL, pid INTEGER)")
        conn.execute("CREATE TABLE done (n INTEGER PRIMARY KEY)")
    return path


def count(db: Path, sql: str) -> int:
    with sqlite3.connect(db, timeout=30) as conn:
        value = conn.execute(sql).fetchone()[0]
    return int(value)


class Workers:
    def __init__(self, procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
        self.procs = procs
        self.logs = logs

    def tails(self) -> str:
        parts = []
        for log in self.logs:
            lines = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)


@pytest.fixture
def workers(tmp_path: Path, broker_url: str, record_db: Path) -> Iterator[Workers]:
    env = dict(os.environ)
    env.update(
        {
            BROKER_ENV: broker_url,
            RECORD_DB_ENV: str(record_db),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        }
    )
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for i in range(2):
            log = tmp_path / f"worker-{i}.log"
            logs.append(log)
            with open(log, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "celery",
                            "-A",
                            APP_MODULE,
                            "worker",
                            "--without-mingle",
                            "--without-gossip",
                            "-P",
                            "prefork",
                            "-c",
                            "2",
                            "-n",
                            f"embedded{i}@%h",
                            "--loglevel",
                            "WARNING",
                        ],
                        cwd=REPO,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        yield Workers(procs, logs)
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in procs:
            proc.wait(timeout=30)


def publisher_app(url: str) -> Celery:
    return Celery("embedded-test-publisher", broker=url, set_as_current=False)


def publish(app: Celery, numbers: list[int], errors: list[BaseException]) -> None:
    try:
        with app.producer_or_acquire() as producer:
            for n in numbers:
                app.send_task(TASK_NAME, args=(n,), producer=producer)
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


@pytest.mark.timeout(120)
def test_two_workers_run_2000_tasks_published_under_load_exactly_once(
    broker_url: str, workers: Workers, record_db: Path
) -> None:
    app = publisher_app(broker_url)
    client = redis.Redis(unix_socket_path=socket_of(broker_url))
    try:

        def both_workers_answer() -> bool:
            for proc in workers.procs:
                assert proc.poll() is None, f"a worker exited early\n{workers.tails()}"
            return len(app.control.ping(timeout=0.5)) == 2

        wait_until(both_workers_answer, 60, "both workers to answer a control ping")

        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=publish, args=(app, list(range(i, N_TASKS, N_PUBLISHERS)), errors))
            for i in range(N_PUBLISHERS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a publisher thread hung"
        assert not errors, errors

        def all_done() -> bool:
            for proc in workers.procs:
                assert proc.poll() is None, f"a worker died\n{workers.tails()}"
            return count(record_db, "SELECT COUNT(*) FROM done") == N_TASKS

        wait_until(all_done, 90, f"{N_TASKS} distinct tasks to run", interval=0.1)
        # Once the queue is empty and nothing is unacked, no redelivery can happen: the counts are final.
        wait_until(
            lambda: client.llen(QUEUE) == 0 and client.hlen("unacked") == 0,
            30,
            "the queue and the unacked hash to drain",
        )

        distinct = count(record_db, "SELECT COUNT(*) FROM done")
        attempts = count(record_db, "SELECT COUNT(*) FROM attempts")
        with sqlite3.connect(record_db) as conn:
            dups = conn.execute("SELECT n, COUNT(*) FROM attempts GROUP BY n HAVING COUNT(*) > 1").fetchall()
            pids = {row[0] for row in conn.execute("SELECT DISTINCT pid FROM attempts")}
        assert distinct == N_TASKS
        assert attempts == N_TASKS, f"{attempts - N_TASKS} duplicate executions, e.g. {dups[:10]}"
        assert dups == []
        assert len(pids) >= 2, "the tasks were expected to be spread over several pool processes"
    finally:
        client.close()
        app.close()


CALLER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tasks.embedded import embedded_broker_url, server_pid

    data_dir, go = Path(sys.argv[1]), Path(sys.argv[2])
    Path(sys.argv[3]).touch()  # imports are done
    deadline = time.monotonic() + 60
    while not go.exists():
        if time.monotonic() > deadline:
            sys.exit("no go signal")
        time.sleep(0.001)
    url = embedded_broker_url(data_dir)
    print(url, server_pid(data_dir), flush=True)
    """
)


@pytest.mark.timeout(120)
def test_concurrent_callers_in_separate_processes_share_one_server(tmp_path: Path, broker_dir: Path) -> None:
    go = tmp_path / "go"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    callers = []
    for i in range(4):
        callers.append(
            subprocess.Popen(
                [sys.executable, "-c", CALLER, str(broker_dir), str(go), str(tmp_path / f"ready-{i}")],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        )
    try:
        wait_until(
            lambda: all((tmp_path / f"ready-{i}").exists() for i in range(len(callers))),
            60,
            "the caller processes to import tasks.embedded",
        )
        go.touch()
        outputs = []
        for proc in callers:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err.decode(errors="replace")
            outputs.append(out.decode().split())
    finally:
        for proc in callers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    urls = {url for url, _ in outputs}
    pids = {int(pid) for _, pid in outputs}
    assert urls == {f"redis+socket://{broker_dir.resolve() / 'redis.sock'}"}
    assert len(pids) == 1, f"several servers were started: {outputs}"
    # Exactly one server came up, and it outlived every process that asked for it.
    log = (broker_dir / "redis.log").read_text()
    assert log.count("Redis is starting") == 1, log
    assert is_running(broker_dir)
    assert server_pid(broker_dir) == pids.pop()


@pytest.mark.timeout(120)
def test_queued_messages_survive_a_server_kill(broker_dir: Path, broker_url: str) -> None:
    app = publisher_app(broker_url)
    client = redis.Redis(unix_socket_path=socket_of(broker_url))
    try:
        with app.producer_or_acquire() as producer:
            for n in range(100):
                app.send_task(TASK_NAME, args=(n,), producer=producer)
        assert client.llen(QUEUE) == 100

        def aof_written() -> bool:
            info = client.info("persistence")
            return bool(info["aof_enabled"]) and info["aof_buffer_length"] == 0

        # Redis writes the AOF before replying unless an fsync is in flight; wait for the buffer to drain.
        wait_until(aof_written, 10, "the AOF buffer to be written")
        client.close()
        kill_server(broker_dir)

        url = embedded_broker_url(broker_dir)
        assert url == broker_url
        client = redis.Redis(unix_socket_path=socket_of(url))
        assert client.llen(QUEUE) == 100
        stop_embedded_broker(broker_dir)
        assert not is_running(broker_dir)
        assert not (broker_dir / "redis.sock").exists()
        embedded_broker_url(broker_dir)
        assert client.llen(QUEUE) == 100
    finally:
        client.close()
        app.close()


@pytest.mark.timeout(120)
def test_long_data_dir_uses_a_short_socket_alias(tmp_path: Path) -> None:
    data_dir = tmp_path / ("d" * 60) / ("e" * 60)
    assert len(os.fsencode(data_dir / "redis.sock")) > 107
    try:
        url = embedded_broker_url(data_dir)
        sock = socket_of(url)
        assert len(os.fsencode(sock)) <= 107
        assert Path(sock).resolve() == (data_dir / "redis.sock").resolve()
        assert redis.Redis(unix_socket_path=sock).ping()
        assert is_running(data_dir)
        stop_embedded_broker(data_dir)
        assert not is_running(data_dir)
        assert not Path(sock).parent.is_symlink(), "stop removes the alias"
    finally:
        kill_server(data_dir)


@pytest.mark.timeout(120)
def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REDIS_SERVER_ENV, str(tmp_path / "no-such-redis-server"))
    with pytest.raises(EmbeddedBrokerError, match=REDIS_SERVER_ENV) as info:
        embedded_broker_url(tmp_path / "broker")
    assert isinstance(info.value, RuntimeError)
    assert "no-such-redis-server" in str(info.value)
    assert not is_running(tmp_path / "broker")
