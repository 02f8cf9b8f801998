"""Fault 4, duplicate delivery: the same activity message delivered twice (published twice), the
same ``baton.advance`` delivered many times, and a completion that arrives after a timeout-retry
already succeeded. Activities are at-least-once; recorded results must be exactly-once, and
the late or duplicate result is ignored and logged.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from sdk import serde
from tasks.dispatch import HEADER_RUN, HEADER_STEP
from tests.chaos.support import ChaosCluster, backend_cluster, count, verify_runs, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def chaos(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosCluster]:
    """One worker for the module: a threads pool, which cannot kill a timed-out attempt, so a
    hung attempt really does return late; duplicates run side by side in its threads."""
    with backend_cluster(request.param, tmp_path_factory.mktemp(f"dup-{request.param}")) as cluster:
        cluster.start_workers(1, concurrency=4, pool="threads")
        yield cluster


def republish(chaos: ChaosCluster, row: Any) -> None:
    """Publish one more copy of an attempt's message: same task id, same headers (a redelivery)."""
    chaos.ns.app.send_task(
        row.task, args=serde.loads(row.args), kwargs=serde.loads(row.kwargs), task_id=row.id,
        headers={HEADER_RUN: row.run_id, HEADER_STEP: row.step, "baton_slot": row.slot,
                 "baton_attempt": row.attempt})


def completions(run: Any) -> Counter[tuple[int | None, int | None]]:
    return Counter((e.step, e.slot) for e in run.history() if e.kind == "activity_completed")


def test_same_message_delivered_twice(chaos: ChaosCluster) -> None:
    key = f"dup-{chaos.queue}"
    run = chaos.ns.slow_seq.start(3, 1.0, key)
    fan = chaos.ns.slow_fan.start(3, 0.5, key)
    store = chaos.baton.store

    # While step 1 runs: a second copy of its message runs alongside it in another pool process.
    first = wait_until(lambda: next((t for t in store.task_rows(run.run_id) if t.state == "started"), None),
                       30, "step 1 to start")
    republish(chaos, first)
    for row in store.task_rows(fan.run_id):
        republish(chaos, row)  # every slot of a fan-out, twice
    assert run.result(timeout=60) == [0, 1, 2]
    assert fan.result(timeout=60) == 3
    for _ in range(3):
        chaos.ns.baton.runtime.advance_task.apply_async((run.run_id,))  # duplicate advances: no-ops

    # After the end: every message of the run delivered once more.
    last_seq = store.get_run(run.run_id).last_seq
    executed_before = count(key)
    for row in store.task_rows(run.run_id):
        republish(chaos, row)
    wait_until(lambda: count(key) >= executed_before + 3, 30, "the post-completion duplicates to run")
    ignored = rf"(late or duplicate result for {re.escape(run.run_id)}:\d:0:1 ignored" \
              rf"|{re.escape(run.run_id)}:\d:0:1 ran again after its attempt was settled)"
    wait_until(lambda: len(re.findall(ignored, chaos.logs())) >= 3, 30, "the ignored duplicates to be logged")

    assert store.get_run(run.run_id).last_seq == last_seq, "a duplicate after the end changed the history"
    verify_runs(chaos.baton, [(run, [0, 1, 2]), (fan, 3)])
    assert max(completions(run).values()) == 1 and max(completions(fan).values()) == 1
    # The fan-out's duplicates may still be queued behind the rest: wait for all of them to run.
    wait_until(lambda: count(key) >= 3 + 3 + 1 + 3 + 3, 60, "every duplicate to run")
    executions = count(key)
    logged = chaos.logs()
    assert "late or duplicate result for" in logged or "ran again after its attempt was settled" in logged
    print(f"\nFIGURES duplicates [{chaos.db.split(':')[0]}]: activities=6 executions={executions} "
          f"completions_recorded={sum(completions(run).values()) + sum(completions(fan).values())}")


def test_late_completion_after_timeout_retry(chaos: ChaosCluster) -> None:
    key = f"late-{chaos.queue}"
    run = chaos.ns.hung.start(key, 6.0, 1.5)
    assert run.result(timeout=60) == "fresh"
    seq_at_end = chaos.baton.store.get_run(run.run_id).last_seq
    wait_until(lambda: count(f"{key}:late-returned") == 1, 30, "the hung first attempt to return")
    late_id = f"{run.run_id}:1:0:1"
    wait_until(lambda: f"late or duplicate result for {late_id} ignored" in chaos.logs(), 30,
               "the late result to be ignored and logged")

    events = run.history()
    done = [e for e in events if e.kind == "activity_completed"]
    failed = [e for e in events if e.kind == "activity_failed"]
    assert [(e.step, e.slot, e.payload["attempt"], e.payload["result"]) for e in done] == [(1, 0, 2, "fresh")]
    assert [(e.payload["attempt"], e.payload.get("timed_out")) for e in failed] == [(1, True)]
    assert chaos.baton.store.get_run(run.run_id).last_seq == seq_at_end, "the late result changed the history"
    verify_runs(chaos.baton, [(run, "fresh")], failures_ok=True)
