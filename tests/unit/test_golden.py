"""Golden histories: recorded runs, checked in as JSON, replayed by today's engine.

Each ``golden/<name>.json`` is a JSON list of events (``Event`` fields, ``at`` as ISO text),
exactly what ``run.history()`` holds for a finished run. Replaying one with the workflow
below must reach the recorded ending with no new outputs; a change to the engine or to
these workflows that breaks old histories fails here first.

The files were recorded by the ``Sim`` driver from the workflows in this module. To record
them again after an intended, compatible change (and review the diff)::

    .venv/bin/python -m tests.unit.test_golden
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from sdk import (
    ActivityError,
    Cancelled,
    RetryPolicy,
    SignalTimeout,
    first,
    gather,
    now,
    patched,
    side_effect,
    sleep,
    step,
    uuid4,
    wait_signal,
)
from sdk.events import RunStatus
from sdk.replay import replay

from .builder import TERMINAL_EVENT, Sim, assert_no_outputs, event_from_json, event_to_json, sig, well_formed, workflow

GOLDEN = Path(__file__).parent / "golden"

# ---------------------------------------------------------------- the recorded workflows


@workflow
def order_saga(order_id, items):
    reserved = yield [sig("shop.reserve", order_id, item) for item in items]
    try:
        charge = yield step(sig("shop.charge", order_id, sum(reserved)),
                            retry=RetryPolicy(max_attempts=3, initial_interval=1, non_retryable=("CardDeclined",)))
    except ActivityError as err:
        yield gather(*[sig("shop.release", order_id, item) for item in items])
        return {"order": order_id, "status": "declined", "reason": err.error_type}
    yield sig("shop.ship", order_id, charge)
    return {"order": order_id, "status": "shipped", "charge": charge}


summarise = workflow(lambda notes: None, name="summarise")


@workflow
def review_agent(ticket):
    opened = yield now()
    token = yield uuid4()
    draft = yield sig("llm.draft", ticket, str(token))
    try:
        verdict = yield wait_signal("review", timeout=3600)
    except SignalTimeout:
        verdict = {"ok": True, "by": "timeout"}
    if (yield patched("lint-before-merge")):
        yield sig("ci.lint", ticket)
    index, merged = yield first(sig("git.merge", ticket), sleep(600))
    summary = yield summarise.s([draft, verdict, index])
    tag = yield side_effect(lambda t: f"{t}-done", ticket)
    return {"opened": opened.isoformat(), "verdict": verdict, "merged": merged, "summary": summary, "tag": tag}


@workflow
def nightly_batch(n):
    done = []
    try:
        for i in range(n):
            done.append((yield sig("batch.item", i)))
            yield sleep(60)
    except Cancelled:
        yield sig("batch.rollback", done)
        raise
    return done


@workflow
def import_feed(url):
    rows = yield sig("feed.fetch", url)
    yield [sig("feed.store", row) for row in rows]
    return len(rows)


# ---------------------------------------------------------------- how each history was recorded


def record_order_shipped() -> Sim:
    sim = Sim(order_saga, "o-17", ["tea", "pot"], run_id="o-17")
    sim.decide()
    sim.tick(2).complete(1, 4, slot=1).decide()
    sim.tick(1).complete(1, 6, slot=0).decide()
    sim.tick(3).fail(2, "ConnectionError", "gateway reset").decide()
    sim.tick(1).complete(2, "ch_991").decide()
    sim.tick(5).complete(3, "tracking-1").decide()
    return sim


def record_order_declined() -> Sim:
    sim = Sim(order_saga, "o-18", ["mug"], run_id="o-18")
    sim.decide()
    sim.tick(1).complete(1, 12).decide()
    sim.tick(1).fail(2, "CardDeclined", "insufficient funds").decide()
    sim.tick(1).complete(3, None).decide()
    return sim


def record_review_agent() -> Sim:
    sim = Sim(review_agent, "T-42", run_id="T-42")
    sim.decide()
    sim.tick(20).complete(3, "patch v1").decide()
    sim.tick(900).signal("review", {"ok": True, "by": "ann"}).decide()
    sim.tick(30).complete(6, "lint clean").decide()
    sim.tick(10).complete(7, "sha-abc", slot=0).decide()
    sim.tick(1).fire(7, slot=1).decide()  # the losing timer fires late: ignored
    sim.tick(40).child_completed(8, "summary text", child="T-42/8").decide()
    return sim


def record_nightly_cancelled() -> Sim:
    sim = Sim(nightly_batch, 5, run_id="nightly")
    sim.decide()
    sim.tick(5).complete(1, "r0").decide()
    sim.tick(60).fire(2).decide()
    sim.tick(7).cancel("maintenance window").decide()
    sim.tick(4).complete(4, "rolled back").decide()
    return sim


def record_import_failed() -> Sim:
    sim = Sim(import_feed, "https://example.org/feed", run_id="feed-1")
    sim.decide()
    sim.tick(2).complete(1, [{"id": 1}, {"id": 2}]).decide()
    sim.tick(1).complete(2, None, slot=1).fail(2, "IntegrityError", "duplicate key", slot=0).decide()
    return sim


# name: (how it was recorded, its run id, how it ended)
RECORDINGS: dict[str, tuple[Callable[[], Sim], str, str]] = {
    "order_shipped": (record_order_shipped, "o-17", "completed"),
    "order_declined": (record_order_declined, "o-18", "completed"),
    "review_agent": (record_review_agent, "T-42", "completed"),
    "nightly_cancelled": (record_nightly_cancelled, "nightly", "cancelled"),
    "import_failed": (record_import_failed, "feed-1", "failed"),
}
FLOWS = {"order_saga": order_saga, "review_agent": review_agent, "nightly_batch": nightly_batch,
         "import_feed": import_feed}


def load(name: str) -> list:
    return [event_from_json(e) for e in json.loads((GOLDEN / f"{name}.json").read_text())]


def flow_of(events: list) -> object:
    return FLOWS[events[0].payload["workflow"]]


# ---------------------------------------------------------------- the checks


@pytest.mark.parametrize("name", RECORDINGS)
def test_a_golden_history_replays_to_its_recorded_ending(name):
    events = load(name)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    _, run_id, ending = RECORDINGS[name]
    end = events[-1]
    assert end.kind == ending

    _, d = replay(flow_of(events), run_id, events, now=end.at, decided_seq=end.seq)

    well_formed(d)
    assert_no_outputs(d)
    assert TERMINAL_EVENT[d.status] == end.kind
    if d.status is RunStatus.COMPLETED:
        assert d.result == end.payload["result"]
    else:
        assert {k: d.error[k] for k in ("type", "message")} == {k: end.payload["error"][k] for k in
                                                                ("type", "message")}


@pytest.mark.parametrize("name", RECORDINGS)
def test_every_prefix_of_a_golden_history_replays_cleanly(name):
    events = load(name)
    for k in range(1, len(events) + 1):
        _, d = replay(flow_of(events), RECORDINGS[name][1], events[:k], now=events[k - 1].at, decided_seq=k)
        well_formed(d)
        assert d.status is not RunStatus.BLOCKED, (k, d.error)


def test_the_recorded_values_come_back_from_the_history():
    events = load("review_agent")
    values = [e.payload["value"] for e in events if e.kind == "step_scheduled" and "value" in e.payload]

    _, d = replay(review_agent, "T-42", events, now=events[-1].at, decided_seq=len(events))

    assert d.result["opened"] == values[0]
    assert d.result["tag"] == "T-42-done"


def test_a_renamed_task_is_caught_by_an_old_history():
    @workflow(name="order_saga")
    def order_saga_v2(order_id, items):
        reserved = yield [sig("shop.reserve", order_id, item) for item in items]
        charge = yield step(sig("shop.charge", order_id, sum(reserved)), retry=RetryPolicy(max_attempts=3))
        yield sig("shop.ship_express", order_id, charge)
        return {"order": order_id, "status": "shipped", "charge": charge}

    events = load("order_shipped")

    _, d = replay(order_saga_v2, "o-17", events, now=events[-1].at, decided_seq=len(events))

    assert d.status is RunStatus.BLOCKED
    assert d.error["step"] == 3
    assert d.error["recorded"]["leaves"][0]["name"] == "shop.ship"
    assert d.error["new"]["leaves"][0]["name"] == "shop.ship_express"


def test_a_dropped_retry_policy_is_caught_by_an_old_history():
    # the policy is not part of the command, but the first recorded failure now escapes
    @workflow(name="order_saga")
    def order_saga_v2(order_id, items):
        reserved = yield [sig("shop.reserve", order_id, item) for item in items]
        charge = yield sig("shop.charge", order_id, sum(reserved))
        yield sig("shop.ship", order_id, charge)

    events = load("order_shipped")

    _, d = replay(order_saga_v2, "o-17", events, now=events[-1].at, decided_seq=len(events))

    assert d.status is RunStatus.BLOCKED
    assert "raised ActivityError: shop.charge failed: ConnectionError: gateway reset after step 2" \
        in d.error["message"]


def write_all() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for name, (record, _, ending) in RECORDINGS.items():
        sim = record()
        assert sim.kinds()[-1] == ending, (name, sim.status)
        text = json.dumps([event_to_json(e) for e in sim.events], indent=1, sort_keys=True)
        (GOLDEN / f"{name}.json").write_text(text + "\n")
        print(f"wrote golden/{name}.json: {len(sim.events)} events, {sim.status.value}")


if __name__ == "__main__":
    write_all()
