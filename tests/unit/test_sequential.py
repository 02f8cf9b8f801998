"""One step after another: each yield is a step, each result resumes the generator."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sdk import RetryPolicy, step
from sdk.events import ActivityTask, Checkpoint, RunStatus

from .builder import T0, Sim, command, line_of, sig, started, step_event, workflow


@workflow
def order(x, y):
    total = yield sig("t.add", x, y)
    doubled = yield sig("t.mul", total, factor=2)
    return {"total": total, "doubled": doubled}


def test_first_yield_schedules_the_first_activity():
    d = started(1, 2).replay(order)

    line = line_of(order, 'yield sig("t.add"')
    assert d.status is RunStatus.RUNNING
    assert d.events == [step_event(1, sig("t.add", 1, 2), line)]
    assert d.activities == [ActivityTask(1, 0, 1, "t.add", [1, 2], {}, {}, None, None)]
    assert d.timers == [] and d.children == [] and d.cancels == []
    assert d.step == 1
    assert d.waiting_on == [{**command(sig("t.add", 1, 2))["leaves"][0], "slot": 0, "attempt": 1}]
    assert d.checkpoints == [Checkpoint(1, {"file": __file__, "line": line, "function": "order"},
                                        {"x": 1, "y": 2}, d.waiting_on, T0)]


def test_a_result_resumes_the_generator_with_it():
    d = started(1, 2).scheduled(sig("t.add", 1, 2)).completed(1, 3).replay(order)

    assert d.events == [step_event(2, sig("t.mul", 3, factor=2), line_of(order, 'yield sig("t.mul"'))]
    assert d.activities == [ActivityTask(2, 0, 1, "t.mul", [3], {"factor": 2}, {}, None, None)]
    assert d.step == 2
    assert d.checkpoints[0].locals == {"x": 1, "y": 2, "total": 3}


def test_an_unresolved_step_decides_nothing_new():
    d = started(1, 2).scheduled(sig("t.add", 1, 2)).replay(order)

    assert d.status is RunStatus.RUNNING
    assert d.events == [] and d.activities == [] and d.checkpoints == []
    assert d.step == 1


def test_the_last_result_completes_the_run():
    h = (started(1, 2)
         .scheduled(sig("t.add", 1, 2)).completed(1, 3)
         .scheduled(sig("t.mul", 3, factor=2)).completed(2, 6))

    d = h.replay(order)

    assert d.status is RunStatus.COMPLETED
    assert d.result == {"total": 3, "doubled": 6}
    assert d.error is None and d.events == [] and d.waiting_on == []
    assert d.step == 2


def test_a_recorded_completion_replays_to_the_same_end():
    h = (started(1, 2)
         .scheduled(sig("t.add", 1, 2)).completed(1, 3)
         .scheduled(sig("t.mul", 3, factor=2)).completed(2, 6)
         .ended("completed", result={"total": 3, "doubled": 6}))

    d = h.replay(order)

    assert d.status is RunStatus.COMPLETED and d.result == {"total": 3, "doubled": 6}
    assert d.events == []


def test_step_by_step_live_run():
    sim = Sim(order, 1, 2)
    assert sim.decide().activities[0].task == "t.add"
    sim.tick(1).complete(1, 3)
    d = sim.decide()
    assert d.activities == [ActivityTask(2, 0, 1, "t.mul", [3], {"factor": 2}, {}, None, None)]
    sim.tick(1).complete(2, 6)
    d = sim.decide()
    assert d.status is RunStatus.COMPLETED and d.result == {"total": 3, "doubled": 6}
    assert sim.kinds() == ["started", "step_scheduled", "activity_completed", "step_scheduled",
                           "activity_completed", "completed"]
    assert [e.at for e in sim.events] == [T0, T0, T0 + timedelta(seconds=1), T0 + timedelta(seconds=1),
                                          T0 + timedelta(seconds=2), T0 + timedelta(seconds=2)]
    sim.verify()


def test_cache_hit_and_cache_miss_record_the_same_history():
    def run(cache: bool) -> list[dict]:
        sim = Sim(order, 4, 5, cache=cache)
        sim.decide()
        sim.complete(1, 9)
        sim.decide()
        sim.complete(2, 18)
        sim.decide()
        return sim.rows

    assert run(cache=True) == run(cache=False)


def test_kwargs_and_the_run_arguments_reach_the_generator():
    @workflow
    def greet(name, *, punct="!"):
        text = yield sig("t.fmt", f"hi {name}{punct}", upper=True)
        return text

    d = started("ann", punct="?").replay(greet)

    assert d.activities == [ActivityTask(1, 0, 1, "t.fmt", ["hi ann?"], {"upper": True}, {}, None, None)]


def test_signature_options_pass_through_but_not_celery_internals():
    @workflow
    def routed():
        s = sig("t.x", 1)
        s["options"] = {"queue": "gpu", "priority": 7, "countdown": 3, "link": ["cb"], "task_id": "mine"}
        yield s

    d = started().replay(routed)

    assert d.activities[0].options == {"queue": "gpu", "priority": 7, "countdown": 3}


def test_a_duplicate_completion_is_ignored():
    h = (started(1, 2).scheduled(sig("t.add", 1, 2)).completed(1, 3)
         .add("activity_completed", 1, 0, {"attempt": 1, "result": 99}))

    d = h.replay(order)

    assert d.activities[0].args == [3]


def test_a_completion_for_another_attempt_is_ignored():
    d = started(1, 2).scheduled(sig("t.add", 1, 2)).completed(1, 3, attempt=2).replay(order)

    assert d.events == [] and d.step == 1


def test_a_workflow_without_waits_finishes_in_its_first_activation():
    @workflow
    def quick(n):
        if False:
            yield
        return n * 2

    d = started(21).replay(quick)

    assert d.status is RunStatus.COMPLETED and d.result == 42 and d.step == 0


def test_yield_from_a_helper_generator_counts_its_steps():
    def fetch(key):
        value = yield sig("t.get", key)
        return value

    @workflow
    def composed():
        a = yield from fetch("a")
        b = yield from fetch("b")
        return a + b

    sim = Sim(composed)
    d = sim.decide()
    assert d.checkpoints[0].position["function"] == "fetch"
    assert d.checkpoints[0].locals == {"key": "a"}
    sim.complete(1, 1)
    assert sim.decide().activities[0].args == ["b"]
    sim.complete(2, 2)
    assert sim.decide().result == 3
    sim.verify()


def test_each_decision_carries_its_run_id_free_of_globals():
    # two runs of the same definition in one process do not share state
    a, b = Sim(order, 1, 1, run_id="a"), Sim(order, 2, 2, run_id="b")
    a.decide()
    b.decide()
    a.complete(1, 2)
    b.complete(1, 4)
    assert a.decide().activities[0].args == [2]
    assert b.decide().activities[0].args == [4]


def test_events_already_applied_are_skipped_when_fed_again():
    h = started(1, 2).scheduled(sig("t.add", 1, 2)).completed(1, 3)
    inst, first = h.instance(order, decided_seq=2)
    assert first.activities[0].task == "t.mul"

    again = inst.activate(h.events, now=T0, decided_seq=2)

    assert again.events == [] and again.activities == [] and again.step == 2


@pytest.mark.parametrize("workers", [1, 3], ids=["one-cache", "three-caches"])
def test_a_live_instance_keeps_no_record_of_the_steps_it_has_passed(workers):
    """A cached generator lives as long as its run: what it holds must not grow with the run's
    length (a kilobyte per step once, so 5 MB at step 5,000, times the cache's 1,000 runs)."""
    policy = RetryPolicy(max_attempts=3, initial_interval=0)

    @workflow
    def long_agent(n):
        for i in range(n):
            yield step(sig("t.call", i), retry=policy)
        return n

    sim = Sim(long_agent, 300, workers=workers)
    sim.decide()
    for k in range(1, 301):
        if k % 50 == 0:
            sim.fail(k)  # a retry: its attempt record is consumed too
            sim.decide()
        sim.complete(k, {"content": "x" * 100})
        d = sim.decide()
    assert d.status is RunStatus.COMPLETED and d.result == 300
    live = [inst for inst in sim.caches if inst is not None]
    assert live, "no instance was cached"
    for inst in live:
        assert inst.step >= 295  # caught up on the steps the other caches decided
        assert len(inst.scheduled) + len(inst.attempts) == 0, (len(inst.scheduled), len(inst.attempts))
