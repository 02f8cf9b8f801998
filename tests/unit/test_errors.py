"""User-code failures become failed decisions; bad yields raise at the yield."""

from __future__ import annotations

import datetime as dt

import pytest

from sdk import (
    ActivityError,
    BatonError,
    Cancelled,
    DefinitionError,
    NonDeterminismError,
    SerializationError,
    SignalTimeout,
    StoreError,
    WorkflowAlreadyStarted,
    WorkflowFailed,
    WorkflowNotFound,
    gather,
)
from sdk.errors import error_from_dict
from sdk.events import RunStatus

from .builder import Sim, line_of, sig, started, workflow


def test_an_escaping_exception_fails_the_run_with_type_message_and_traceback():
    @workflow
    def broken(n):
        got = yield sig("t.load", n)
        return got["missing"]

    d = started(1).scheduled(sig("t.load", 1)).completed(1, {}).replay(broken)

    assert d.status is RunStatus.FAILED
    assert d.error["type"] == "KeyError" and d.error["message"] == "'missing'"
    tb = d.error["traceback"]
    assert tb.startswith("Traceback (most recent call last)") and "KeyError: 'missing'" in tb
    assert f'line {line_of(broken, "return got")}, in broken' in tb
    assert d.step == 1 and d.waiting_on == [] and d.result is None


def test_an_exception_before_the_first_yield_fails_at_start():
    @workflow
    def eager(n):
        if n < 0:
            raise ValueError(f"negative: {n}")
        yield sig("t.x")

    d = started(-1).replay(eager)

    assert d.status is RunStatus.FAILED and d.error["message"] == "negative: -1" and d.step == 0


def test_an_uncaught_activity_error_fails_the_run_and_names_the_task():
    @workflow
    def careless():
        yield sig("t.pay", 10)

    d = started().scheduled(sig("t.pay", 10)).failed(1, "CardDeclined", "insufficient funds").replay(careless)

    assert d.status is RunStatus.FAILED
    assert d.error["type"] == "ActivityError"
    assert d.error["message"] == "t.pay failed: CardDeclined: insufficient funds"


def test_a_caught_activity_error_exposes_the_worker_failure():
    seen = []

    @workflow
    def careful():
        try:
            yield sig("t.pay", 10)
        except ActivityError as err:
            seen.append(err)
            return "fallback"

    d = (started().scheduled(sig("t.pay", 10))
         .failed(1, "CardDeclined", "insufficient funds").replay(careful))

    assert d.status is RunStatus.COMPLETED and d.result == "fallback"
    (err,) = seen
    assert (err.task_name, err.error_type, err.message) == ("t.pay", "CardDeclined", "insufficient funds")
    assert err.traceback == "Traceback: CardDeclined: insufficient funds"


@pytest.mark.parametrize("bad, named", [({1, 2}, "set"), (42, "int"), (object(), "object"), ("t.x", "str"),
                                        (None, "NoneType")])
def test_yielding_an_unsupported_object_raises_type_error_at_that_yield(bad, named):
    @workflow
    def confused():
        try:
            yield bad
        except TypeError as err:
            message = str(err)
        value = yield sig("t.after")
        return [message, value]

    sim = Sim(confused)
    d = sim.decide()
    assert d.status is RunStatus.RUNNING
    assert d.step == 1 and d.activities[0].task == "t.after", "the bad yield consumed no step"
    sim.complete(1, "ok")
    d = sim.decide()
    message, value = d.result
    assert message.startswith(f"cannot yield {named}") and "a workflow may yield" in message
    assert value == "ok"
    sim.verify()


def test_an_uncaught_bad_yield_fails_the_run_with_type_error():
    @workflow
    def confused():
        yield {"not": "a signature"}

    d = started().replay(confused)

    assert d.status is RunStatus.FAILED and d.error["type"] == "TypeError"
    assert "cannot yield dict" in d.error["message"]


def test_a_celery_chain_cannot_be_one_step():
    @workflow
    def chained():
        yield {"task": "celery.chain", "subtask_type": "chain", "args": [], "kwargs": {"tasks": []}, "options": {}}

    d = started().replay(chained)

    assert d.status is RunStatus.FAILED and "a Celery chain cannot be yielded as one step" in d.error["message"]


@pytest.mark.parametrize("empty", [[], ()])
def test_yielding_an_empty_fan_out_raises_value_error_at_the_yield(empty):
    @workflow
    def nothing():
        try:
            yield empty
        except ValueError as err:
            return str(err)

    d = started().replay(nothing)

    assert d.status is RunStatus.COMPLETED
    assert d.result == "cannot yield an empty fan-out: there is nothing to wait for"


def test_empty_gather_is_refused_where_it_is_built():
    with pytest.raises(ValueError, match="gather\\(\\) needs at least one item"):
        gather()


@pytest.mark.parametrize("value, named", [(object(), "object"), ({1, 2}, "set"), (dt.date(2024, 1, 1), "date"),
                                          (float("nan"), "float nan"), ({1: "a"}, "int key")])
def test_returning_a_value_json_cannot_carry_fails_with_serialization_error(value, named):
    @workflow
    def leaky():
        yield sig("t.x")
        return value

    d = started().scheduled(sig("t.x")).completed(1).replay(leaky)

    assert d.status is RunStatus.FAILED
    assert d.error["type"] == "SerializationError"
    assert d.error["message"].startswith("return value of workflow 'leaky'") and named in d.error["message"]
    assert d.result is None


