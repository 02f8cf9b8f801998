"""``baton dashboard`` and ``baton flower`` serve HTTP for the app named by -A, and stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.cli.conftest import APP, free_port
from tests.conftest import ROOT, Cluster, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]


@contextmanager
def serving(cluster: Cluster, tmp_path: Path, *args: str) -> Iterator[Path]:
    log = tmp_path / f"{args[0]}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "sdk.cli", "-A", APP, *args], cwd=ROOT, env=cluster.env(),
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield log
        assert proc.poll() is None, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


@pytest.mark.timeout(180)
def test_dashboard_lists_runs_and_honours_its_token(cluster: Cluster, tmp_path: Path) -> None:
    run = cluster.ns.sequence.start(2, workflow_id="dash-run")  # no worker needed: the dashboard reads the store
    port = free_port()
    with serving(cluster, tmp_path, "dashboard", "--port", str(port)) as log:
        status, body = wait_for(lambda: (r := get(f"http://127.0.0.1:{port}/api/runs"))[0] and r, 90,
                                f"the dashboard on port {port}: {log.read_text()[-2000:]}")
        assert status == 200, body
        assert run.id in body and json.loads(body)
        assert f"http://127.0.0.1:{port}/" in log.read_text()
    port = free_port()
    with serving(cluster, tmp_path, "dashboard", "--port", str(port), "--token", "s3cret"):
        url = f"http://127.0.0.1:{port}/api/runs"
        status, _ = wait_for(lambda: (r := get(url))[0] and r, 90, "the dashboard with a token")
        assert status == 401
        status, body = get(url, token="s3cret")
        assert status == 200 and run.id in body


@pytest.mark.timeout(180)
def test_flower_serves_with_the_workflow_pages(cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    with serving(cluster, tmp_path, "flower", f"--port={port}", "--address=127.0.0.1") as log:
        status, body = wait_for(lambda: (r := get(f"http://127.0.0.1:{port}/healthcheck"))[0] and r, 90,
                                f"flower on port {port}: {log.read_text()[-2000:]}")
        assert status == 200 and body.strip() == "OK"
        wait_for(lambda: "Baton workflows at" in log.read_text(), 30, "flower's banner")
