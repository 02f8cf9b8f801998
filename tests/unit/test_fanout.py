"""Fan-out: a list, tuple, group or ``gather(...)`` is one step whose leaves all run."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sdk import ActivityError, SignalTimeout, WorkflowFailed, first, gather, sleep, wait_signal
from sdk.events import ActivityTask, ChildTask, RunStatus, TimerTask

from .builder import RUN, T0, Sim, line_of, sig, started, step_event, workflow


@workflow
def squares(n):
    results = yield [sig("t.square", i) for i in range(n)]
    return results


def test_a_list_is_one_step_with_one_task_per_item():
    d = started(3).replay(squares)

    items = [sig("t.square", i) for i in range(3)]
    assert d.events == [step_event(1, items, line_of(squares, "yield [sig"))]
    assert d.events[0].name == "all[3]"
    assert d.activities == [ActivityTask(1, slot, 1, "t.square", [slot], {}, {}, None, None) for slot in range(3)]
    assert [w["slot"] for w in d.waiting_on] == [0, 1, 2]


def test_results_come_back_in_item_order_whatever_the_completion_order():
    sim = Sim(squares, 3)
    sim.decide()
    sim.complete(1, 4, slot=2)
    d = sim.decide()
    assert d.status is RunStatus.RUNNING and d.events == []
    assert [w["slot"] for w in d.waiting_on] == [0, 1]
    sim.complete(1, 0, slot=0).complete(1, 1, slot=1)
    d = sim.decide()
    assert d.status is RunStatus.COMPLETED and d.result == [0, 1, 4]
    sim.verify()


def test_a_tuple_and_a_celery_group_are_fan_outs_too():
    @workflow
    def shapes():
        a = yield (sig("t.a"), sig("t.b"))
        group = {"task": "celery.group", "subtask_type": "group", "args": [], "options": {},
                 "kwargs": {"tasks": [sig("t.c"), sig("t.d")]}}
        b = yield group
        return a + b

    h = started().scheduled([sig("t.a"), sig("t.b")]).completed(1, 1).completed(1, 2, slot=1)
    d = h.replay(shapes)
    assert d.events[0].payload["command"]["mode"] == "all"
    assert [a.task for a in d.activities] == ["t.c", "t.d"]
    d = h.scheduled([sig("t.c"), sig("t.d")]).completed(2, 3).completed(2, 4, slot=1).replay(shapes)
    assert d.result == [1, 2, 3, 4]


def test_the_first_failure_is_raised_once_every_item_has_settled():
    @workflow
    def careful():
        try:
            yield [sig("t.a"), sig("t.b"), sig("t.c")]
        except ActivityError as err:
            return {"task": err.task_name, "type": err.error_type, "message": err.message}

    sim = Sim(careful)
    sim.decide()
    sim.fail(1, "KeyError", "first", slot=1)
    d = sim.decide()
    assert d.status is RunStatus.RUNNING, "a failure must not resume the generator while items run"
    assert d.cancels == []
    sim.fail(1, "ValueError", "second", slot=0)
    assert sim.decide().status is RunStatus.RUNNING
    sim.complete(1, "ok", slot=2)
    d = sim.decide()
    assert d.status is RunStatus.COMPLETED
    assert d.result == {"task": "t.b", "type": "KeyError", "message": "first"}
    sim.verify()


def test_an_uncaught_fan_out_failure_fails_the_run():
    h = started(2).scheduled([sig("t.square", 0), sig("t.square", 1)]).failed(1, "ZeroDivisionError", "nope")
    assert h.replay(squares).status is RunStatus.RUNNING
    d = h.completed(1, 1, slot=1).replay(squares)

    assert d.status is RunStatus.FAILED
    assert d.error["type"] == "ActivityError"
    assert d.error["message"] == "t.square failed: ZeroDivisionError: nope"


def test_gather_with_return_exceptions_hands_back_errors_as_values():
    @workflow
    def tolerant():
        out = yield gather(sig("t.a"), sig("t.b"), return_exceptions=True)
        return {"values": [type(x).__name__ if isinstance(x, Exception) else x for x in out],
                "error_type": out[1].error_type}

    h = (started().scheduled(gather(sig("t.a"), sig("t.b"), return_exceptions=True))
         .completed(1, 10).failed(1, "IOError", "disk", slot=1))

    d = h.replay(tolerant)

    assert d.status is RunStatus.COMPLETED
    assert d.result == {"values": [10, "ActivityError"], "error_type": "IOError"}


def test_gather_return_exceptions_values_are_the_public_error_types():
    seen = {}

    @workflow
    def collect():
        out = yield gather(sig("t.a"), wait_signal("s", timeout=5), ActivityChild.s(), return_exceptions=True)
        seen["out"] = out
        return None

    ActivityChild = workflow(lambda: None, name="kid")
    h = (started().scheduled(gather(sig("t.a"), wait_signal("s", timeout=5), ActivityChild.s(),
                                    return_exceptions=True))
         .failed(1, "ValueError", "a").timer_fired(1, slot=1).child_failed(1, "KeyError", "k", slot=2))

    assert h.replay(collect).status is RunStatus.COMPLETED
    a, s, c = seen["out"]
    assert isinstance(a, ActivityError) and a.task_name == "t.a"
    assert isinstance(s, SignalTimeout) and s.name == "s" and s.timeout == 5
    assert isinstance(c, WorkflowFailed) and c.cause["type"] == "KeyError"


def test_gather_results_list_is_a_list_even_for_one_item():
    @workflow
    def one():
        out = yield gather(sig("t.a"))
        return out

    d = started().scheduled(gather(sig("t.a"))).completed(1, 5).replay(one)
    assert d.result == [5]


def test_a_fan_out_mixes_activities_timers_signals_and_children():
    kid = workflow(lambda x: None, name="kid")

    @workflow
    def mixed():
        out = yield gather(sig("t.a", 1), sleep(30), wait_signal("go", timeout=60), kid.s(7))
        return out

    d = started().replay(mixed)

    assert d.activities == [ActivityTask(1, 0, 1, "t.a", [1], {}, {}, None, None)]
    assert d.timers == [TimerTask(1, 1, "sleep", T0 + timedelta(seconds=30)),
                        TimerTask(1, 2, "signal_timeout", T0 + timedelta(seconds=60))]
    assert d.children == [ChildTask(1, 3, f"{RUN}/1.3", "kid", [7], {})]
    assert d.events[0].payload["leaves"] == [
        {}, {"fire_at": (T0 + timedelta(seconds=30)).isoformat()},
        {"fire_at": (T0 + timedelta(seconds=60)).isoformat()}, {"child": f"{RUN}/1.3"}]

    sim = Sim(mixed)
    sim.decide()
    sim.complete(1, "a", slot=0).fire(1, slot=1).child_completed(1, "k", slot=3).signal("go", {"ok": 1})
    d = sim.decide()
    assert d.consumed_signals == [1]
    assert d.status is RunStatus.COMPLETED and d.result == ["a", None, {"ok": 1}, "k"]
    sim.verify()


def test_one_slot_retries_while_the_others_wait():
    from sdk import RetryPolicy, step

    @workflow
    def partly_flaky():
        out = yield [step(sig("t.flaky"), retry=RetryPolicy(max_attempts=2, initial_interval=1)), sig("t.ok")]
        return out

    sim = Sim(partly_flaky)
    sim.decide()
    sim.complete(1, "fine", slot=1).fail(1, slot=0)
    d = sim.decide()
    assert [(a.slot, a.attempt) for a in d.activities] == [(0, 2)]
    assert d.status is RunStatus.RUNNING
    sim.complete(1, "second try", slot=0)
    assert sim.decide().result == ["second try", "fine"]
    sim.verify()


@pytest.mark.parametrize("bad", [[[sig("t.a")], sig("t.b")], [sig("t.a"), 3]])
def test_a_nested_or_foreign_item_is_a_type_error_at_the_yield(bad):
    @workflow
    def nested():
        try:
            yield bad
        except TypeError as err:
            return str(err)

    d = started().replay(nested)
    assert d.status is RunStatus.COMPLETED and "cannot yield" in d.result
    assert d.events == [] and d.step == 0


def test_a_fan_out_of_activities_reports_its_open_slots_for_the_deferred_fan_in():
    sim = Sim(squares, 3)
    assert sim.decide().fan == (1, 3)
    sim.complete(1, 4, slot=2)
    assert sim.decide().fan == (1, 2)
    sim.complete(1, 0, slot=0).complete(1, 1, slot=1)
    assert sim.decide().fan is None  # resolved: the run has ended


@pytest.mark.parametrize("shape", ["one", "list of one", "with a timer", "with a signal", "race"])
def test_steps_a_single_result_can_resolve_are_not_fan_outs(shape):
    yields = {"one": lambda: sig("t.one"), "list of one": lambda: [sig("t.only")],
              "with a timer": lambda: gather(sig("t.a"), sig("t.b"), sleep(timedelta(seconds=5))),
              "with a signal": lambda: gather(sig("t.a"), sig("t.b"), wait_signal("go")),
              "race": lambda: first(sig("t.a"), sig("t.b"))}

    @workflow
    def flow():
        yield yields[shape]()

    d = Sim(flow).decide()
    assert d.status is RunStatus.RUNNING and d.step == 1
    assert d.fan is None
