"""Engine-managed retries: ``step(sig, retry=RetryPolicy(...))``."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sdk import ActivityError, RetryPolicy, first, step
from sdk.events import ActivityTask, CancelTask, NewEvent, RunStatus

from .builder import T0, Sim, sig, started, workflow

POLICY = RetryPolicy(max_attempts=3, initial_interval=2, backoff=3, max_interval=60)


@workflow
def fetch():
    try:
        page = yield step(sig("t.fetch", "u"), retry=POLICY, timeout=10)
    except ActivityError as err:
        return {"gave_up": err.error_type, "task": err.task_name, "message": err.message, "tb": err.traceback}
    return page


def test_the_first_attempt_carries_its_timeout():
    d = started().replay(fetch)

    assert d.activities == [ActivityTask(1, 0, 1, "t.fetch", ["u"], {}, {}, 10.0, None)]


def test_a_failure_schedules_the_next_attempt_after_the_backoff():
    sim = Sim(fetch)
    sim.decide()
    sim.tick(5).fail(1, "ConnectionError", "reset")
    d = sim.decide()

    failed_at = T0 + timedelta(seconds=5)
    assert d.events == [NewEvent("attempt_scheduled", 1, 0, {"attempt": 2, "not_before": (failed_at + timedelta(
        seconds=2)).isoformat(), "after": "ConnectionError"}, name="t.fetch")]
    assert d.activities == [ActivityTask(1, 0, 2, "t.fetch", ["u"], {}, {}, 10.0, failed_at + timedelta(seconds=2))]
    assert d.status is RunStatus.RUNNING and d.step == 1
    assert d.waiting_on[0]["attempt"] == 2

    sim.tick(100).fail(1, "ConnectionError", "reset")
    d = sim.decide()
    second_failed_at = failed_at + timedelta(seconds=100)
    assert d.activities[0].attempt == 3
    assert d.activities[0].not_before == second_failed_at + timedelta(seconds=6), "2s * 3 ** 1"
    sim.verify()


def test_not_before_counts_from_the_failure_not_from_the_decision():
    h = started().scheduled(step(sig("t.fetch", "u"), retry=POLICY, timeout=10)).tick(7).failed(1)

    d = h.replay(fetch, now=T0 + timedelta(hours=1), decided_seq=2)

    assert d.activities[0].not_before == T0 + timedelta(seconds=9)


def test_exhausted_retries_raise_activity_error_at_the_yield():
    sim = Sim(fetch)
    sim.decide()
    for _ in range(3):
        sim.fail(1, "ConnectionError", "reset")
        d = sim.decide()

    assert d.status is RunStatus.COMPLETED
    assert d.result["gave_up"] == "ConnectionError"
    assert d.result["task"] == "t.fetch" and d.result["message"] == "reset"
    assert "ConnectionError: reset" in d.result["tb"]
    assert [e.payload["attempt"] for e in sim.events if e.kind == "attempt_scheduled"] == [2, 3]
    sim.verify()


def test_success_on_a_later_attempt_returns_its_result():
    sim = Sim(fetch)
    sim.decide()
    sim.fail(1)
    sim.decide()
    sim.complete(1, "<html>")
    d = sim.decide()
    assert d.status is RunStatus.COMPLETED and d.result == "<html>"
    sim.verify()


def test_a_late_result_of_a_superseded_attempt_is_ignored():
    h = (started().scheduled(step(sig("t.fetch", "u"), retry=POLICY, timeout=10)).failed(1, "TimeoutError")
         .attempt(1, 2).completed(1, "late", attempt=1))

    d = h.replay(fetch)

    assert d.status is RunStatus.RUNNING and d.events == [] and d.activities == []
    assert h.completed(1, "fresh", attempt=2).replay(fetch).result == "fresh"


def test_a_non_retryable_error_fails_the_step_at_once():
    @workflow
    def strict():
        policy = RetryPolicy(max_attempts=5, non_retryable=("PermissionError",))
        try:
            yield step(sig("t.write"), retry=policy)
        except ActivityError as err:
            return err.error_type

    sim = Sim(strict)
    sim.decide()
    sim.fail(1, "PermissionError", "denied")
    d = sim.decide()
    assert d.status is RunStatus.COMPLETED and d.result == "PermissionError"
    assert "attempt_scheduled" not in sim.kinds()
    sim.verify()


def test_without_a_policy_the_first_failure_is_final():
    @workflow
    def once():
        yield sig("t.x")

    d = started().scheduled(sig("t.x")).failed(1, "ValueError", "bad").replay(once)

    assert d.status is RunStatus.FAILED and d.error["message"] == "t.x failed: ValueError: bad"


def test_replay_does_not_schedule_recorded_attempts_again():
    h = (started().scheduled(step(sig("t.fetch", "u"), retry=POLICY, timeout=10)).failed(1)
         .attempt(1, 2, not_before=T0 + timedelta(seconds=2)))

    d = h.replay(fetch)

    assert d.events == [] and d.activities == []
    assert d.waiting_on[0]["attempt"] == 2


def test_the_interval_is_capped_by_max_interval():
    policy = RetryPolicy(max_attempts=10, initial_interval=1, backoff=10, max_interval=50)

    assert [policy.delay(n) for n in range(1, 5)] == [1.0, 10.0, 50.0, 50.0]


def test_retry_policy_round_trips_and_validates():
    assert RetryPolicy.from_dict(POLICY.to_dict()) == POLICY
    assert RetryPolicy.from_dict(None) is None
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="backoff"):
        RetryPolicy(backoff=0.5)


def test_a_retrying_racer_can_still_lose():
    @workflow
    def race():
        index, _ = yield first(step(sig("t.a"), retry=POLICY), sig("t.b"))
        return index

    sim = Sim(race)
    sim.decide()
    sim.fail(1, slot=0)
    assert sim.decide().activities[0].attempt == 2
    sim.complete(1, "b", slot=1)
    d = sim.decide()
    assert d.result == 1
    assert d.cancels == [CancelTask(1, 0, "activity")]
    sim.verify()


@pytest.mark.parametrize("timeout, error", [(0, ValueError), (-1, ValueError), ("5", TypeError)])
def test_step_rejects_a_bad_timeout(timeout, error):
    with pytest.raises(error):
        step(sig("t.a"), timeout=timeout)


def test_step_takes_only_a_signature():
    with pytest.raises(TypeError, match="step\\(\\) takes a Celery signature"):
        step(workflow(lambda: None, name="kid").s())
