"""Signals (``wait_signal``) and durable timers (``sleep``, ``sleep_until``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from sdk import SignalTimeout, gather, sleep, sleep_until, wait_signal
from sdk.events import NewEvent, RunStatus, TimerTask
from sdk.replay import InboxSignal

from .builder import T0, Sim, line_of, sig, started, step_event, workflow


@workflow
def approval():
    decision = yield wait_signal("approve")
    yield sig("t.apply", decision)
    return decision


def test_a_wait_with_nothing_buffered_records_the_step_and_waits():
    d = started().replay(approval)

    assert d.events == [step_event(1, wait_signal("approve"), line_of(approval, "wait_signal("))]
    assert d.timers == [] and d.consumed_signals == []
    assert d.waiting_on == [{"kind": "signal", "name": "approve", "digest": "", "slot": 0, "attempt": 1}]


def test_a_wait_consumes_the_oldest_signal_of_its_name():
    inbox = [InboxSignal(3, "reject", "no"), InboxSignal(4, "approve", {"by": "ann"}),
             InboxSignal(9, "approve", {"by": "bob"})]

    d = started().replay(approval, inbox=inbox)

    assert d.consumed_signals == [4]
    assert d.events[1] == NewEvent("signal_received", 1, 0, {"payload": {"by": "ann"}, "signal_id": 4},
                                   key="sig:4", name="approve")
    assert d.activities[0].args == [{"by": "ann"}]


def test_a_signal_sent_later_is_taken_at_the_next_decision():
    sim = Sim(approval)
    sim.decide()
    sim.signal("approve", True)
    d = sim.decide()
    assert d.consumed_signals == [1]
    assert d.activities[0].args == [True]
    sim.complete(2)
    assert sim.decide().result is True
    assert sim.kinds() == ["started", "step_scheduled", "signal_received", "step_scheduled", "activity_completed",
                           "completed"]
    sim.verify()


def test_two_waits_consume_two_signals_in_order():
    @workflow
    def pair():
        first = yield wait_signal("vote")
        second = yield wait_signal("vote")
        return [first, second]

    sim = Sim(pair)
    sim.signal("vote", "a").signal("other", "x").signal("vote", "b").signal("vote", "c")
    d = sim.decide()
    assert d.consumed_signals == [1, 3]
    assert d.status is RunStatus.COMPLETED and d.result == ["a", "b"]
    assert [s.consumed for s in sim.signals] == [1, None, 2, None]
    sim.verify()


def test_a_fan_out_of_waits_takes_signals_in_slot_order():
    @workflow
    def both():
        out = yield gather(wait_signal("x"), wait_signal("x"))
        return out

    sim = Sim(both)
    sim.signal("x", 1)
    d = sim.decide()
    assert d.consumed_signals == [1] and d.status is RunStatus.RUNNING
    assert [w["slot"] for w in d.waiting_on] == [1]
    sim.signal("x", 2)
    assert sim.decide().result == [1, 2]
    sim.verify()


def test_a_signal_timeout_arms_a_timer_and_raises_signal_timeout_when_it_fires():
    @workflow
    def impatient():
        try:
            yield wait_signal("approve", timeout=timedelta(hours=1))
        except SignalTimeout as err:
            return [err.name, err.timeout, str(err)]

    sim = Sim(impatient)
    d = sim.decide()
    fire_at = T0 + timedelta(hours=1)
    assert d.timers == [TimerTask(1, 0, "signal_timeout", fire_at)]
    assert d.events[0].payload["leaves"] == [{"fire_at": fire_at.isoformat()}]
    sim.tick(3600).fire(1, kind="signal_timeout")
    d = sim.decide()
    assert d.result == ["approve", 3600.0, "no signal 'approve' arrived within 3600s"]
    sim.verify()


def test_an_uncaught_signal_timeout_fails_the_run():
    @workflow
    def impatient():
        yield wait_signal("approve", timeout=5)

    d = started().scheduled(wait_signal("approve", timeout=5)).timer_fired(1).replay(impatient)

    assert d.status is RunStatus.FAILED and d.error["type"] == "SignalTimeout"


def test_the_timeout_timer_firing_after_the_signal_is_ignored():
    @workflow
    def impatient():
        got = yield wait_signal("approve", timeout=5)
        yield sig("t.use", got)

    sim = Sim(impatient)
    sim.decide()
    sim.signal("approve", "yes")
    sim.decide()
    sim.tick(5).fire(1)
    d = sim.decide()
    assert d.status is RunStatus.RUNNING and d.events == [] and d.step == 2
    sim.verify()


def test_a_timer_firing_before_the_signal_is_seen_wins():
    # both are waiting when the engine runs: inputs are applied before the inbox is offered
    @workflow
    def impatient():
        try:
            yield wait_signal("approve", timeout=5)
        except SignalTimeout:
            return "timed out"

    sim = Sim(impatient)
    sim.decide()
    sim.fire(1).signal("approve", "late")
    d = sim.decide()
    assert d.result == "timed out" and d.consumed_signals == []
    sim.verify()


def test_sleep_arms_a_timer_at_now_plus_seconds():
    @workflow
    def nap(seconds):
        out = yield sleep(seconds)
        return out

    sim = Sim(nap, 90, now=T0)
    d = sim.decide()
    fire_at = T0 + timedelta(seconds=90)
    assert d.events == [step_event(1, sleep(90), line_of(nap, "yield sleep"),
                                   leaves=[{"fire_at": fire_at.isoformat()}])]
    assert d.events[0].name == "timer:sleep"
    assert d.timers == [TimerTask(1, 0, "sleep", fire_at)]
    assert d.waiting_on == [{"kind": "timer", "name": "sleep", "digest": "90", "slot": 0, "attempt": 1}]
    sim.tick(90).fire(1)
    d = sim.decide()
    assert d.status is RunStatus.COMPLETED and d.result is None
    sim.verify()


def test_sleep_takes_a_timedelta():
    @workflow
    def nap():
        yield sleep(timedelta(minutes=5))

    d = started().replay(nap)

    assert d.timers == [TimerTask(1, 0, "sleep", T0 + timedelta(minutes=5))]


def test_sleep_until_fires_at_the_given_time_naive_taken_as_utc():
    @workflow
    def alarm():
        yield sleep_until(datetime(2024, 6, 1, 8, 30))

    d = started().replay(alarm)

    assert d.timers == [TimerTask(1, 0, "sleep", datetime(2024, 6, 1, 8, 30, tzinfo=UTC))]
    assert d.events[0].payload["command"]["leaves"][0]["digest"] == "2024-06-01T08:30:00+00:00"


def test_replaying_a_fired_timer_does_not_arm_it_again():
    @workflow
    def nap():
        yield sleep(10)
        yield sig("t.wake")

    h = started().scheduled(sleep(10), leaves=[{"fire_at": (T0 + timedelta(seconds=10)).isoformat()}])
    d = h.tick(10).timer_fired(1).replay(nap)

    assert d.timers == [] and [a.task for a in d.activities] == ["t.wake"]


@pytest.mark.parametrize("call, error", [
    (lambda: sleep(-1), ValueError), (lambda: sleep("5"), TypeError), (lambda: sleep(float("nan")), ValueError),
    (lambda: sleep(True), TypeError), (lambda: sleep_until("tomorrow"), TypeError),
    (lambda: wait_signal(""), TypeError), (lambda: wait_signal("x", timeout=-3), ValueError),
])
def test_bad_durations_and_names_are_refused_where_they_are_built(call, error):
    with pytest.raises(error):
        call()


def test_mutating_a_signal_payload_does_not_rewrite_history():
    @workflow
    def counter():
        payload = yield wait_signal("tick")
        payload["n"] = payload.get("n", 0) + 1
        yield sig("t.record", payload)

    sim = Sim(counter)
    sim.signal("tick", {})
    sim.decide()
    assert sim.events[2].payload["payload"] == {}
    _, cold = sim.replay()
    assert cold.status is RunStatus.RUNNING
