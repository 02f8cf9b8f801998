"""Divergence: code replayed against a history it did not write blocks the run.

Each test records a history with one version of a workflow, then replays it with another
version of the same name, as a deploy would.
"""

from __future__ import annotations

import pytest

from sdk import BatonError, Cancelled, now, sleep, uuid4
from sdk.events import RunStatus

from .builder import Sim, command, line_of, sig, started, workflow


def record(flow, *inputs):
    """A finished-or-waiting history of ``flow``: ``inputs`` are (step, result) completions."""
    sim = Sim(flow, 7)
    sim.decide()
    for k, result in inputs:
        sim.complete(k, result)
        sim.decide()
    return sim


@workflow(name="ship")
def ship_v1(order):
    label = yield sig("t.label", order)
    yield sig("t.post", label)
    return "shipped"


def assert_blocked(d, *, step, recorded, new, flow, marker):
    assert d.status is RunStatus.BLOCKED
    err = d.error
    assert err["type"] == "NonDeterminismError"
    assert err["step"] == step
    assert err["recorded"] == recorded and err["new"] == new
    assert err["file"] == __file__
    assert err["line"] == line_of(flow, marker)
    msg = err["message"]
    assert f"step {step}" in msg and f"{__file__}:{err['line']}" in msg
    for leaf in recorded["leaves"] + new["leaves"]:
        assert repr(leaf["name"]) in msg
    assert "patched(" in msg and "baton.resume('run-1')" in msg
    assert d.events == [] and d.activities == [] and d.checkpoints == []


def test_the_same_code_replays_cleanly():
    sim = record(ship_v1, (1, "L-1"), (2, None))

    _, d = sim.replay()

    assert d.status is RunStatus.COMPLETED and d.result == "shipped"


def test_a_changed_task_name_blocks_the_run():
    @workflow(name="ship")
    def ship_v2(order):
        label = yield sig("t.label", order)
        yield sig("t.courier", label)
        return "shipped"

    sim = record(ship_v1, (1, "L-1"))
    sim.flow = ship_v2

    _, d = sim.replay()

    assert_blocked(d, step=2, recorded=command(sig("t.post", "L-1")), new=command(sig("t.courier", "L-1")),
                   flow=ship_v2, marker='sig("t.courier"')
    assert "t.post" in d.error["message"] and "t.courier" in d.error["message"]


def test_changed_arguments_block_the_run():
    @workflow(name="ship")
    def ship_v2(order):
        label = yield sig("t.label", order, express=True)
        yield sig("t.post", label)
        return "shipped"

    sim = record(ship_v1, (1, "L-1"))
    sim.flow = ship_v2

    _, d = sim.replay()

    recorded, new = command(sig("t.label", 7)), command(sig("t.label", 7, express=True))
    assert recorded["leaves"][0]["digest"] != new["leaves"][0]["digest"]
    assert_blocked(d, step=1, recorded=recorded, new=new, flow=ship_v2, marker="express=True")
    assert recorded["leaves"][0]["digest"] in d.error["message"]


def test_a_different_kind_of_step_blocks_the_run():
    @workflow(name="ship")
    def ship_v2(order):
        yield sleep(60)
        yield sig("t.post", order)

    sim = record(ship_v1)
    sim.flow = ship_v2

    _, d = sim.replay()

    assert_blocked(d, step=1, recorded=command(sig("t.label", 7)), new=command(sleep(60)), flow=ship_v2,
                   marker="sleep(60)")


def test_a_different_value_kind_blocks_the_run():
    @workflow(name="stamp")
    def v1():
        yield now()
        yield sig("t.x")

    @workflow(name="stamp")
    def v2():
        yield uuid4()
        yield sig("t.x")

    sim = Sim(v1)
    sim.decide()
    sim.flow = v2

    _, d = sim.replay()

    assert_blocked(d, step=1, recorded=command(now()), new=command(uuid4()), flow=v2, marker="uuid4()")


