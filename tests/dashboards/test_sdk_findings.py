"""Behaviour of sdk/ found while building the dashboard, pinned by tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def test_info_timestamps_are_timezone_aware_on_sqlite(offline_baton: Any) -> None:
    run = offline_baton.ns_idle.start("x", workflow_id="tz-check")
    assert run.history()[0].at.tzinfo is not None  # events: aware
    info = run.info()
    assert info["created_at"].tzinfo is not None, "info()['created_at'] is naive"
    assert (datetime.now(UTC) - info["created_at"]).total_seconds() >= 0  # TypeError when naive
