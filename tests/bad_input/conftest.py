"""Fixtures of the bad-input suite.

Most cases need no worker: ``offline`` is the chaos app bound to an in-memory broker (nothing
consumes it) and the test's database, and :func:`drive` advances a run in the test process
through the real commit path (``tasks.advance.advance``), the way a worker would. ``cli`` runs
``baton`` in-process against the same app. The few cases that need real workers share one
cluster per backend (``tests/bad_input/test_with_workers.py``).
"""

from __future__ import annotations

import sys
import types
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.chaos.flows_chaos import NS, build
from tests.chaos.support import counter_url


def dispose(url: str) -> None:
    from persistence.store import Store

    for key, store in list(Store._cache.items()):
        if key[0] == url:
            store.engine.dispose()
            if store.reader is not store.engine:
                store.reader.dispose()
            Store._cache.pop(key, None)


@pytest.fixture
def offline(db_url: str) -> Iterator[NS]:
    """The chaos workflows on an in-memory broker and the test's database (sqlite or postgres)."""
    ns = build("memory://", db_url, queue=f"b{uuid.uuid4().hex[:8]}", counter_url=counter_url())
    try:
        yield ns
    finally:
        dispose(db_url)


def drive(ns: NS, handle: Any, results: dict[str, Any] | None = None, rounds: int = 10) -> dict[str, Any]:
    """Advance ``handle`` in this process until it stops moving; complete its activities with
    ``results[task name]`` (recorded through ``record_attempt``, as a worker's hook does)."""
    from persistence import recording as rec
    from persistence.models import utcnow
    from tasks import advance

    runtime = ns.baton.runtime
    store = ns.baton.store
    results = results or {}
    for _ in range(rounds):
        advance.advance(runtime, handle.run_id)
        pending = [t for t in store.task_rows(handle.run_id) if t.state in ("scheduled", "published", "started")
                   and t.task in results]
        if not pending:
            break
        for t in pending:
            def record(conn: Any, tid: str = t.id, value: Any = results[t.task]) -> Any:
                return rec.record_attempt(conn, store, tid, True, value, utcnow())
            advance.advance(runtime, handle.run_id, before=record)
    info: dict[str, Any] = handle.info()
    return info


def make_cli(ns: NS, capsys: pytest.CaptureFixture[str]) -> tuple[Callable[..., tuple[int, str, str]], str]:
    """``baton -A <ns's app> ARGS`` in this process: returns the caller and the module name it registered."""
    from sdk.cli import main

    name = f"bad_input_app_{uuid.uuid4().hex[:8]}"
    module = types.ModuleType(name)
    module.app = ns.app  # type: ignore[attr-defined]
    module.baton = ns.baton  # type: ignore[attr-defined]
    sys.modules[name] = module

    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = 0
        try:
            main(["-A", name, *args])
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call, name


@pytest.fixture
def cli(offline: NS, capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """``baton -A <offline app> ARGS`` in this process: returns (exit code, stdout, stderr)."""
    call, name = make_cli(offline, capsys)
    yield call
    sys.modules.pop(name, None)


def one_line_error(code: int, out: str, err: str, *needles: str) -> str:
    """The CLI's contract for a user error: exit 1, one line on stderr, no traceback."""
    assert code == 1, f"exit {code}\nstdout: {out}\nstderr: {err}"
    text = err.strip()
    assert text.startswith("error: "), text
    assert len(text.splitlines()) == 1, f"more than one line:\n{text}"
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text
