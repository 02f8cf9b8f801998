"""Bad input that only real workers meet: a task no worker has, results JSON cannot carry, and a
workflow missing from a worker's code. One cluster per backend serves the whole module; its
workers lack the ``never_yields`` workflow until the last test "deploys" it.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from sdk.serde import DEFAULT_MAX_PAYLOAD
from tests.bad_input.conftest import make_cli
from tests.chaos.support import ChaosCluster, backend_cluster, verify_runs, wait_until

pytestmark = [pytest.mark.bad_input, pytest.mark.timeout(120)]

LACKING = "never_yields"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def workers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosCluster]:
    with backend_cluster(request.param, tmp_path_factory.mktemp(f"bad-{request.param}"), lost_after=30.0) as c:
        c.start_workers(1, concurrency=2, BATON_TEST_OMIT=LACKING)
        yield c


def ghost_run(workers: ChaosCluster) -> Any:
    run = workers.ns.ghost.start()
    wait_until(lambda: "unregistered task of type 'c.no_such_task'" in workers.logs()
               and run.checkpoint() is not None, 30, "a worker to receive the message of a task it does not have")
    return run


def test_task_no_worker_has_waits_visibly(workers: ChaosCluster) -> None:
    run = ghost_run(workers)
    assert run.status() == "running", "the run must wait, not fail: a worker with the task may come"
    ck = run.checkpoint()
    assert ck is not None and [w["name"] for w in ck.waiting_on] == ["c.no_such_task"]
    notes = run.diagnose()
    assert any("'c.no_such_task'" in n and "no live worker has registered" in n for n in notes), notes
    assert run.info()["diagnosis"] == notes

    from dashboards.server import Background, make_app

    server = Background(make_app(workers.baton))
    try:
        with urllib.request.urlopen(f"{server.url}/api/runs/{run.id}", timeout=20) as resp:
            detail = json.loads(resp.read())
        with urllib.request.urlopen(f"{server.url}/runs/{run.id}", timeout=20) as resp:
            page = resp.read().decode()
    finally:
        server.stop()
    assert "no live worker has registered" in json.dumps(detail), "the dashboard API does not say so"
    assert "c.no_such_task" in page and "no live worker has registered" in page, "the run page does not say so"
    run.cancel("test over")


def test_baton_show_says_no_worker_has_the_task(workers: ChaosCluster, capsys: pytest.CaptureFixture[str]) -> None:
    run = ghost_run(workers)
    call, _ = make_cli(workers.ns, capsys)
    code, out, err = call("show", run.id)
    run.cancel("test over")
    assert code == 0, err
    assert "c.no_such_task" in out
    text = " ".join(out.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())  # the panel's borders
    assert "no live worker has registered" in text, f"`baton show` does not say so:\n{out}"


def test_results_json_cannot_carry_are_refused_at_the_source(workers: ChaosCluster) -> None:
    bad = workers.ns.bad_result.start()
    big = workers.ns.big_result.start(DEFAULT_MAX_PAYLOAD + 10)
    out = bad.result(timeout=60)
    assert out["caught"] == "SerializationError"
    assert "return value of task 'c.unserialisable'" in out["message"] and "['when']" in out["message"]
    out = big.result(timeout=60)
    assert out["caught"] == "SerializationError"
    assert "over the 1,048,576-byte payload limit" in out["message"]
    for handle in (bad, big):
        failed = [e for e in handle.history() if e.kind == "activity_failed"]
        assert len(failed) == 1 and len(json.dumps(failed[0].payload)) < 10_000, "the refused value was stored"


def test_values_that_contain_themselves_are_refused_and_the_worker_lives_on(workers: ChaosCluster) -> None:
    """Before: the encoder's recursion escaped as a RecursionError, the worker exited so that the
    message would be redelivered, and the redelivery killed the next worker the same way."""
    alive = [p.pid for p in workers.alive()]
    out = workers.ns.cyclic_values.start().result(timeout=60)
    (result_type, result_msg), (arg_type, arg_msg) = out["caught"]
    assert result_type == "SerializationError" and "return value of task 'c.cyclic'" in result_msg
    assert "contains itself" in result_msg
    assert arg_type == "SerializationError" and "arguments of c.add" in arg_msg and "contains itself" in arg_msg
    assert out["total"] == 2
    assert [p.pid for p in workers.alive()] == alive, "a worker died on the value"


def test_a_result_with_a_lone_surrogate_is_refused_and_the_worker_lives_on(workers: ChaosCluster) -> None:
    """A file name decoded with ``surrogateescape`` is valid JSON to Python's encoder but not
    UTF-8: neither store's driver takes it. Refused at the source, like any result JSON cannot carry."""
    alive = [p.pid for p in workers.alive()]
    out = workers.ns.bad_result.start("c.surrogate").result(timeout=60)
    assert out["caught"] == "SerializationError"
    assert "return value of task 'c.surrogate'" in out["message"] and "lone surrogate" in out["message"]
    assert [p.pid for p in workers.alive()] == alive, "a worker died on the value"


def test_bad_runs_fail_alone(workers: ChaosCluster) -> None:
    ns = workers.ns
    bad = {"yields_int": "cannot yield int 42", "yields_empty": "cannot yield an empty fan-out",
           "negative_sleep": "sleep() needs a duration >= 0", "empty_first": "first() needs at least one item",
           "returns_object": "return value of workflow 'returns_object'"}
    handles = {name: getattr(ns, name).start() for name in bad}
    good = [(ns.seq.start(3, i), i + 3) for i in range(4)] + [(ns.fan.start(3), 3)]
    for name, needle in bad.items():
        wait_until(lambda h=handles[name]: h.status() != "running", 60, f"{name} to end")
        info = handles[name].info()
        assert info["status"] == "failed" and needle in info["error"]["message"], (name, info["error"])
    for h, _ in good:
        wait_until(lambda h=h: h.status() != "running", 60, "the good runs to end")
    verify_runs(workers.baton, good)


def test_workflow_missing_on_the_worker_runs_once_deployed(workers: ChaosCluster) -> None:
    run = workers.ns.never_yields.start(4)
    wait_until(lambda: f"no workflow named '{LACKING}' is registered in this process" in workers.logs(), 30,
               "the lacking worker to report the missing workflow")
    assert "import the module that defines it" in workers.logs()
    assert run.status() == "running" and run.history()[-1].kind == "started", "nothing may be recorded"
    assert any(f"no live worker has workflow '{LACKING}'" in n for n in run.diagnose()), run.diagnose()
    # Deploy: the old worker is replaced by one with the code; the sweeper re-drives the run.
    old = workers.alive()
    workers.start_workers(1, concurrency=2)
    for proc in old:
        workers.kill(proc)
    assert run.result(timeout=45) == 8
    assert [e.kind for e in run.history()] == ["started", "completed"]
