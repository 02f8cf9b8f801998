"""``baton demo``: end to end on the embedded default, with no TCP connection at all, and cleanup on failure.

A ``sitecustomize`` module on ``PYTHONPATH`` (inherited by the demo's workers) records every
``socket.connect`` through an audit hook, so the test can assert the demo used only Unix sockets.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.embedded import is_running
from tests.conftest import ROOT, wait_for

pytestmark = pytest.mark.integration

HOOK = '''
import os, socket, sys

_LOG = os.path.join({folder!r}, f"{{os.getpid()}}.log")


def _hook(event, args):
    if event == "socket.connect":
        sock, address = args[0], args[1]
        with open(_LOG, "a") as f:
            f.write(f"{{os.getpid()}} {{sock.family.name}} {{address!r}}\\n")


sys.addaudithook(_hook)
'''


def demo_env(tmp_path: Path) -> dict[str, str]:
    hook_dir = tmp_path / "hook"
    connects = tmp_path / "connects"
    hook_dir.mkdir()
    connects.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOOK.format(folder=str(connects)))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELERY_", "BATON_")) and k not in ("PYTHONPATH", "REDIS_URL", "DATABASE_URL")}
    env.update(PYTHONPATH=str(hook_dir), COLUMNS="160", NO_COLOR="1", TERM="dumb")
    return env


def processes_in(directory: Path) -> list[str]:
    """Live processes whose working directory is inside ``directory`` (the demo's workers and broker)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (cwd == str(directory) or cwd.startswith(str(directory) + "/")):
            found.append(f"{pid} ({cwd})")
    return found


def connections(tmp_path: Path) -> list[str]:
    lines = []
    for log in (tmp_path / "connects").glob("*.log"):
        lines += log.read_text().splitlines()
    return lines


@pytest.mark.timeout(420)
def test_demo_completes_with_a_worker_kill_on_unix_sockets_only(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "sdk.cli", "demo", "--dir", str(work)], cwd=ROOT,
                            env=demo_env(tmp_path), capture_output=True, text=True, timeout=400,
                            stdin=subprocess.DEVNULL)
    wall = time.monotonic() - began
    out = result.stdout
    assert result.returncode == 0, f"exit {result.returncode}\n{out}\n{result.stderr}"
    print(f"baton demo wall time: {wall:.1f}s")

    assert "embedded redis-server on" in out and "(no TCP port)" in out
    assert re.search(r"SIGKILLed worker demo1 \(pid \d+\) and its pool at step \d+, holding [1-9]\d* task", out), out
    assert re.search(r"re-run on demo2", out), out
    assert "sent signal 'approval'" in out
    assert re.search(r"run completed: 38 steps, \d+ events, \d+ tasks \(demo1: \d+, demo2: \d+\)", out), out
    assert "the run carried on in the others" in out
    for field in ('"merged": true', '"files_changed": 60', '"tests_passed": 60', '"fix_rounds": 2', '"fixes": 7',
                  '"ci": "green"', '"approved_by": "baton demo"'):
        assert field in out, field
    assert re.search(r"demo finished in \d+\.\ds", out)
    assert "baton -A examples.coding_agent show coding_agent-" in out

    # Only Unix sockets: the embedded broker. No TCP, so nothing reached 127.0.0.1:6379 or :5432.
    seen = connections(tmp_path)
    assert seen, "the audit hook recorded nothing: was sitecustomize loaded?"
    inet = [line for line in seen if " AF_UNIX " not in line]
    assert not inet, f"the demo opened TCP connections: {inet[:5]}"
    assert any(str(work / "broker" / "redis.sock") in line for line in seen)
    assert len({line.split()[0] for line in seen}) >= 3, "the demo process and its workers should all connect"

    with sqlite3.connect(work / "baton.sqlite3") as db:
        rows = db.execute("SELECT workflow, status, step FROM baton_runs").fetchall()
        workers = {w for (w,) in db.execute("SELECT DISTINCT worker FROM baton_tasks WHERE state = 'done'")}
    assert rows == [("coding_agent", "completed", 38)]
    assert {w.split("@")[0] for w in workers} == {"demo1", "demo2"}
    assert not is_running(work / "broker"), "the demo must stop the embedded broker it started"
    assert processes_in(work) == []


def start_demo(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "demo.out"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "sdk.cli", "demo", "--dir", str(tmp_path / "demo"), *args],
                                cwd=ROOT, env=demo_env(tmp_path), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, log


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupting_the_demo_stops_its_workers_and_broker(tmp_path: Path, how: signal.Signals) -> None:
    proc, log = start_demo(tmp_path)
    try:
        text = wait_for(lambda: (t := log.read_text()) and re.search(r"step\s+[1-9]", t) and t, 180,
                        "the demo's run to make progress")
        pids = [int(p) for p in re.findall(r"demo\d \(pid (\d+)\)", text)]
        assert len(pids) == 2
        assert processes_in(tmp_path / "demo")
        os.kill(proc.pid, how)
        assert proc.wait(60) == 130, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert "interrupted" in log.read_text()
    assert "Traceback" not in log.read_text()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # neither the worker nor its pool children are left
    assert not is_running(tmp_path / "demo" / "broker")
    assert processes_in(tmp_path / "demo") == []


@pytest.mark.timeout(300)
def test_a_failing_demo_reports_one_line_and_cleans_up(tmp_path: Path) -> None:
    proc, log = start_demo(tmp_path, "--timeout", "4")
    try:
        assert proc.wait(120) == 1, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text
    assert re.search(r"did not (start|finish) (in time|within 4s)", errors[0]), errors[0]
    assert "Traceback" not in text
    assert not is_running(tmp_path / "demo" / "broker")
    assert processes_in(tmp_path / "demo") == []
