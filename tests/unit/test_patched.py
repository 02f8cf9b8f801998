"""Versioning with ``patched(change_id)``: new code paths without breaking running histories."""

from __future__ import annotations

import pytest

from sdk import patched
from sdk.events import RunStatus

from .builder import Sim, line_of, sig, started, step_event, workflow


@workflow(name="signup")
def signup_v1(user):
    yield sig("t.create", user)
    yield sig("t.welcome", user)
    return "ok"


@workflow(name="signup")
def signup_v2(user):
    yield sig("t.create", user)
    if (yield patched("verify-email")):
        yield sig("t.verify", user)
    yield sig("t.welcome", user)
    return "ok"


def test_patched_is_true_at_the_frontier_and_recorded_as_a_step():
    sim = Sim(signup_v2, "ann")
    sim.decide()
    sim.complete(1)
    d = sim.decide()

    assert d.events[0] == step_event(2, patched("verify-email"), line_of(signup_v2, "patched("), value=True)
    assert d.events[0].name == "patched:verify-email"
    assert [(a.step, a.task) for a in d.activities] == [(3, "t.verify")]
    assert d.step == 3
    sim.verify()


def test_a_history_with_the_marker_replays_the_new_path():
    sim = Sim(signup_v2, "ann")
    sim.decide()
    for k in (1, 3, 4):
        sim.complete(k)
        sim.decide()
    assert sim.last.status is RunStatus.COMPLETED

    _, d = sim.replay()

    assert d.status is RunStatus.COMPLETED and d.events == []


def test_a_history_recorded_before_the_change_takes_the_old_path_without_consuming_a_step():
    sim = Sim(signup_v1, "ann")
    sim.decide()
    sim.complete(1)
    sim.decide()  # step 2 is t.welcome in the old code
    sim.flow = signup_v2
    sim.cache = False

    sim.complete(2)
    d = sim.decide()

    assert d.status is RunStatus.COMPLETED and d.result == "ok"
    assert d.step == 2, "patched() consumed no step on the old path"
    last_step = [e for e in sim.events if e.kind == "step_scheduled"][-1]
    assert last_step.payload["command"]["leaves"][0]["name"] == "t.welcome"
    _, cold = sim.replay()
    assert cold.status is RunStatus.COMPLETED and cold.events == []


def test_an_old_history_at_its_frontier_takes_the_new_path_from_there():
    # recorded under v1 up to step 1's result; no step 2 yet: the new code runs live from here
    h = started("ann").scheduled(sig("t.create", "ann")).completed(1)

    d = h.replay(signup_v2)

    assert [e.payload["command"]["leaves"][0]["kind"] for e in d.events] == ["patched", "activity"]
    assert d.activities[0].task == "t.verify"


def test_a_different_change_id_at_the_position_reads_as_old():
    @workflow(name="signup")
    def signup_v3(user):
        yield sig("t.create", user)
        if (yield patched("sms")):
            yield sig("t.sms", user)
        if (yield patched("verify-email")):
            yield sig("t.verify", user)
        yield sig("t.welcome", user)

    h = (started("ann").scheduled(sig("t.create", "ann")).completed(1)
         .scheduled(patched("verify-email"), value=True).scheduled(sig("t.verify", "ann")))

    d = h.replay(signup_v3)

    assert d.status is RunStatus.RUNNING and d.step == 3 and d.events == []


def test_patched_needs_a_change_id():
    with pytest.raises(TypeError, match="change id"):
        patched("")
