"""An unknown run id, everywhere a run id is taken: the API, the CLI and the dashboard each say
"no run with id ..." and how to find the right one; nothing is created by asking."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from sdk import WorkflowNotFound
from tests.bad_input.conftest import one_line_error
from tests.chaos.flows_chaos import NS

pytestmark = pytest.mark.bad_input

MISSING = "no-such-run-42"


@pytest.mark.parametrize("call", [
    lambda b: b.get(MISSING),
    lambda b: b.resume(MISSING),
    lambda b: b.fork(MISSING, at_step=1),
], ids=["get", "resume", "fork"])
def test_unknown_id_in_the_client(offline: NS, call: Callable[[Any], Any]) -> None:
    with pytest.raises(WorkflowNotFound) as err:
        call(offline.baton)
    assert f"no run with id {MISSING!r}" in str(err.value) and "baton ls" in str(err.value)
    assert offline.baton.store.count_runs() == {}


@pytest.mark.parametrize("method", ["status", "result", "signal", "cancel", "checkpoint", "history", "info",
                                    "diagnose"])
def test_unknown_id_on_a_handle(offline: NS, method: str) -> None:
    from sdk import WorkflowHandle

    handle = WorkflowHandle(offline.baton, MISSING)  # a handle built by hand, e.g. from a stale id
    args: dict[str, tuple[Any, ...]] = {"signal": ("go", 1), "result": (0.1,)}
    with pytest.raises(WorkflowNotFound, match=f"no run with id '{MISSING}'"):
        getattr(handle, method)(*args.get(method, ()))
    assert offline.baton.store.count_runs() == {}


@pytest.mark.parametrize("argv", [
    ["show", MISSING], ["watch", MISSING, "--timeout", "1"], ["signal", MISSING, "go", "1"],
    ["cancel", MISSING], ["resume", MISSING], ["fork", MISSING, "--at", "1"],
], ids=lambda a: a[0])
def test_unknown_id_on_the_cli(cli: Any, offline: NS, argv: list[str]) -> None:
    one_line_error(*cli(*argv), f"no run with id {MISSING!r}")
    assert offline.baton.store.count_runs() == {}


def test_unknown_id_in_the_dashboard(offline: NS) -> None:
    from dashboards.server import Background, make_app

    server = Background(make_app(offline.baton))
    try:
        for path in (f"/runs/{MISSING}", f"/api/runs/{MISSING}", f"/api/runs/{MISSING}/history"):
            try:
                with urllib.request.urlopen(server.url + path, timeout=20) as resp:
                    status, body = resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                status, body = exc.code, exc.read().decode()
            assert status == 404, f"{path}: {status}"
            assert MISSING in body, f"{path}: the 404 does not name the id: {body[:300]}"
            if path.startswith("/api/"):
                assert "no run with id" in json.dumps(json.loads(body))
    finally:
        server.stop()
    assert offline.baton.store.count_runs() == {}
