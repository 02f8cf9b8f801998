"""Fixtures of the chaos suite: a worker cluster with short recovery knobs, a private Redis to
wipe, and a private PostgreSQL to restart (the machine's shared servers are never touched).

Every test under tests/chaos/ is marked ``chaos`` by tests/conftest.py; run them alone with
``pytest -m chaos``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.support import ChaosCluster, PgServer, RedisServer


@pytest.fixture
def chaos(broker_url: str, db_url: str, tmp_path: Path) -> Iterator[ChaosCluster]:
    """Workers on the test's Redis db and database (sqlite or postgres), knobs shortened."""
    c = ChaosCluster(broker_url, db_url, tmp_path)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (no persistence), to kill and restart empty."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def private_pg() -> Iterator[PgServer]:
    """A PostgreSQL cluster of the session's own (initdb once), to stop and start mid-run."""
    server = PgServer()
    server.init()
    server.start()
    try:
        yield server
    finally:
        server.destroy()
