"""A pool child killed mid-task while its worker lives, with Celery's requeue lost.

Celery rejects the message of a pool process that died (``task_reject_on_worker_lost``) and
kombu's Redis QoS puts it back in its queue from the ``unacked`` hash. If that entry is gone,
nothing is requeued, and since the worker's main process keeps heartbeating, dead-worker
detection never fires. The sweeper's last resort: an attempt ``started`` for ``lost_after``
whose message is neither queued nor held unacknowledged by any worker is reset and re-sent.

* The test deletes the running attempt's entry from ``unacked`` (and ``unacked_index``), then
  SIGKILLs the pool child: the run must still complete, re-sent once by that path, within
  ``lost_after`` and a few sweeps, the worker's main process alive throughout.
* Its counterpart: a task running longer than ``lost_after`` on a live worker, whose message
  is held in ``unacked``, is left alone (one dispatch, one execution).

Each test has a cluster of its own: one ``-P prefork -c 1`` worker, ``lost_after`` 3 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.chaos.diagnose import diagnose_runs
from tests.chaos.support import ChaosCluster, backend_cluster, count, verify_runs, wait_until

pytestmark = pytest.mark.timeout(120)

LOST_AFTER = 3.0
SWEEP = 0.5  # ChaosCluster's default sweep_interval
SLACK = 3.0  # a few sweeps, and a loaded machine


@pytest.fixture(params=["sqlite", "postgres"])
def lr(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[ChaosCluster, subprocess.Popen[bytes]]]:
    with backend_cluster(request.param, tmp_path, lost_after=LOST_AFTER, sweep_interval=SWEEP) as cluster:
        worker = cluster.start_worker(concurrency=1, pool="prefork")
        yield cluster, worker


def pool_children(pid: int) -> set[int]:
    """The child processes of ``pid`` (its prefork pool), from /proc."""
    out: set[int] = set()
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out.update(int(x) for x in f.read_text().split())
        except OSError:
            continue
    return out


def gone(pid: int) -> bool:
    """Exited (and reaped, or a zombie awaiting its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def broker_places(chaos: ChaosCluster, task_id: str) -> list[str]:
    """Where the broker holds this attempt's message: queue lists and the ``unacked`` hash."""
    client = redis.Redis.from_url(chaos.broker, socket_connect_timeout=2)
    try:
        places = []
        for name in client.scan_iter(f"{chaos.queue}*"):
            if client.type(name) == b"list":
                places += [f"queue {name!r}" for raw in client.lrange(name, 0, -1)
                           if json.loads(raw)["headers"]["id"] == task_id]
        places += [f"unacked {tag!r}" for tag, raw in client.hgetall("unacked").items()
                   if json.loads(raw)[0]["headers"]["id"] == task_id]
        return places
    finally:
        client.close()


def drop_unacked(chaos: ChaosCluster, task_id: str) -> int:
    """Delete this attempt's entry from kombu's ``unacked`` hash and ``unacked_index`` zset, so
    that Celery's requeue of a lost pool process finds nothing to restore."""
    client = redis.Redis.from_url(chaos.broker, socket_connect_timeout=2)
    try:
        dropped = 0
        for tag, raw in client.hgetall("unacked").items():
            if json.loads(raw)[0]["headers"]["id"] == task_id:
                dropped += int(client.hdel("unacked", tag))
                client.zrem("unacked_index", tag)
        return dropped
    finally:
        client.close()


def started_row(chaos: ChaosCluster, run: Any) -> Any:
    return next((t for t in chaos.baton.store.task_rows(run.run_id) if t.state == "started"), None)


def result(chaos: ChaosCluster, run: Any, timeout: float) -> Any:
    """The run's result, or a diagnosis from the store, the broker and the worker log."""
    try:
        return run.result(timeout=timeout)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{diagnose_runs(chaos.baton, [run.id], chaos)}") from None


def test_lost_requeue_is_recovered(lr: tuple[ChaosCluster, subprocess.Popen[bytes]]) -> None:
    chaos, worker = lr
    wid = chaos.worker_id(worker)
    store = chaos.baton.store
    key = f"lr-{chaos.queue}"
    run = chaos.ns.stuck.start(4.0, key)  # one activity of 4 s: c.sleepy(4.0, "slept", key)

    row = wait_until(lambda: started_row(chaos, run), 30, "the activity to be claimed (started)")
    assert row.worker == wid and row.dispatches == 1
    (child,) = pool_children(worker.pid)  # -c 1: the one pool process, running the activity
    first_started = row.started_at.timestamp()
    wait_until(lambda: broker_places(chaos, row.id), 10, "the running message to show in the unacked hash")
    assert drop_unacked(chaos, row.id) == 1
    os.kill(child, signal.SIGKILL)
    killed_at = time.time()
    assert count(key) == 1, "the activity ran more than once before the kill"
    wait_until(lambda: gone(child), 10, "the killed pool process to exit")

    # Celery notices the lost pool process and rejects (requeues) its message: nothing to restore.
    wait_until(lambda: "WorkerLostError" in chaos.logs(), 15, "the worker to log the lost pool process")
    (now,) = store.task_rows(run.run_id)
    if now.dispatches == 1:
        assert broker_places(chaos, row.id) == [], "the message was requeued after all: the test proves nothing"

    def redispatched() -> Any:
        (t,) = store.task_rows(run.run_id)
        return t if t.dispatches >= 2 else None

    try:
        wait_until(redispatched, LOST_AFTER + 4 * SLACK, "the sweeper to re-send the lost attempt")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnose_runs(chaos.baton, [run.id], chaos)}") from None
    redispatched_at = time.time()
    assert result(chaos, run, 30) == "slept"
    done = time.time()

    (task,) = store.task_rows(run.run_id)
    assert task.state == "done" and task.dispatches == 2, (task.state, task.dispatches)
    assert count(key) == 2, f"{count(key)} executions, expected 2 (the killed one and the re-sent one)"
    verify_runs(chaos.baton, [(run, "slept")])
    # The new path did it, not dead-worker detection: the main process lived and kept beating.
    assert worker.poll() is None and chaos.worker_id(worker) == wid, "the worker's main process must survive"
    logs = chaos.logs()
    assert "started, but their message is gone from the broker" in logs
    assert "stopped heartbeating" not in logs
    # Not before lost_after from the start (the sweeper waits), and within lost_after and a few sweeps of the kill.
    after_start, after_kill = redispatched_at - first_started, redispatched_at - killed_at
    assert after_start >= LOST_AFTER - 0.1, f"re-sent {after_start:.1f}s after the start, before lost_after"
    assert after_kill <= LOST_AFTER + SLACK, f"re-sent {after_kill:.1f}s after the kill"
    print(f"\nFIGURES lost-requeue [{chaos.db.split(':')[0]}]: lost_after={LOST_AFTER}s "
          f"killed_after_start={killed_at - first_started:.1f}s resent_after_start={after_start:.1f}s "
          f"resent_after_kill={after_kill:.1f}s completed_after_kill={done - killed_at:.1f}s")


