"""Cancellation: ``cancel_requested`` throws ``Cancelled`` into the generator at its yield."""

from __future__ import annotations

import pytest

from sdk import Cancelled, gather, sleep, wait_signal
from sdk.events import CancelTask, RunStatus

from .builder import Sim, sig, started, workflow


@workflow
def job():
    yield sig("t.work")
    yield sig("t.more")
    return "done"


def test_cancel_ends_the_run_cancelled_and_stops_what_it_waits_on():
    sim = Sim(job)
    sim.decide()
    sim.cancel("no longer needed")
    d = sim.decide()

    assert d.status is RunStatus.CANCELLED
    assert d.error == {"type": "Cancelled", "message": "no longer needed", "traceback": ""}
    assert d.cancels == [CancelTask(1, 0, "activity")]
    assert d.events == [] and d.activities == [] and d.waiting_on == []
    assert sim.kinds()[-2:] == ["cancel_requested", "cancelled"]
    sim.verify()


def test_cancelled_is_thrown_at_the_current_yield_with_its_reason():
    seen = []

    @workflow
    def watcher():
        try:
            yield sig("t.work")
        except Cancelled as exc:
            seen.append((exc.reason, str(exc)))
            raise

    started().scheduled(sig("t.work")).cancel("budget").replay(watcher)

    assert seen == [("budget", "budget")]


# Dropping a suspended instance closes its generator, which runs `finally:` at the yield; a
# `finally:` that yields then makes Python report "generator ignored GeneratorExit" (an
# unraisable RuntimeError, harmless but noisy). Python cannot drop a generator without this.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_cleanup_yields_in_finally_run_before_the_run_ends_cancelled():
    @workflow
    def tidy():
        try:
            yield sig("t.work")
        finally:
            yield sig("t.release_lock")

    sim = Sim(tidy)
    sim.decide()
    sim.cancel("stop")
    d = sim.decide()
    assert d.status is RunStatus.RUNNING
    assert d.cancels == [CancelTask(1, 0, "activity")]
    assert [(a.step, a.task) for a in d.activities] == [(2, "t.release_lock")]
    sim.complete(2)
    d = sim.decide()
    assert d.status is RunStatus.CANCELLED and d.error["message"] == "stop"
    sim.verify()


def test_except_exception_does_not_catch_cancelled():
    @workflow
    def greedy():
        try:
            yield sig("t.work")
        except Exception:
            yield sig("t.swallowed")
        return "kept going"

    sim = Sim(greedy)
    sim.decide()
    sim.cancel()
    d = sim.decide()
    assert d.status is RunStatus.CANCELLED and d.activities == []
    assert d.error["message"] == "cancelled"
    sim.verify()


def test_a_generator_that_catches_cancelled_and_returns_still_ends_cancelled():
    @workflow
    def stubborn():
        try:
            yield sig("t.work")
        except Cancelled:
            return "ignored it"

    d = started().scheduled(sig("t.work")).cancel("stop").replay(stubborn)

    assert d.status is RunStatus.CANCELLED and d.result is None


def test_a_second_cancel_request_is_ignored_during_cleanup():
    @workflow
    def tidy():
        try:
            yield sig("t.work")
        except Cancelled:
            yield sig("t.cleanup")
            raise

    h = (started().scheduled(sig("t.work")).cancel("first").scheduled(sig("t.cleanup"))
         .add("cancel_requested", payload={"reason": "second"}, key="cancel-2"))

    d = h.replay(tidy, decided_seq=4)
    assert d.status is RunStatus.RUNNING and d.step == 2 and d.cancels == []
    d = h.completed(2).replay(tidy)
    assert d.status is RunStatus.CANCELLED and d.error["message"] == "first"


def test_a_cancel_after_the_end_is_ignored():
    d = (started().scheduled(sig("t.work")).completed(1).scheduled(sig("t.more")).completed(2)
         .ended("completed", result="done").cancel("too late").replay(job))

    assert d.status is RunStatus.COMPLETED and d.result == "done"


def test_cancel_stops_only_the_unsettled_leaves_by_kind():
    @workflow
    def spread():
        yield gather(sig("t.a"), sleep(60), wait_signal("go", timeout=30), sig("t.b"))

    sim = Sim(spread)
    sim.decide()
    sim.complete(1, slot=3)
    sim.decide()
    sim.cancel()
    d = sim.decide()
    assert d.cancels == [CancelTask(1, 0, "activity"), CancelTask(1, 1, "timer"), CancelTask(1, 2, "timer")]
    sim.verify()


def test_replaying_a_cancelled_run_issues_no_cancels():
    d = started().scheduled(sig("t.work")).cancel("x").ended("cancelled", error={}).replay(job)

    assert d.status is RunStatus.CANCELLED and d.cancels == []


def test_cleanup_in_except_cancelled_then_reraise():
    @workflow
    def tidy():
        try:
            yield sig("t.work")
        except Cancelled:
            yield sig("t.release_lock")
            raise

    sim = Sim(tidy)
    sim.decide()
    sim.cancel("stop")
    assert [a.task for a in sim.decide().activities] == ["t.release_lock"]
    sim.complete(2)
    assert sim.decide().status is RunStatus.CANCELLED
    sim.verify()


def test_a_cancel_request_before_the_first_decision_cancels_at_the_first_yield():
    sim = Sim(job)
    sim.cancel("changed my mind")
    d = sim.decide()
    assert d.status is RunStatus.CANCELLED
    # the first step was scheduled and stopped within the same decision
    assert d.cancels == [CancelTask(1, 0, "activity")]
    sim.verify()
