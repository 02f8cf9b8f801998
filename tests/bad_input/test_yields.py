"""Bad yields and bad workflow bodies, driven through the real commit path in this process.

A bad yield raises at that very yield (``TypeError``/``ValueError``/``SerializationError``),
so a workflow may catch it; uncaught, the run fails with the message, which names the thing
and the fix. Either way the store stays consistent: no step is recorded for the bad yield,
nothing is left in flight, and other runs are untouched.
"""

from __future__ import annotations

from typing import Any

import pytest

from sdk import RetryPolicy, first, gather, sleep, sleep_until, step, wait_signal
from sdk.serde import DEFAULT_MAX_PAYLOAD
from tests.bad_input.conftest import drive
from tests.chaos.flows_chaos import NS

pytestmark = pytest.mark.bad_input


def failed_with(ns: NS, handle: Any, error_type: str, *needles: str) -> dict[str, Any]:
    info = drive(ns, handle)
    assert info["status"] == "failed", info
    error = info["error"]
    assert error["type"] == error_type, error
    for needle in needles:
        assert needle in error["message"], f"{needle!r} not in {error['message']!r}"
    store = ns.baton.store
    assert not [t for t in store.task_rows(handle.run_id) if t.state in ("scheduled", "published", "started")]
    assert not [t for t in store.timer_rows(handle.run_id) if not t.fired]
    assert [e.kind for e in handle.history()][-1] == "failed"
    return info


def test_unsupported_object(offline: NS) -> None:
    info = failed_with(offline, offline.yields_int.start(), "TypeError", "cannot yield int 42",
                       "a workflow may yield a Celery signature")
    assert info["step"] == 0, "no step may be recorded for a refused yield"


@pytest.mark.parametrize(("factory", "error_type", "needle"), [
    (lambda: gather(), "ValueError", "gather() needs at least one item"),
    (lambda: first(), "ValueError", "first() needs at least one item"),
    (lambda: sleep(-5), "ValueError", "sleep() needs a duration >= 0, got -5"),
    (lambda: sleep(float("nan")), "ValueError", "sleep() needs a duration >= 0"),
    (lambda: sleep("5"), "TypeError", "sleep() takes seconds (int or float) or a timedelta, not str"),
    (lambda: sleep_until("tomorrow"), "TypeError", "sleep_until() takes a datetime, not str"),
    (lambda: wait_signal(""), "TypeError", "wait_signal() needs a non-empty signal name"),
    (lambda: wait_signal("go", timeout=-1), "ValueError", "wait_signal(timeout=) needs a duration >= 0"),
    (lambda: step({"task": "c.add", "args": [1, 2], "subtask_type": None}, timeout=0), "ValueError",
     "step(timeout=) must be > 0 seconds"),
    (lambda: step("c.add"), "TypeError", "cannot yield str"),
    (lambda: RetryPolicy(max_attempts=0), "ValueError", "RetryPolicy.max_attempts must be >= 1"),
], ids=["gather-nothing", "first-nothing", "negative-sleep", "nan-sleep", "str-sleep", "sleep-until-str",
        "empty-signal-name", "negative-signal-timeout", "zero-step-timeout", "step-of-str", "zero-attempts"])
def test_bad_command_arguments_raise_where_written(factory: Any, error_type: str, needle: str) -> None:
    with pytest.raises(Exception) as err:
        factory()
    assert type(err.value).__name__ == error_type and needle in str(err.value), repr(err.value)


@pytest.mark.parametrize(("flow", "error_type", "needle"), [
    ("yields_empty", "ValueError", "cannot yield an empty fan-out"),
    ("empty_gather", "ValueError", "gather() needs at least one item"),
    ("empty_first", "ValueError", "first() needs at least one item"),
    ("negative_sleep", "ValueError", "sleep() needs a duration >= 0, got -5"),
])
def test_bad_yield_fails_the_run_clearly(offline: NS, flow: str, error_type: str, needle: str) -> None:
    failed_with(offline, getattr(offline, flow).start(), error_type, needle)


def test_unserialisable_task_arguments_raise_at_the_yield(offline: NS) -> None:
    info = drive(offline, offline.bad_yield_args.start())
    assert info["status"] == "completed"
    caught = info["result"]
    assert caught["caught"] == "SerializationError"
    assert "arguments of c.add at step 1" in caught["message"] and "['when']" in caught["message"]
    assert offline.baton.store.task_rows(info["run_id"]) == [], "the refused task was stored or sent"


def test_oversized_task_arguments_are_refused_at_the_source(offline: NS) -> None:
    info = drive(offline, offline.big_yield_args.start(10), results={"c.echo": "ok"})
    assert info["result"] == "unreachable", "a small payload must go through"
    info = drive(offline, offline.big_yield_args.start(DEFAULT_MAX_PAYLOAD + 10))
    assert info["status"] == "completed", info
    assert info["result"]["caught"] == "SerializationError"
    assert "over the 1,048,576-byte payload limit" in info["result"]["message"]
    assert offline.baton.store.task_rows(info["run_id"]) == []


def test_unserialisable_return_value(offline: NS) -> None:
    handle = offline.returns_object.start()
    info = drive(offline, handle, results={"c.add": 2})
    assert info["status"] == "failed", info
    assert info["error"]["type"] == "SerializationError"
    assert "return value of workflow 'returns_object'" in info["error"]["message"]


def test_workflow_that_never_yields_completes(offline: NS) -> None:
    handle = offline.never_yields.start(21)
    info = drive(offline, handle)
    assert info["status"] == "completed" and info["result"] == 42
    assert handle.checkpoint() is None, "a run that never yielded has no checkpoint"
    assert [e.kind for e in handle.history()] == ["started", "completed"]


def test_generator_swallowing_cancelled_still_ends_cancelled(offline: NS) -> None:
    handle = offline.swallows_and_returns.start()
    drive(offline, handle)
    assert handle.cancel("stop")
    info = drive(offline, handle)
    assert info["status"] == "cancelled", "a generator that swallows Cancelled must not complete the run"
    assert info["result"] is None


def test_except_exception_does_not_catch_cancelled(offline: NS) -> None:
    handle = offline.catches_exception.start()
    drive(offline, handle)
    handle.cancel("stop")
    info = drive(offline, handle)
    assert info["status"] == "cancelled" and info["result"] is None


def test_generator_swallowing_cancelled_forever_can_still_be_stopped(offline: NS) -> None:
    handle = offline.swallows_forever.start("k")
    drive(offline, handle, results={"c.echo": "k"})
    assert handle.cancel("first")
    info = drive(offline, handle, results={"c.echo": "k"})
    assert info["status"] == "running"  # the cleanup step ran, and the loop waits again: allowed
    second = handle.cancel("second")
    info = drive(offline, handle, results={"c.echo": "k"})
    assert second and info["status"] == "cancelled", (
        "cancel() on a running run whose generator swallowed the first Cancelled should end it "
        "(or at least raise an error saying why it cannot)")
