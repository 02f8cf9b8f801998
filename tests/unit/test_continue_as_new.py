"""``return continue_as_new(...)``: end this run, start the workflow afresh with new arguments."""

from __future__ import annotations

from sdk import continue_as_new
from sdk.events import RunStatus

from .builder import Sim, sig, started, workflow


@workflow
def poller(cursor, seen=0):
    batch = yield sig("t.fetch", cursor)
    seen += len(batch)
    if batch:
        return continue_as_new(cursor + len(batch), seen=seen)
    return seen


def test_continue_as_new_closes_the_run_with_the_next_arguments():
    sim = Sim(poller, 0)
    sim.decide()
    sim.complete(1, ["a", "b"])
    d = sim.decide()

    assert d.status is RunStatus.CONTINUED
    assert d.continue_as_new == ([2], {"seen": 2})
    assert d.result is None and d.error is None and d.waiting_on == []
    assert sim.kinds()[-1] == "continued_as_new"
    sim.verify()


def test_a_chain_of_runs_each_starting_from_an_empty_history():
    args, kwargs = [0], {}
    pages = [["a", "b"], ["c"], []]
    for n, page in enumerate(pages):
        sim = Sim(poller, *args, run_id=f"poll@{n + 1}", **kwargs)
        assert sim.decide().activities[0].args == args[:1]
        sim.complete(1, page)
        d = sim.decide()
        assert len(sim.events) == 4, "each run's history stays short"
        if d.status is RunStatus.CONTINUED:
            args, kwargs = d.continue_as_new
    assert d.status is RunStatus.COMPLETED and d.result == 3


def test_continue_as_new_arguments_json_cannot_carry_fail_the_run():
    @workflow
    def looping():
        yield sig("t.x")
        return continue_as_new({1, 2})

    d = started().scheduled(sig("t.x")).completed(1).replay(looping)

    assert d.status is RunStatus.FAILED and d.error["type"] == "SerializationError"
    assert "continue_as_new() arguments" in d.error["message"] and d.continue_as_new is None


def test_a_continued_history_replays_to_the_same_end():
    h = started(0).scheduled(sig("t.fetch", 0)).completed(1, ["a"]).ended("continued_as_new", args=[1],
                                                                          kwargs={"seen": 1})

    d = h.replay(poller)

    assert d.status is RunStatus.CONTINUED and d.continue_as_new == ([1], {"seen": 1})
    assert d.events == [] and d.activities == []
