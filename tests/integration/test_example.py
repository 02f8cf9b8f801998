"""examples/coding_agent.py on Redis + PostgreSQL, with two real workers and one of them SIGKILLed mid fan-out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from sdk import Baton
from tests.conftest import ROOT, wait_for

pytestmark = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)

EXPECTED = {
    "ticket": "reject negative values", "merged": True, "files_changed": 60, "fix_rounds": 2, "fixes": 7,
    "tests_passed": 60, "ci": "green", "approved_by": "ci",
}


class Workers:
    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env = env
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "examples.coding_agent", "worker", "-P", "prefork", "-c", "2",
                 "-n", f"{name}@%h", "--without-mingle", "--without-gossip", "-l", "INFO"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.tmp.glob("w*.log")))


@pytest.fixture
def workers(broker_url: str, db_url: str, tmp_path: Path) -> Iterator[Workers]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
    env.update(CELERY_BROKER_URL=broker_url, BATON_DATABASE_URL=db_url, PYTHONPATH=str(ROOT),
               BATON_EXAMPLE_WORKSPACE=str(tmp_path / "workspaces"))
    pool = Workers(env, tmp_path)
    try:
        yield pool
    finally:
        for proc in pool.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in pool.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pool.kill(proc)


@pytest.fixture
def agent(broker_url: str, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The example's workflow, registered on a Baton of this test's own (the module's Baton is the workers')."""
    monkeypatch.setenv("CELERY_BROKER_URL", broker_url)  # importing the example must not reach for a default
    monkeypatch.setenv("BATON_DATABASE_URL", db_url)
    from examples import coding_agent as example

    app = Celery("coding-agent-test", broker=broker_url, set_as_current=False)
    baton = Baton(app, database_url=db_url)
    yield baton.workflow(example.coding_agent.fn)
    app.close()


@pytest.mark.timeout(300)
def test_coding_agent_on_redis_and_postgres_survives_a_worker_kill(workers: Workers, agent: Any,
                                                                    tmp_path: Path) -> None:
    baton = agent.baton
    w1, w2 = workers.start("w1"), workers.start("w2")

    def beating() -> bool:
        for proc in (w1, w2):
            assert proc.poll() is None, workers.logs()
        ids = [w.id for w in baton.store.workers()]
        return all(any(i.endswith(f"/{p.pid}") for i in ids) for p in (w1, w2))

    wait_for(beating, 90, "both workers to heartbeat")
    run = agent.start("reject negative values", workflow_id="agent-1")

    held: list[str] = []

    def victim_busy_mid_fanout() -> bool:
        cp = run.checkpoint()
        if cp is None:
            return False
        rows = baton.store.task_rows(run.run_id)
        here = [t for t in rows if t.step == cp.step]
        done = sum(t.state == "done" for t in here)
        held[:] = [t.id for t in here if t.state == "started" and t.worker and t.worker.endswith(f"/{w1.pid}")]
        return len(here) >= 50 and 10 <= done < len(here) - 5 and bool(held)

    wait_for(victim_busy_mid_fanout, 120, "worker w1 to be running tasks of a fan-out", interval=0.02)
    workers.kill(w1)

    def asks_for_approval() -> bool:
        assert run.status() == "running", run.info()
        cp = run.checkpoint()
        return cp is not None and any(w.get("name") == "approval" for w in cp.waiting_on)

    wait_for(asks_for_approval, 180, f"the agent to ask for approval\n{workers.logs()}", interval=0.2)
    run.signal("approval", {"approved": True, "by": "ci"})
    result = run.result(timeout=120)

    assert {k: result[k] for k in EXPECTED} == EXPECTED
    assert len(result["commit"]) == 12
    assert "Added input validation to 60 handlers" in result["summary"]
    assert run.checkpoint().step == 38

    history = run.history()
    fanouts = [e for e in history if e.kind == "step_scheduled" and e.name == "all[60]"]
    assert len(fanouts) == 3, [e.name for e in history if e.kind == "step_scheduled"]
    retried = [e for e in history if e.kind == "attempt_scheduled"]
    assert retried and retried[0].payload["after"] == "RuntimeError"  # the model's 429, retried by RetryPolicy
    assert any(e.kind == "timer_fired" for e in history)
    assert any(e.kind == "signal_received" and e.name == "approval" for e in history)

    rows = baton.store.task_rows(run.run_id)
    finishers = {t.worker.split("@")[0] for t in rows if t.state == "done" and t.worker}
    assert finishers == {"w1", "w2"}, finishers
    by_id = {t.id: t for t in rows}
    # What w1 was running when it died was re-sent and finished by w2 (or had just been recorded by w1).
    assert all(by_id[i].state == "done" for i in held), [(i, by_id[i].state, by_id[i].worker) for i in held]

    repo = next((tmp_path / "workspaces").glob("repo-*"))
    handlers = sorted((repo / "service" / "handlers").glob("h_*.py"))
    assert len(handlers) == 60
    assert all("if value < 0:" in h.read_text() for h in handlers)
    assert [p.name for p in (repo / ".commits").iterdir()] == [result["commit"]]
