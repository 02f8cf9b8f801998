"""Flower against the test Redis and a real worker: activities are found by run id through Flower's
HTTP API, and ``baton flower`` serves the workflow pages behind Flower's auth (issue 5, acceptance 4)."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Cluster, wait_for
from tests.dashboards.support import Session

pytestmark = pytest.mark.timeout(180)

USER = "admin:flower-pw"
BASIC = {"Authorization": "Basic " + base64.b64encode(USER.encode()).decode()}
PREFIX = "/flower"
LAUNCH = "import sys; from tests.fixtures.worker_app import app, baton; from dashboards.flower import run_flower; " \
         "run_flower(app, baton, sys.argv[1:])"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_worker_with_events(cluster: Cluster, events: bool = True, **env: str) -> subprocess.Popen[bytes]:
    """Like ``cluster.start_worker`` but with ``-E``, as docs/dashboard.md tells users to run it
    (``events=False``: without, and with its heartbeat, so Flower can turn task events on)."""
    cluster.n += 1
    log = open(cluster.tmp / f"worker{cluster.n}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.fixtures.worker_app", "worker", *(["-E"] if events else []),
         "-P", "prefork", "-c", "2",
         "-n", f"w{cluster.n}-{cluster.queue}@%h", "-Q", cluster.queue, "--without-mingle", "--without-gossip",
         "-l", "INFO"],
        cwd=ROOT, env=cluster.env(**env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    cluster.procs.append(proc)
    cluster.wait_ready(proc)
    return proc


def _start_flower(cluster: Cluster, port: int) -> subprocess.Popen[bytes]:
    log = open(cluster.tmp / "flower.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, f"--port={port}", "--address=127.0.0.1", f"--basic_auth={USER}",
         f"--url_prefix={PREFIX.strip('/')}", f"--conf={ROOT / 'dashboards' / 'flowerconfig.py'}"],
        cwd=ROOT, env=cluster.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    cluster.procs.append(proc)  # stopped (SIGTERM, then SIGKILL) with the workers
    return proc


def _flower_log(cluster: Cluster) -> str:
    path: Path = cluster.tmp / "flower.log"
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def _flower_watching(cluster: Cluster) -> tuple[Session, str]:
    """Start Flower, wait until it answers and sees the cluster's last worker online; its client
    session and that worker's name prefix."""
    port = _free_port()
    flower = _start_flower(cluster, port)
    c = Session(f"http://127.0.0.1:{port}{PREFIX}")

    def up() -> bool:
        assert flower.poll() is None, f"flower exited: {_flower_log(cluster)}"
        try:
            return c.get("/healthcheck").status == 200
        except OSError:
            return False

    wait_for(up, 60, "Flower to answer /healthcheck")
    worker_name = f"w{cluster.n}-{cluster.queue}@"
    # Flower only knows tasks whose events it received: wait until its event receiver sees our worker.
    wait_for(lambda: f'worker="{worker_name}' in c.get("/metrics").text, 60, "Flower to see the worker online")
    return c, worker_name


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_flower_finds_activities_by_run_id_and_serves_workflows(cluster: Cluster) -> None:
    worker = _start_worker_with_events(cluster)
    c, worker_name = _flower_watching(cluster)

    run = cluster.ns.sequence.start(3, workflow_id="flower-seq")
    fan = cluster.ns.fanout.start(3, workflow_id="flower-fan")
    assert run.result(timeout=60) == 3
    assert fan.result(timeout=60)["n"] == 3

    def tasks(search: str, name: str, n: int) -> dict[str, Any] | None:
        resp = c.get(f"/api/tasks?search={search}", headers=BASIC)
        assert resp.status == 200, resp.text
        found: dict[str, Any] = resp.json()
        done = [t for t in found.values() if t["state"] == "SUCCESS" and t["name"] == name]
        return found if len(done) >= n else None

    found = wait_for(lambda: tasks("flower-seq", "t.add", 3), 60, "Flower to list the run's activities as SUCCESS")
    activities = {uuid: t for uuid, t in found.items() if t["name"] == "t.add"}
    assert set(activities) == {"flower-seq:1:0:1", "flower-seq:2:0:1", "flower-seq:3:0:1"}
    for uuid, t in activities.items():
        step = int(uuid.split(":")[1])
        assert "'baton_run': 'flower-seq'" in t["kwargs"] and f"'baton_step': {step}" in t["kwargs"]
        assert t["worker"].startswith(worker_name)
    # Flower's qualified search on the displayed kwargs, and the fan-out's slots.
    exact = wait_for(lambda: tasks("kwargs:baton_run=flower-fan", "t.square", 3), 30,
                     "the kwargs: search to find the fan-out")
    squares = [t for t in exact.values() if t["name"] == "t.square"]
    assert len(squares) == 3 and {t["name"] for t in exact.values()} <= {"t.square", "baton.advance"}
    assert {t["uuid"] for t in squares} == {f"flower-fan:1:{slot}:1" for slot in range(3)}
    assert any("'baton_slot': 2" in t["kwargs"] for t in squares)
    # Baton's internal task is visible under its own baton.* name.
    internal = c.get("/api/tasks?taskname=baton.advance", headers=BASIC).json()
    assert internal and all(t["name"] == "baton.advance" for t in internal.values())
    assert any("flower-seq" in t["kwargs"] for t in internal.values())

    # ---- the Workflows section inside Flower, behind Flower's basic auth
    denied = c.get("/workflows/")
    assert denied.status == 401 and denied.headers["WWW-Authenticate"].startswith("Basic")
    assert "flower-seq" not in denied.text
    assert c.get("/workflows/api/runs").status == 401
    assert c.get("/workflows/api/runs", headers={"Authorization": "Basic " + base64.b64encode(b"admin:no").decode()}
                 ).status == 401
    listing = c.get("/workflows/", headers=BASIC)
    assert listing.status == 200 and 'href="/flower/workflows/runs/flower-seq"' in listing.text
    page = c.get("/workflows/runs/flower-seq", headers=BASIC)
    assert page.status == 200
    link = "/flower/task/flower-seq%3A2%3A0%3A1"
    assert f'href="{link}"' in page.text, "each step links to its task in Flower"
    task_page = c.get(link.removeprefix(PREFIX), headers=BASIC)
    assert task_page.status == 200 and "flower-seq" in task_page.text
    api = c.get("/workflows/api/runs/flower-seq", headers=BASIC).json()
    assert api["steps"][1]["slots"][0]["attempts"][0]["flower"] == link
    assert "baton_runs{status=\"completed\"}" in c.get("/workflows/metrics", headers=BASIC).text

    # ---- actions: a script with basic auth may POST; a browser-like POST without the XSRF token may not
    waiting = cluster.ns.waits.start(1, workflow_id="flower-wait")
    wait_for(lambda: waiting.info()["waiting"], 30, "the run to wait for a signal")
    forged = c.post("/workflows/api/runs/flower-wait/signal", headers={**BASIC, "Origin": "http://evil.example"},
                    body={"name": "msg", "payload": 1})
    assert forged.status == 403
    sent = c.post("/workflows/api/runs/flower-wait/signal", headers=BASIC, body={"name": "msg", "payload": 7})
    assert sent.status == 200, sent.text
    assert waiting.result(timeout=30) == [7]
    assert json.loads(c.get("/workflows/api/runs/flower-wait/version", headers=BASIC).text)["status"] == "completed"
    assert worker.poll() is None


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("events", ["-E", "enable_events"])
def test_flower_lists_eager_steps(cluster: Cluster, events: str) -> None:
    """With ``eager_steps``, a run's steps ride on one message, and Flower never receives the others; the
    pool process sends their task events itself, so Flower lists them all: with the worker started with
    ``-E``, or without it once Flower has turned task events on (``enable_events``, which only the
    worker's main process receives: Baton mirrors it to the pool processes)."""
    _start_worker_with_events(cluster, events=events == "-E", BATON_TEST_EAGER_STEPS="8")
    c, worker_name = _flower_watching(cluster)
    if events == "enable_events":
        wait_for(lambda: "baton: task events on" in cluster.logs(), 30,
                 "the pool processes to follow Flower's enable_events")
    run = cluster.ns.sequence.start(4, workflow_id="eager-seq")
    assert run.result(timeout=60) == 4
    ids = {f"eager-seq:{step}:0:1" for step in range(1, 5)}
    # Steps 1-4 ride on the run's first baton.advance message: the consumer never received them.
    logs = cluster.logs()
    assert all(f"t.add[{i}] succeeded" in logs for i in ids), logs[-3000:]
    assert not any(f"t.add[{i}] received" in logs for i in ids), "the steps should have run eagerly"

    def listed() -> dict[str, Any] | None:
        found = c.get("/api/tasks?search=eager-seq", headers=BASIC).json()
        done = {u: t for u, t in found.items() if t["name"] == "t.add" and t["state"] == "SUCCESS"}
        return done if set(done) == ids else None

    tasks = wait_for(listed, 60, "Flower to list every eager step as SUCCESS")
    for t in tasks.values():
        assert "'baton_run': 'eager-seq'" in t["kwargs"] and t["worker"].startswith(worker_name)
        assert t["runtime"] is not None and t["result"] is not None
