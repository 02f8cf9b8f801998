"""Helpers for driving the ``baton`` command line as a subprocess against real workers."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT, Cluster

APP = "tests.fixtures.worker_app:app"

Baton = Callable[..., subprocess.CompletedProcess[str]]


def run_cli(args: list[str], env: dict[str, str], cwd: Path = ROOT,
            timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``baton ARGS`` (as ``python -m sdk.cli``), output captured as text, wide enough not to wrap tables."""
    env = {**env, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run([sys.executable, "-m", "sdk.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def baton(cluster: Cluster) -> Baton:
    """Run ``baton -A tests.fixtures.worker_app:app ARGS`` with the cluster's broker, database and queue."""
    def call(*args: str, app: str | None = APP, timeout: float = 90, **env: str) -> subprocess.CompletedProcess[str]:
        prefix = ["-A", app] if app else []
        return run_cli([*prefix, *args], cluster.env(**env), timeout=timeout)
    return call


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


def fails(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A one-line error on stderr, no traceback, exit code 1; returns the line."""
    assert result.returncode == 1, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert len(err.splitlines()) == 1, f"more than one line:\n{err}"
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
