"""Recorded values: ``now()``, ``uuid4()``, ``random()``, ``side_effect()``.

Each is computed once at the frontier, recorded in its ``step_scheduled`` event, and
returned unchanged by every replay.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest

from sdk import ActivityError, now, random, side_effect, uuid4
from sdk.events import RunStatus

from .builder import T0, Sim, line_of, sig, started, step_event, workflow


@workflow
def stamps():
    at = yield now()
    ident = yield uuid4()
    draw = yield random()
    yield sig("t.log", at.isoformat(), str(ident), draw)
    return [at.isoformat(), str(ident), draw]


def test_values_are_computed_at_the_frontier_and_recorded():
    sim = Sim(stamps, now=T0)
    d = sim.decide()

    values = [e.payload["value"] for e in d.events[:3]]
    assert values[0] == T0.isoformat()
    assert str(uuid.UUID(values[1])) == values[1]
    assert 0 <= values[2] < 1
    assert d.events[0] == step_event(1, now(), line_of(stamps, "yield now()"), value=T0.isoformat())
    assert [e.name for e in d.events] == ["now:", "uuid4:", "random:", "activity:t.log"]
    assert d.activities[0].args == values
    assert d.step == 4
    assert len(d.checkpoints) == 4


def test_values_replay_unchanged_whatever_the_clock():
    ident = "12345678-1234-5678-1234-567812345678"
    h = (started().scheduled(now(), value=T0.isoformat()).scheduled(uuid4(), value=ident)
         .scheduled(random(), value=0.25).scheduled(sig("t.log", T0.isoformat(), ident, 0.25)).completed(4))

    d = h.replay(stamps, now=T0 + timedelta(days=3))

    assert d.status is RunStatus.COMPLETED
    assert d.result == [T0.isoformat(), ident, 0.25]


def test_now_is_an_aware_datetime_and_uuid4_a_uuid():
    seen = {}

    @workflow
    def types_():
        seen["now"] = yield now()
        seen["uuid"] = yield uuid4()
        seen["random"] = yield random()

    started().replay(types_)
    assert isinstance(seen["now"], datetime) and seen["now"].tzinfo is not None and seen["now"] == T0
    assert isinstance(seen["uuid"], uuid.UUID) and seen["uuid"].version == 4
    assert isinstance(seen["random"], float)


def test_a_live_run_and_its_replay_see_the_same_values():
    sim = Sim(stamps)
    sim.decide()
    live = sim.last.activities[0].args
    sim.complete(4)
    assert sim.decide().result == live
    _, d = sim.replay()
    assert d.result == live
    sim.verify()


def test_side_effect_is_called_once_and_replayed_from_the_record():
    calls = []

    def pick(a, b):
        calls.append((a, b))
        return {"chosen": a + b}

    @workflow
    def chooser():
        choice = yield side_effect(pick, 2, 3)
        yield sig("t.use", choice)
        return choice

    sim = Sim(chooser)
    d = sim.decide()
    assert calls == [(2, 3)]
    assert d.events[0].payload["value"] == {"chosen": 5}
    assert d.events[0].name.startswith("side_effect:") and d.events[0].name.endswith("pick")
    sim.complete(2)
    assert sim.decide().result == {"chosen": 5}
    assert calls == [(2, 3)], "the cached generator does not call it again"
    _, cold = sim.replay()
    assert cold.result == {"chosen": 5}
    assert calls == [(2, 3)], "a replay takes the recorded value"


def test_a_failing_side_effect_raises_activity_error_at_the_yield_and_replays_the_error():
    calls = []

    def explode():
        calls.append(1)
        raise LookupError("no such thing")

    @workflow
    def risky():
        try:
            yield side_effect(explode)
        except ActivityError as err:
            yield sig("t.report", err.task_name, err.error_type, err.message)
            return "handled"

    sim = Sim(risky)
    d = sim.decide()
    error = d.events[0].payload["error"]
    assert error["type"] == "LookupError" and error["message"] == "no such thing"
    assert "raise LookupError" in error["traceback"]
    task = d.activities[0].args[0]
    assert task.endswith("explode")
    assert d.activities[0].args[1:] == ["LookupError", "no such thing"]
    sim.complete(2)
    assert sim.decide().result == "handled"
    _, cold = sim.replay()
    assert cold.result == "handled" and calls == [1]
    sim.verify()


def test_a_side_effect_value_json_cannot_carry_is_an_error_at_the_yield():
    @workflow
    def leaky():
        try:
            yield side_effect(lambda: {1, 2})
        except ActivityError as err:
            return [err.error_type, err.message]

    d = started().replay(leaky)

    assert d.status is RunStatus.COMPLETED
    assert d.result[0] == "SerializationError" and "set" in d.result[1]


def test_a_side_effect_over_the_payload_limit_is_refused():
    @workflow
    def heavy():
        try:
            yield side_effect(lambda: "x" * 2_000)
        except ActivityError as err:
            return err.error_type

    sim = Sim(heavy, max_payload=1_000)
    assert sim.decide().result == "SerializationError"


@pytest.mark.parametrize("bad", [None, 3, "fn"])
def test_side_effect_needs_a_callable(bad):
    with pytest.raises(TypeError, match="callable"):
        side_effect(bad)


def test_side_effect_gives_the_live_run_what_a_replay_will_get():
    seen = []

    @workflow
    def pair():
        p = yield side_effect(lambda: (1, 2))
        seen.append(p)
        yield sig("t.x")

    sim = Sim(pair)
    sim.decide()
    sim.replay()
    assert seen[0] == seen[1]
    assert type(seen[0]) is type(seen[1])


def test_mutating_a_side_effect_value_does_not_rewrite_history():
    @workflow
    def mutate():
        items = yield side_effect(lambda: [1, 2, 3])
        items.append(4)
        total = yield sig("t.sum", items)
        return total

    sim = Sim(mutate)
    sim.decide()
    assert sim.events[1].payload["value"] == [1, 2, 3]
    sim.complete(2, 10)
    sim.decide()
    _, cold = sim.replay()
    assert cold.status is RunStatus.COMPLETED
