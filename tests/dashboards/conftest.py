"""Fixtures for the dashboard tests that need no worker: a Baton on an in-memory broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def offline_baton(tmp_path: Path) -> Iterator[Any]:
    """A Baton whose runs exist in SQLite but never advance (nothing consumes the memory broker)."""
    from celery import Celery

    from persistence.store import Store
    from sdk import Baton, wait_signal

    app = Celery("dash_offline", broker="memory://", set_as_current=False)
    baton = Baton(app, database_url=f"sqlite:///{tmp_path / 'offline.sqlite3'}")

    @baton.workflow
    def idle(label: str):  # type: ignore[no-untyped-def]
        yield wait_signal("go")
        return label

    baton.ns_idle = idle
    try:
        yield baton
    finally:
        for key, store in list(Store._cache.items()):
            if key[0] == baton.database_url:
                store.engine.dispose()
                if store.reader is not store.engine:
                    store.reader.dispose()
                Store._cache.pop(key, None)