def test_a_result_over_the_payload_limit_fails_the_run():
    @workflow
    def big():
        yield sig("t.x")
        return "x" * 5_000

    sim = Sim(big, max_payload=1_000)
    sim.decide()
    sim.complete(1)
    d = sim.decide()
    assert d.status is RunStatus.FAILED and "over the 1,000-byte payload limit" in d.error["message"]


def test_a_function_that_is_not_a_generator_fails_at_start():
    @workflow
    def plain(x):
        return x

    d = started(1).replay(plain)

    assert d.status is RunStatus.FAILED and d.error["type"] == "TypeError"
    assert "returned int, not a generator" in d.error["message"]


def test_wrong_start_arguments_fail_at_start():
    @workflow
    def needs_two(a, b):
        yield sig("t.x", a, b)

    d = started(1).replay(needs_two)

    assert d.status is RunStatus.FAILED and d.error["type"] == "TypeError"


def test_an_unknown_event_kind_is_corrupt_input():
    @workflow
    def wait():
        yield sig("t.x")

    h = started().scheduled(sig("t.x")).add("activity_exploded", 1, 0)

    with pytest.raises(BatonError, match="unknown history event kind 'activity_exploded' at seq 3"):
        h.replay(wait)


def test_activity_arguments_json_cannot_carry_raise_at_the_yield():
    @workflow
    def dated():
        try:
            yield sig("t.book", dt.date(2024, 1, 1))
        except SerializationError as err:
            return str(err)

    d = started().replay(dated)

    assert d.status is RunStatus.COMPLETED
    assert "date" in d.result
    assert d.activities == []


def test_child_arguments_json_cannot_carry_raise_at_the_yield():
    kid = workflow(lambda when: None, name="kid")

    @workflow
    def parent():
        yield kid.s(dt.date(2024, 1, 1))

    d = started().replay(parent)

    assert d.status is RunStatus.FAILED and d.error["type"] == "SerializationError"
    assert d.children == []


# ---------------------------------------------------------------- the error tree


def test_every_public_error_but_cancelled_is_a_baton_error():
    for cls in (ActivityError, DefinitionError, NonDeterminismError, SerializationError, SignalTimeout,
                StoreError, WorkflowAlreadyStarted, WorkflowFailed, WorkflowNotFound):
        assert issubclass(cls, BatonError), cls
    # thrown into user code: an `except Exception:` must not swallow it
    assert issubclass(Cancelled, BaseException) and not issubclass(Cancelled, Exception)
    assert issubclass(SerializationError, TypeError) and issubclass(WorkflowNotFound, LookupError)


def test_failures_rebuild_from_data():
    act = error_from_dict({"type": "IOError", "message": "disk", "traceback": "tb", "task": "t.w"})
    assert isinstance(act, ActivityError) and str(act) == "t.w failed: IOError: disk" and act.traceback == "tb"

    timeout = error_from_dict({"kind": "signal_timeout", "name": "go", "timeout": 2.5})
    assert isinstance(timeout, SignalTimeout) and str(timeout) == "no signal 'go' arrived within 2.5s"

    child = error_from_dict({"kind": "child", "child": "r/1", "type": "KeyError", "message": "k"})
    assert isinstance(child, WorkflowFailed) and str(child) == "child run r/1 failed: KeyError: k"
    assert child.cause["type"] == "KeyError"

    bare = error_from_dict({}, "t.x")
    assert isinstance(bare, ActivityError) and bare.task_name == "t.x" and bare.error_type == "Exception"


def test_activity_arguments_that_contain_themselves_raise_at_the_yield():
    @workflow
    def looped():
        tree = {"name": "root"}
        tree["parent"] = tree
        try:
            yield sig("t.walk", tree)
        except SerializationError as err:
            return str(err)

    d = started().replay(looped)

    assert d.status is RunStatus.COMPLETED, d.error
    assert d.result.startswith("arguments of t.walk at step 1 is nested too deeply, or contains itself")
    assert d.activities == []


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "replayed"])
def test_a_refused_yield_caught_by_the_workflow_replays_without_a_false_nondeterminism(cache):
    """The refused yield consumed no step: on replay it meets the next step's record, and must
    be refused (and thrown in) again, not taken for changed code."""
    @workflow
    def careful():
        try:
            yield sig("t.book", dt.date(2024, 1, 1))
        except SerializationError:
            pass
        booked = yield sig("t.book", "2024-01-01")
        return booked

    sim = Sim(careful, cache=cache)
    first = sim.decide()
    assert [(a.step, a.args) for a in first.activities] == [(1, ["2024-01-01"])]
    sim.complete(1, "ok")
    d = sim.decide()

    assert d.status is RunStatus.COMPLETED and d.result == "ok", d.error


def test_the_payload_limit_counts_utf8_bytes_not_characters():
    @workflow
    def accented():
        yield sig("t.x")
        return "é" * 600  # 600 characters, 1,202 bytes of JSON

    sim = Sim(accented, max_payload=1_000)
    sim.decide()
    sim.complete(1)
    d = sim.decide()
    assert d.status is RunStatus.FAILED and "1,202 bytes of JSON, over the 1,000-byte" in d.error["message"]
