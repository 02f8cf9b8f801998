"""Races: ``first(...)`` resumes with the first leaf to settle and cancels the others."""

from __future__ import annotations

from datetime import timedelta

from sdk import ActivityError, first, sleep, wait_signal
from sdk.events import CancelTask, RunStatus, TimerTask

from .builder import RUN, T0, Sim, line_of, sig, started, step_event, workflow


@workflow
def fastest():
    index, value = yield first(sig("t.a"), sig("t.b"), sig("t.c"))
    after = yield sig("t.next", index, value)
    return after


def test_a_race_is_one_step_scheduling_every_leaf():
    d = started().replay(fastest)

    race = first(sig("t.a"), sig("t.b"), sig("t.c"))
    assert d.events == [step_event(1, race, line_of(fastest, "first(sig"))]
    assert d.events[0].name == "first[3]"
    assert [(a.step, a.slot, a.task) for a in d.activities] == [(1, 0, "t.a"), (1, 1, "t.b"), (1, 2, "t.c")]


def test_the_winner_resumes_the_generator_and_the_losers_are_cancelled():
    sim = Sim(fastest)
    sim.decide()
    sim.complete(1, "B", slot=1)
    d = sim.decide()

    assert d.cancels == [CancelTask(1, 0, "activity"), CancelTask(1, 2, "activity")]
    assert d.activities[0].task == "t.next" and d.activities[0].args == [1, "B"]
    sim.verify()


def test_late_loser_results_are_ignored():
    sim = Sim(fastest)
    sim.decide()
    sim.complete(1, "B", slot=1)
    sim.decide()
    sim.complete(1, "A", slot=0).fail(1, slot=2)
    d = sim.decide()
    assert d.status is RunStatus.RUNNING
    assert d.events == [] and d.activities == [] and d.cancels == []
    assert d.step == 2
    sim.complete(2, "done")
    assert sim.decide().result == "done"
    sim.verify()


def test_a_loser_result_already_in_the_same_batch_is_ignored():
    h = started().scheduled(first(sig("t.a"), sig("t.b"), sig("t.c"))).completed(1, "C", slot=2).completed(1, "A")

    d = h.replay(fastest, decided_seq=2)

    assert d.activities[0].args == [2, "C"]
    # slot 0's result is in the history but was not yet applied when the race was decided:
    # cancelling it is harmless, the store only stops attempts still outstanding
    assert d.cancels == [CancelTask(1, 0, "activity"), CancelTask(1, 1, "activity")]


def test_replaying_a_decided_race_does_not_cancel_again():
    h = (started().scheduled(first(sig("t.a"), sig("t.b"), sig("t.c"))).completed(1, "B", slot=1)
         .scheduled(sig("t.next", 1, "B")))

    assert h.replay(fastest).cancels == []
    # the same input not yet decided (a crash before the commit): its cancels are issued
    assert h.replay(fastest, decided_seq=2).cancels != []


def test_a_failing_winner_raises_at_the_yield_and_still_cancels_the_rest():
    @workflow
    def brittle():
        try:
            yield first(sig("t.a"), sig("t.b"))
        except ActivityError as err:
            return err.task_name

    sim = Sim(brittle)
    sim.decide()
    sim.fail(1, "RuntimeError", "down", slot=0)
    d = sim.decide()
    assert d.status is RunStatus.COMPLETED and d.result == "t.a"
    assert d.cancels == [CancelTask(1, 1, "activity")]
    sim.verify()


def test_a_timer_bounds_an_activity():
    @workflow
    def bounded():
        index, value = yield first(sig("t.slow"), sleep(timedelta(seconds=30)))
        return "timeout" if index == 1 else value

    sim = Sim(bounded)
    d = sim.decide()
    assert d.timers == [TimerTask(1, 1, "sleep", T0 + timedelta(seconds=30))]
    sim.tick(30).fire(1, slot=1)
    d = sim.decide()
    assert d.status is RunStatus.COMPLETED and d.result == "timeout"
    assert d.cancels == [CancelTask(1, 0, "activity")]
    sim.verify()


def test_losing_children_and_waits_are_cancelled_by_kind():
    kid = workflow(lambda: None, name="kid")

    @workflow
    def contest():
        index, _ = yield first(kid.s(), wait_signal("stop", timeout=60), sleep(5), sig("t.a"))
        return index

    sim = Sim(contest)
    sim.decide()
    sim.complete(1, "a", slot=3)
    d = sim.decide()
    assert d.cancels == [CancelTask(1, 0, "child", f"{RUN}/1.0"), CancelTask(1, 1, "timer"),
                         CancelTask(1, 2, "timer")]
    assert d.result == 3
    sim.verify()


def test_a_buffered_signal_wins_at_once():
    @workflow
    def waiter():
        index, payload = yield first(wait_signal("approve"), sig("t.escalate"))
        return [index, payload]

    sim = Sim(waiter)
    sim.signal("approve", {"by": "ann"})
    d = sim.decide()
    assert d.consumed_signals == [1]
    assert d.status is RunStatus.COMPLETED and d.result == [0, {"by": "ann"}]
    assert d.cancels == [CancelTask(1, 1, "activity")]
    sim.verify()


def test_first_resumes_with_an_index_result_tuple():
    seen = []

    @workflow
    def racer():
        out = yield first(sig("t.a"), sig("t.b"))
        seen.append(out)

    started().scheduled(first(sig("t.a"), sig("t.b"))).completed(1, "B", slot=1).replay(racer)
    assert seen == [(1, "B")]
    assert isinstance(seen[0], tuple)
