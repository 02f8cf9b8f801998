"""Child runs: ``other_workflow.s(...)`` yielded from a workflow."""

from __future__ import annotations

from sdk import WorkflowFailed, first
from sdk.events import CancelTask, ChildTask, RunStatus

from .builder import RUN, Sim, line_of, sig, started, step_event, workflow


@workflow
def invoice(customer):
    if False:
        yield
    return {"customer": customer}


@workflow
def billing(customers):
    yield sig("t.prepare")
    yield sig("t.lock")
    one = yield invoice.s(customers[0], currency="EUR")
    many = yield [invoice.s(c) for c in customers]
    return [one, many]


def test_a_child_run_id_is_the_run_id_and_the_step():
    h = started(["a", "b"]).scheduled(sig("t.prepare")).completed(1).scheduled(sig("t.lock")).completed(2)

    d = h.replay(billing)

    assert d.children == [ChildTask(3, 0, f"{RUN}/3", "invoice", ["a"], {"currency": "EUR"})]
    assert d.events == [step_event(3, invoice.s("a", currency="EUR"), line_of(billing, "one = yield"),
                                   leaves=[{"child": f"{RUN}/3"}])]
    assert d.events[0].name == "child:invoice"
    assert d.activities == []


def test_children_of_a_fan_out_are_numbered_by_slot():
    sim = Sim(billing, ["a", "b", "c"], run_id="order-9")
    sim.decide()
    sim.complete(1).decide()
    sim.complete(2).decide()
    sim.child_completed(3, {"customer": "a"})
    d = sim.decide()

    assert [(c.slot, c.run_id, c.args) for c in d.children] == [
        (0, "order-9/4.0", ["a"]), (1, "order-9/4.1", ["b"]), (2, "order-9/4.2", ["c"])]
    assert d.events[0].payload["leaves"] == [{"child": f"order-9/4.{i}"} for i in range(3)]

    for slot, c in enumerate("abc"):
        sim.child_completed(4, {"customer": c}, slot=slot, child=f"order-9/4.{slot}")
    d = sim.decide()
    assert d.status is RunStatus.COMPLETED
    assert d.result == [{"customer": "a"}, [{"customer": c} for c in "abc"]]
    sim.verify()


def test_a_failed_child_raises_workflow_failed_at_the_yield():
    seen = []

    @workflow
    def parent():
        try:
            yield invoice.s("x")
        except WorkflowFailed as err:
            seen.append(err)
            return "recovered"

    d = started().scheduled(invoice.s("x")).child_failed(1, "KeyError", "'vat'", child=f"{RUN}/1").replay(parent)

    assert d.status is RunStatus.COMPLETED and d.result == "recovered"
    (err,) = seen
    assert str(err) == f"child run {RUN}/1 failed: KeyError: 'vat'"
    assert err.cause["type"] == "KeyError" and err.cause["message"] == "'vat'"
    assert err.cause["child"] == f"{RUN}/1"


def test_an_uncaught_child_failure_fails_the_parent():
    @workflow
    def parent():
        yield invoice.s("x")

    d = started().scheduled(invoice.s("x")).child_failed(1, "KeyError", "'vat'", child=f"{RUN}/1").replay(parent)

    assert d.status is RunStatus.FAILED
    assert d.error["type"] == "WorkflowFailed"
    assert d.error["message"] == f"child run {RUN}/1 failed: KeyError: 'vat'"


def test_a_race_of_children_cancels_the_losers_by_run_id():
    @workflow
    def quickest():
        index, value = yield first(invoice.s("a"), invoice.s("b"))
        return [index, value]

    sim = Sim(quickest)
    assert [c.run_id for c in sim.decide().children] == [f"{RUN}/1.0", f"{RUN}/1.1"]
    sim.child_completed(1, "B", slot=1)
    d = sim.decide()
    assert d.cancels == [CancelTask(1, 0, "child", f"{RUN}/1.0")]
    assert d.result == [1, "B"]
    sim.verify()


def test_cancelling_the_parent_cancels_its_waiting_child():
    @workflow
    def parent():
        yield invoice.s("x")

    sim = Sim(parent, run_id="p")
    sim.decide()
    sim.cancel("stop")
    d = sim.decide()
    assert d.cancels == [CancelTask(1, 0, "child", "p/1")]
    assert d.status is RunStatus.CANCELLED
    sim.verify()


def test_a_child_step_replays_without_creating_the_child_again():
    @workflow
    def parent():
        out = yield invoice.s("x")
        yield sig("t.after", out)

    h = started().scheduled(invoice.s("x"), leaves=[{"child": f"{RUN}/1"}])
    assert h.replay(parent).children == []
    d = h.child_completed(1, {"customer": "x"}).replay(parent)
    assert d.children == [] and d.activities[0].args == [{"customer": "x"}]