def test_a_single_item_turned_into_a_fan_out_blocks_the_run():
    @workflow(name="ship")
    def ship_v2(order):
        yield [sig("t.label", order)]

    sim = record(ship_v1)
    sim.flow = ship_v2

    _, d = sim.replay()

    assert d.status is RunStatus.BLOCKED
    assert d.error["recorded"]["mode"] == "one" and d.error["new"]["mode"] == "all"


def test_the_error_points_into_a_helper_generator():
    def post(label):
        yield sig("t.courier", label)

    @workflow(name="ship")
    def ship_v2(order):
        label = yield sig("t.label", order)
        yield from post(label)

    sim = record(ship_v1, (1, "L-1"))
    sim.flow = ship_v2

    _, d = sim.replay()

    assert d.status is RunStatus.BLOCKED
    assert d.error["line"] == line_of(post, 'sig("t.courier"')


def test_a_generator_that_returns_before_its_recorded_steps_blocks_the_run():
    @workflow(name="ship")
    def ship_v2(order):
        yield sig("t.label", order)
        return "skipped posting"

    sim = record(ship_v1, (1, "L-1"), (2, None))
    sim.flow = ship_v2

    _, d = sim.replay()

    assert d.status is RunStatus.BLOCKED
    assert d.error["type"] == "NonDeterminismError"
    assert d.error["step"] == 2
    assert d.error["recorded"] == command(sig("t.post", "L-1"))
    assert "returned after step 1" in d.error["message"]
    assert "t.post" in d.error["message"]


def test_a_generator_that_raises_before_its_recorded_steps_blocks_rather_than_fails():
    @workflow(name="ship")
    def ship_v2(order):
        yield sig("t.label", order)
        raise RuntimeError("new validation")

    sim = record(ship_v1, (1, "L-1"))
    sim.flow = ship_v2

    _, d = sim.replay()

    assert d.status is RunStatus.BLOCKED
    assert "raised RuntimeError: new validation" in d.error["message"]


def test_an_early_end_names_the_file_and_line():
    @workflow(name="ship")
    def ship_v2(order):
        yield sig("t.label", order)
        return "skipped posting"

    sim = record(ship_v1, (1, "L-1"), (2, None))
    sim.flow = ship_v2

    _, d = sim.replay()

    assert d.error["file"] == __file__
    assert d.error["line"] > 0
    assert __file__ in d.error["message"]


def test_a_cancelled_generator_that_skips_recorded_cleanup_blocks_the_run():
    @workflow(name="tidy")
    def v1():
        try:
            yield sig("t.work")
        except Cancelled:
            yield sig("t.cleanup")
            raise

    @workflow(name="tidy")
    def v2():
        yield sig("t.work")

    sim = Sim(v1)
    sim.decide()
    sim.cancel("stop")
    assert sim.decide().activities[0].task == "t.cleanup"
    sim.flow = v2

    _, d = sim.replay()

    assert d.status is RunStatus.BLOCKED


def test_the_live_run_blocks_at_the_divergent_step_and_decides_nothing():
    @workflow(name="ship")
    def ship_v2(order):
        yield sig("t.other", order)

    sim = record(ship_v1)
    sim.complete(1, "L-1")
    sim.flow = ship_v2
    sim.cache = False

    d = sim.decide()

    assert d.status is RunStatus.BLOCKED
    assert sim.status is RunStatus.BLOCKED
    assert sim.kinds()[-1] == "activity_completed", "a blocked decision appends nothing"


def test_a_blocked_instance_refuses_to_be_reused():
    @workflow(name="ship")
    def ship_v2(order):
        yield sig("t.other", order)

    h = started(7).scheduled(sig("t.label", 7))
    inst, d = h.instance(ship_v2)
    assert d.status is RunStatus.BLOCKED and inst.poisoned

    with pytest.raises(BatonError, match="blocked; build a fresh one"):
        inst.activate([], now=h.clock, decided_seq=2)


def test_a_step_recorded_while_the_frontier_is_behind_is_not_yet_checked():
    # The recorded step 2 is compared only when the generator reaches it.
    h = started(7).scheduled(sig("t.label", 7)).scheduled(sig("t.post", "L"), step=2)

    d = h.replay(ship_v1)

    assert d.status is RunStatus.RUNNING and d.step == 1
