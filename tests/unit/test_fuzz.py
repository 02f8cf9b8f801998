"""Property tests: whatever arrives, the engine answers with a well-formed decision.

* live runs driven by random inputs (results for any step or slot, stale attempts, timers,
  signals, children, cancels, batches of inputs before one advance) never block, never
  raise, and agree with a cold replay at every activation;
* arbitrary histories, however nonsensical their order, raise nothing but a ``BatonError``.

Runs derandomized by default (a fixed set of examples, stable in CI). For a longer, random
search: ``BATON_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/unit/test_fuzz.py``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdk import BatonError, first, gather, now, patched, random, side_effect, sleep, uuid4, wait_signal
from sdk.events import INPUT_KINDS, TERMINAL_KINDS, RunStatus

from .builder import History, Sim, sig, well_formed, workflow
from .test_equivalence import agent, cleanup_flow, family
from .test_golden import nightly_batch, order_saga, review_agent

EXAMPLES = int(os.environ.get("BATON_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize="BATON_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FLOWS: list[tuple[Any, list[Any]]] = [
    (agent, ["task"]), (cleanup_flow, [3]), (family, [["a", "b"]]), (order_saga, ["o", ["x", "y"]]),
    (review_agent, ["T"]), (nightly_batch, [2]),
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
error_types = st.sampled_from(["ValueError", "CardDeclined", "TimeoutError", "AssertionError"])
signal_names = st.sampled_from(["review", "more", "go"])


def act(sim: Sim, data: st.DataObject) -> None:
    """One random thing happening to a run: an input, a signal, time passing, or an advance."""
    current = sim.log[-1].decision.step if sim.log else 1
    step = data.draw(st.integers(max(1, current - 1), current + 1), label="step")
    slot = data.draw(st.integers(0, 3), label="slot")
    kind = data.draw(st.sampled_from(["complete", "fail", "fire", "signal", "child_completed", "child_failed",
                                      "cancel", "tick", "decide", "decide"]), label="kind")
    if kind == "complete":
        attempt = data.draw(st.none() | st.integers(1, 3), label="attempt")
        sim.complete(step, data.draw(json_values, label="result"), slot=slot, attempt=attempt)
    elif kind == "fail":
        attempt = data.draw(st.none() | st.integers(1, 3), label="attempt")
        sim.fail(step, data.draw(error_types, label="type"), "m", slot=slot, attempt=attempt)
    elif kind == "fire":
        sim.fire(step, slot=slot)
    elif kind == "signal":
        sim.signal(data.draw(signal_names, label="name"), data.draw(json_values, label="payload"))
    elif kind == "child_completed":
        sim.child_completed(step, data.draw(json_values, label="result"), slot=slot)
    elif kind == "child_failed":
        sim.child_failed(step, data.draw(error_types, label="type"), "m", slot=slot)
    elif kind == "cancel":
        sim.cancel("fuzz")
    elif kind == "tick":
        sim.tick(data.draw(st.integers(0, 4000), label="seconds"))
    else:
        d = sim.decide()
        well_formed(d)
        assert d.status is not RunStatus.BLOCKED, d.error


@FUZZ
@given(data=st.data(), which=st.integers(0, len(FLOWS) - 1), cache=st.booleans(), workers=st.integers(1, 3))
def test_random_inputs_to_a_live_run_keep_it_deterministic(data, which, cache, workers):
    flow, args = FLOWS[which]
    sim = Sim(flow, *args, cache=cache, workers=workers)
    well_formed(sim.decide())
    for _ in range(data.draw(st.integers(1, 25), label="length")):
        if sim.status is not RunStatus.RUNNING:
            break
        act(sim, data)
    if sim.status is RunStatus.RUNNING:
        well_formed(sim.decide())
    sim.verify()


# ---------------------------------------------------------------- arbitrary histories

kid = workflow(lambda x: None, name="kid")
COMMANDS: list[tuple[Any, dict[str, Any]]] = [
    (sig("t.plan", "task"), {}), (sig("t.test", 1), {}), (sig("t.fast"), {}), (sig("t.item", 0), {}),
    ([sig("t.tool", "a"), sig("t.tool", "b")], {}), (gather(sig("t.tool", "a"), return_exceptions=True), {}),
    (first(sig("t.fast"), sleep(30)), {}), (wait_signal("review", timeout=3600), {}), (wait_signal("more"), {}),
    (kid.s(["a"]), {}), (sleep(60), {}), (now(), {"value": "2024-01-01T12:00:00+00:00"}),
    (uuid4(), {"value": "12345678-1234-5678-1234-567812345678"}), (random(), {"value": 0.5}),
    (patched("v2"), {"value": True}), (patched("lint-before-merge"), {"value": True}),
    (side_effect(len, "ab"), {"value": 2}),
    (side_effect(len, "ab"), {"error": {"type": "ValueError", "message": "m", "traceback": ""}}),
]


@st.composite
def histories(draw: st.DrawFn) -> History:
    h = History()
    if draw(st.booleans()):
        h.started(*draw(st.sampled_from([a for _, a in FLOWS])))
    for _ in range(draw(st.integers(0, 20))):
        step = draw(st.integers(0, 6))
        slot = draw(st.integers(-1, 3))
        kind = draw(st.sampled_from(sorted(INPUT_KINDS | TERMINAL_KINDS) + ["step_scheduled"] * 4
                                    + ["attempt_scheduled"]))
        if kind == "step_scheduled":
            yieldable, extra = draw(st.sampled_from(COMMANDS))
            h.scheduled(yieldable, step=step, **extra)
        elif kind == "attempt_scheduled":
            h.attempt(step, draw(st.integers(1, 4)), slot=slot)
        elif kind == "started":
            h.started(*draw(st.sampled_from([a for _, a in FLOWS])))
        elif kind == "activity_completed":
            h.completed(step, draw(json_values), slot=slot, attempt=draw(st.integers(1, 3)))
        elif kind == "activity_failed":
            h.failed(step, draw(error_types), slot=slot, attempt=draw(st.integers(1, 3)))
        elif kind == "timer_fired":
            h.timer_fired(step, slot=slot)
        elif kind == "signal_received":
            h.signal(step, draw(json_values), slot=slot, signal_id=draw(st.integers(1, 5)))
        elif kind == "child_completed":
            h.child_completed(step, draw(json_values), slot=slot)
        elif kind == "child_failed":
            h.child_failed(step, draw(error_types), slot=slot)
        elif kind == "cancel_requested":
            h.cancel("fuzz")
        else:
            h.ended(kind)
        h.tick(draw(st.integers(0, 100)))
    return h


@FUZZ
@given(h=histories(), which=st.integers(0, len(FLOWS) - 1), split=st.integers(0, 20))
def test_arbitrary_histories_raise_nothing_but_baton_errors(h, which, split):
    flow, _ = FLOWS[which]
    decided = min(split, len(h.events))
    try:
        d = h.replay(flow, decided_seq=decided, now=h.clock + timedelta(seconds=1))
    except BatonError:
        return
    well_formed(d)


# ---------------------------------------------------------------- corrupt payloads, by hand
# Histories the store would never write, but a bad migration or a hand edit could: the
# engine should refuse them with a BatonError naming the event, not crash with a KeyError.

@workflow
def waits():
    yield sig("t.x")
    yield sig("t.y")


@workflow
def stamp():
    yield now()
    yield sig("t.x")


def _base() -> History:
    return History().started().scheduled(sig("t.x"))


def _corrupt(name: str, error: str) -> tuple[()]:
    """Formerly an xfail (the engine raised a raw {error}); kept so the cases read as before."""
    return ()


CORRUPT = [
    pytest.param(waits, _base().add("attempt_scheduled", 1, 0, {}),
                 id="attempt_scheduled without attempt", marks=_corrupt("attempt_scheduled without attempt",
                                                                        "KeyError")),
    pytest.param(waits, _base().add("activity_completed", 1, 0, {"attempt": "one"}),
                 id="attempt as text", marks=_corrupt("attempt as text", "ValueError")),
    pytest.param(waits, _base().add("activity_failed", 1, 0, {"attempt": 1, "error": "boom"}),
                 id="activity_failed with a string error", marks=_corrupt("activity_failed with a string error",
                                                                          "ValueError")),
    pytest.param(waits, _base().add("child_failed", 1, 0, {"error": None}),
                 id="child_failed with a null error", marks=_corrupt("child_failed with a null error",
                                                                     "TypeError")),
    pytest.param(waits, History().add("started", payload={"args": None, "kwargs": {}}),
                 id="started with null args", marks=_corrupt("started with null args", "TypeError")),
    pytest.param(stamp, History().started().add("step_scheduled", 1, None,
                                                {"command": now().describe(), "line": 0}),
                 id="a now() step without its value", marks=_corrupt("a now() step without its value",
                                                                     "ValueError")),
    pytest.param(waits, _base().add("activity_completed", None, 0, {"attempt": 1}), id="a result with no step"),
    pytest.param(waits, _base().add("activity_completed", 1, 7, {"attempt": 1}), id="a slot out of range"),
    pytest.param(waits, _base().add("mystery", 1, 0), id="an unknown kind"),
]


@pytest.mark.parametrize("flow, history", CORRUPT)
def test_corrupt_payloads_raise_a_baton_error(flow, history):
    try:
        d = history.replay(flow)
    except BatonError:
        return
    well_formed(d)
