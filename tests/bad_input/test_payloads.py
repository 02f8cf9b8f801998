"""Arguments and signal payloads that JSON cannot carry, or that are over the size limit, are
refused where they are passed (before anything is stored), naming the value and the fix."""

from __future__ import annotations

import math
from typing import Any

import pytest

from sdk import SerializationError, WorkflowAlreadyStarted
from sdk.serde import DEFAULT_MAX_PAYLOAD
from tests.bad_input.conftest import dispose, one_line_error
from tests.chaos.flows_chaos import NS, build
from tests.chaos.support import counter_url

pytestmark = pytest.mark.bad_input
CYCLIC: dict[str, Any] = {"name": "root"}
CYCLIC["parent"] = CYCLIC


def nothing_stored(ns: NS) -> None:
    store = ns.baton.store
    assert store.count_runs() == {}, "a refused start left a run behind"


@pytest.mark.parametrize(("value", "needles"), [
    (object(), ["argument 'n'", "object", "JSON cannot carry", "plain data"]),
    ({"db": {"conn": {1, 2}}}, ["argument 'n'", "['db']['conn']", "set"]),
    ({1: "int key"}, ["argument 'n'", "key 1", "int key"]),
    (math.nan, ["argument 'n'", "nan"]),
    ([b"bytes"], ["argument 'n'", "[0]", "bytes"]),
    (CYCLIC, ["argument 'n'", "contains itself", "plain data"]),
], ids=["object", "nested-set", "int-key", "nan", "bytes", "cyclic"])
def test_argument_json_cannot_carry(offline: NS, value: Any, needles: list[str]) -> None:
    with pytest.raises(SerializationError) as err:
        offline.seq.start(value)
    for needle in needles:
        assert needle in str(err.value), f"{needle!r} not in {err.value}"
    assert "workflow 'seq'" in str(err.value)
    nothing_stored(offline)


def test_argument_over_the_default_limit(offline: NS) -> None:
    assert DEFAULT_MAX_PAYLOAD == 1024 * 1024
    with pytest.raises(SerializationError) as err:
        offline.seq.start("x" * DEFAULT_MAX_PAYLOAD)  # 1 MiB of text is 1 MiB + 2 quotes of JSON
    text = str(err.value)
    assert "1,048,576-byte payload limit" in text and "max_payload_bytes" in text and "reference" in text
    nothing_stored(offline)
    assert offline.seq.start(3, start=1000).status() == "running", "a small start must still work"


def test_limit_is_configurable(db_url: str) -> None:
    ns = build("memory://", db_url, queue="small", counter_url=counter_url(), max_payload_bytes=1000)
    try:
        with pytest.raises(SerializationError, match=r"1,000-byte payload limit"):
            ns.seq.start(1, start=10 ** 2000)  # a 2,001-digit int: fine for JSON, too big for this limit
        handle = ns.signalled.start(1)
        with pytest.raises(SerializationError, match=r"payload of signal 'go' is .* over the 1,000-byte"):
            handle.signal("go", "y" * 2000)
        assert ns.baton.store.signal_rows(handle.run_id) == []
    finally:
        dispose(db_url)


def test_signal_payload_json_cannot_carry(offline: NS) -> None:
    handle = offline.signalled.start(1)
    with pytest.raises(SerializationError) as err:
        handle.signal("go", {"at": object()})
    assert "payload of signal 'go'" in str(err.value) and "['at']" in str(err.value)
    with pytest.raises(SerializationError, match="over the 1,048,576-byte payload limit"):
        handle.signal("go", "z" * (DEFAULT_MAX_PAYLOAD + 1))
    assert offline.baton.store.signal_rows(handle.run_id) == [], "a refused signal was stored"
    handle.signal("go", 5)
    assert [s.name for s in offline.baton.store.signal_rows(handle.run_id)] == ["go"]


def test_signal_name_must_be_a_string(offline: NS) -> None:
    handle = offline.signalled.start(1)
    for bad in ("", None, 3):
        with pytest.raises(TypeError, match="non-empty name"):
            handle.signal(bad, 1)  # type: ignore[arg-type]


def test_wrong_arguments_for_the_workflow(offline: NS) -> None:
    with pytest.raises(TypeError) as err:
        offline.seq.start()
    assert "workflow 'seq'" in str(err.value) and "'n'" in str(err.value)
    with pytest.raises(TypeError, match="unexpected keyword argument 'm'"):
        offline.seq.start(1, m=2)
    nothing_stored(offline)


@pytest.mark.parametrize("wid", ["a/b", "x@2", "a:b", "line\nbreak", "w" * 201])
def test_bad_workflow_id(offline: NS, wid: str) -> None:
    with pytest.raises(ValueError, match=r"workflow_id .* must be a non-empty string"):
        offline.seq.start(1, workflow_id=wid)
    nothing_stored(offline)


def test_workflow_id_taken_by_another_workflow(offline: NS) -> None:
    offline.seq.start(1, workflow_id="ticket-1")
    with pytest.raises(WorkflowAlreadyStarted) as err:
        offline.fan.start(2, workflow_id="ticket-1")
    assert "'ticket-1'" in str(err.value) and "'seq'" in str(err.value) and "another workflow_id" in str(err.value)
    assert offline.baton.get("ticket-1").workflow == "seq"


def test_unknown_status_filter(offline: NS) -> None:
    with pytest.raises(ValueError, match="unknown status 'done'; one of running, completed"):
        offline.baton.list(status="done")


def test_malformed_json_on_the_cli(cli: Any, offline: NS) -> None:
    one_line_error(*cli("start", "seq", "[1,"), "ARGS is not valid JSON", "quote it")
    one_line_error(*cli("start", "seq", "{'n': 1}"), "ARGS is not valid JSON")
    assert offline.baton.store.count_runs() == {}
    handle = offline.signalled.start(1)
    one_line_error(*cli("signal", handle.id, "go", "{bad"), "signal payload is not valid JSON")
    assert offline.baton.store.signal_rows(handle.run_id) == []