def test_long_task_with_held_message_is_left_alone(lr: tuple[ChaosCluster, subprocess.Popen[bytes]]) -> None:
    chaos, worker = lr
    wid = chaos.worker_id(worker)
    store = chaos.baton.store
    key = f"long-{chaos.queue}"
    seconds = 2 * LOST_AFTER
    run = chaos.ns.stuck.start(seconds, key)
    row = wait_until(lambda: started_row(chaos, run), 30, "the activity to be claimed (started)")
    assert row.worker == wid
    assert result(chaos, run, seconds + 30) == "slept"

    (task,) = store.task_rows(run.run_id)
    assert task.state == "done" and task.worker == wid
    assert task.dispatches == 1, f"a held message was re-sent: {task.dispatches} dispatches"
    # The sweeper did look (and found the message held): it moved published_at past lost_after.
    looked = (task.published_at - task.started_at).total_seconds()
    assert looked >= LOST_AFTER - 0.1, f"the sweeper never examined the long task (published {looked:.1f}s after start)"
    # Nothing left to deliver: once acknowledged, no copy is queued or held anywhere.
    wait_until(lambda: not broker_places(chaos, task.id), 10, "the message to be acknowledged")
    assert count(key) == 1, f"the task body ran {count(key)} times, expected once"
    assert "gone from the broker" not in chaos.logs()
    verify_runs(chaos.baton, [(run, "slept")])
    assert worker.poll() is None
    print(f"\nFIGURES held-long-task [{chaos.db.split(':')[0]}]: lost_after={LOST_AFTER}s ran={seconds}s "
          f"dispatches={task.dispatches} executions={count(key)} last_held_check_after_start={looked:.1f}s")
