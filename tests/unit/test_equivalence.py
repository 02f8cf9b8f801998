"""Cache hit and cache miss agree: a live instance fed events bit by bit and a fresh one fed
the whole history reach the same state and decide the same things, at every prefix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sdk import (
    ActivityError,
    Cancelled,
    RetryPolicy,
    SignalTimeout,
    WorkflowFailed,
    continue_as_new,
    first,
    gather,
    now,
    patched,
    side_effect,
    sleep,
    step,
    wait_signal,
)
from sdk.events import RunStatus

from .builder import Sim, assert_no_outputs, sig, well_formed, workflow

kid = workflow(lambda x: None, name="kid")


@workflow
def agent(task):
    started_at = yield now()
    plan = yield sig("t.plan", task)
    results = yield gather(*[sig("t.tool", s) for s in plan], return_exceptions=True)
    ok = [r for r in results if not isinstance(r, ActivityError)]
    try:
        yield step(sig("t.test", len(ok)), retry=RetryPolicy(max_attempts=2, initial_interval=5))
    except ActivityError:
        try:
            review = yield wait_signal("review", timeout=3600)
        except SignalTimeout:
            review = "none"
        ok.append(review)
    index, fast = yield first(sig("t.fast"), sleep(30))
    summary = yield kid.s(ok)
    label = yield side_effect(lambda n: f"run-{n}", len(ok))
    return {"at": started_at.isoformat(), "ok": ok, "race": [index, fast], "summary": summary, "label": label}


def agent_happy(**kw: Any) -> Sim:
    sim = Sim(agent, "ship it", **kw)
    sim.decide()
    sim.tick(1).complete(2, ["a", "b"]).decide()
    sim.tick(1).complete(3, "A", slot=0).decide()
    sim.tick(1).fail(3, "OSError", "disk", slot=1).decide()
    sim.tick(1).complete(4, "green").decide()
    sim.tick(1).complete(5, "fast", slot=0).decide()
    sim.tick(1).complete(5, "late", slot=1).decide()  # a race loser's late result
    sim.tick(1).child_completed(6, "summary").decide()
    return sim


def agent_rough(**kw: Any) -> Sim:
    sim = Sim(agent, "fix it", **kw)
    sim.decide()
    sim.tick(1).complete(2, ["a"]).decide()
    sim.tick(1).complete(3, "A").decide()
    sim.tick(1).fail(4, "AssertionError", "red").decide()
    sim.tick(10).fail(4, "AssertionError", "still red").decide()
    sim.tick(1).signal("review", {"lgtm": True}).decide()
    # two inputs land before one advance: the timer wins the race, then the loser settles
    sim.tick(30).fire(6, slot=1).complete(6, "slow", slot=0).decide()
    sim.tick(1).child_completed(7, "summary").decide()
    return sim


def agent_timeout_and_cancel(**kw: Any) -> Sim:
    sim = Sim(agent, "stall", **kw)
    sim.decide()
    sim.complete(2, ["a"]).decide()
    sim.complete(3, "A").decide()
    sim.fail(4).decide()
    sim.fail(4).decide()
    sim.tick(3600).fire(5, kind="signal_timeout").decide()
    sim.cancel("operator").decide()
    return sim


@workflow
def cleanup_flow(n):
    done = []
    try:
        for i in range(n):
            done.append((yield sig("t.item", i)))
    except Cancelled:
        yield gather(sig("t.undo", len(done)), sleep(5))
        raise
    return done


def cancel_with_cleanup(**kw: Any) -> Sim:
    sim = Sim(cleanup_flow, 5, **kw)
    sim.decide()
    sim.complete(1, "x").decide()
    sim.cancel("stop").complete(2, "y").decide()
    sim.complete(3).fire(3, slot=1).decide()
    return sim


@workflow
def family(names):
    try:
        out = yield [kid.s(n) for n in names]
    except WorkflowFailed as err:
        out = err.cause["message"]
    if (yield patched("v2")):
        yield sleep(1)
    nxt = yield wait_signal("more")
    if nxt:
        return continue_as_new(nxt)
    return out


def children_and_continue(**kw: Any) -> Sim:
    sim = Sim(family, ["a", "b"], **kw)
    sim.signal("more", ["c"])
    sim.decide()
    sim.child_failed(1, "KeyError", "k", slot=1).decide()
    sim.child_completed(1, "A", slot=0).decide()
    sim.fire(3).decide()
    return sim


SCENARIOS: dict[str, Callable[..., Sim]] = {
    "agent_happy": agent_happy,
    "agent_rough": agent_rough,
    "agent_timeout_and_cancel": agent_timeout_and_cancel,
    "cancel_with_cleanup": cancel_with_cleanup,
    "children_and_continue": children_and_continue,
}
ENDINGS = {"agent_happy": RunStatus.COMPLETED, "agent_rough": RunStatus.COMPLETED,
           "agent_timeout_and_cancel": RunStatus.CANCELLED, "cancel_with_cleanup": RunStatus.CANCELLED,
           "children_and_continue": RunStatus.CONTINUED}


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenarios_end_as_expected(name):
    assert SCENARIOS[name]().status is ENDINGS[name]


@pytest.mark.parametrize("name", SCENARIOS)
def test_cache_hit_and_cache_miss_write_the_same_history(name):
    hit, miss = SCENARIOS[name](cache=True), SCENARIOS[name](cache=False)

    assert hit.rows == miss.rows
    assert [e.decision.step for e in hit.log] == [e.decision.step for e in miss.log]


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("name", SCENARIOS)
def test_stale_caches_catch_up_on_other_workers_decisions(name, workers):
    one, many = SCENARIOS[name](), SCENARIOS[name](workers=workers)

    assert many.rows == one.rows
    many.verify()


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_activation_redone_cold_decides_the_same(name):
    SCENARIOS[name]().verify()


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_prefix_replays_without_error_and_boundaries_add_nothing(name):
    sim = SCENARIOS[name]()
    boundaries = {0} | {e.boundary for e in sim.log}
    decided = 0
    for k in range(1, len(sim.events) + 1):
        if k in boundaries:
            decided = k
        _, d = sim.replay(upto=k, decided_seq=decided)
        well_formed(d)
        if k in boundaries:
            assert_no_outputs(d)
