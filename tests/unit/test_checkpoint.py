"""Checkpoints: where the generator stands at each yield, and a bounded JSON view of its locals."""

from __future__ import annotations

import collections
import json
import math
import random

from sdk import checkpoint as cp
from sdk import now, serde
from sdk.events import RunStatus

from .builder import T0, Sim, line_of, sig, started, workflow


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque thing>"


class Broken:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def checkpoint_of(flow, *args):
    d = started(*args).replay(flow)
    assert d.checkpoints, d
    return d.checkpoints[-1]


def test_a_checkpoint_names_file_line_function_and_what_it_waits_on():
    @workflow
    def shop(item):
        qty = 2
        yield sig("t.buy", item, qty)

    ck = checkpoint_of(shop, "tea")

    assert ck.step == 1 and ck.at == T0
    assert ck.position == {"file": __file__, "line": line_of(shop, "yield sig"), "function": "shop"}
    assert ck.locals == {"item": "tea", "qty": 2}
    assert ck.waiting_on == [{"kind": "activity", "name": "t.buy", "digest": ck.waiting_on[0]["digest"],
                              "slot": 0, "attempt": 1}]


def test_every_step_of_one_decision_has_its_checkpoint():
    @workflow
    def stamped():
        a = yield now()
        b = yield sig("t.x", a.isoformat())
        return b

    d = started().replay(stamped)

    assert [(c.step, c.position["line"]) for c in d.checkpoints] == [
        (1, line_of(stamped, "yield now()")), (2, line_of(stamped, 'yield sig("t.x"'))]
    assert d.checkpoints[0].locals == {}
    assert d.checkpoints[1].locals == {"a": repr(T0)}, "a datetime is not JSON: its repr"


def test_locals_that_json_cannot_carry_appear_as_a_repr():
    @workflow
    def odd():
        thing = Opaque()  # noqa: F841
        tags = {"a"}  # noqa: F841
        broken = Broken()  # noqa: F841
        nan = math.nan  # noqa: F841
        yield sig("t.x")

    ck = checkpoint_of(odd)

    assert ck.locals["thing"] == "<Opaque thing>"
    assert ck.locals["tags"] == "{'a'}"
    assert ck.locals["broken"] == "<unrepresentable Broken: RuntimeError>"
    assert ck.locals["nan"] == "nan"
    serde.dumps(ck.locals, "locals", None)


def test_a_one_megabyte_local_is_stored_as_a_capped_repr():
    @workflow
    def hoard():
        blob = "x" * 1_000_000
        rows = [{"i": i} for i in range(5_000)]
        yield sig("t.x", len(blob), len(rows))

    ck = checkpoint_of(hoard)

    assert len(ck.locals["blob"]) == cp.MAX_REPR_CHARS and ck.locals["blob"].startswith("'xxx")
    assert ck.locals["blob"].endswith("...")
    assert len(ck.locals["rows"]) == cp.MAX_REPR_CHARS
    assert len(json.dumps(ck.locals)) < 1_000


def test_a_value_just_under_the_value_cap_is_kept_as_is():
    @workflow
    def medium():
        text = "y" * (cp.MAX_VALUE_CHARS - 2)  # noqa: F841
        yield sig("t.x")

    assert checkpoint_of(medium).locals["text"] == "y" * (cp.MAX_VALUE_CHARS - 2)


def suspended(n_locals: int, size: int):
    """A generator paused with ``n_locals`` string locals of ``size`` characters each."""
    src = "def gen():\n" + "".join(f"    v{i:02} = 'z' * {size}\n" for i in range(n_locals)) + "    yield\n"
    ns: dict = {}
    exec(src, ns)
    g = ns["gen"]()
    next(g)
    return g


def test_the_whole_checkpoint_is_capped_and_later_names_get_a_marker():
    snap = cp.snapshot_locals(suspended(60, 1_900))

    kept = [k for k, v in snap.items() if v != cp.OVER_BUDGET]
    # room for a marker per name is reserved first: 32 values of ~1,900 chars fit in 64,000
    assert len(kept) == 32 and kept == [f"v{i:02}" for i in range(32)]
    assert list(snap) == [f"v{i:02}" for i in range(60)]  # every name is listed
    assert all(snap[f"v{i}"] == cp.OVER_BUDGET for i in range(32, 60))


def test_the_checkpoint_cap_bounds_the_json_size():
    snap = cp.snapshot_locals(suspended(60, 1_900))

    assert len(json.dumps(snap)) <= cp.MAX_CHECKPOINT_CHARS


def test_snapshot_budget_marks_the_names_past_it():
    def gen():
        a = b = c = "a" * 1_500  # noqa: F841 - each under the per-value cap
        yield

    g = gen()
    next(g)
    old = cp.MAX_CHECKPOINT_CHARS
    cp.MAX_CHECKPOINT_CHARS = 3_100
    try:
        snap = cp.snapshot_locals(g)
    finally:
        cp.MAX_CHECKPOINT_CHARS = old
    assert snap["a"] == "a" * 1_500 and snap["b"] == "a" * 1_500
    assert snap["c"] == cp.OVER_BUDGET


def test_redacted_names_never_reach_the_checkpoint():
    @workflow(redact=("api_key",))
    def secretive(api_key):
        user = "ann"
        yield sig("t.call", user)

    ck = checkpoint_of(secretive, "sk-live-123")

    assert ck.locals == {"api_key": "<redacted>", "user": "ann"}


def test_a_helper_generator_is_the_checkpoint_position():
    def fetch(url):
        retries = 3
        body = yield sig("t.get", url, retries)
        return body

    @workflow
    def crawler():
        page = yield from fetch("https://example.org")
        return page

    ck = checkpoint_of(crawler)

    assert ck.position["function"] == "fetch" and ck.position["line"] == line_of(fetch, "yield sig")
    assert ck.locals == {"url": "https://example.org", "retries": 3}


def test_comprehension_internals_are_skipped():
    def gen():
        xs = [i for i in range(3)]
        yield xs

    g = gen()
    next(g)
    assert cp.snapshot_locals(g) == {"xs": [0, 1, 2]}


def test_a_finished_generator_has_no_position_or_locals():
    def gen():
        yield 1

    g = gen()
    list(g)
    assert cp.position(g) == {"file": "", "line": 0, "function": ""}
    assert cp.snapshot_locals(g) == {}


def test_deltas_store_only_what_changed_and_rebuild_every_step():
    steps = [{"a": 1, "b": [1]}, {"a": 1, "b": [1, 2]}, {"a": 2, "c": "new"}, {"a": 2, "c": "new"}]
    deltas, previous = [], None
    for current in steps:
        deltas.append(cp.delta(previous, current))
        previous = current

    assert deltas[0] == {"full": True, "set": steps[0], "unset": []}
    assert deltas[1] == {"full": False, "set": {"b": [1, 2]}, "unset": []}
    assert deltas[2] == {"full": False, "set": {"a": 2, "c": "new"}, "unset": ["b"]}
    assert deltas[3] == {"full": False, "set": {}, "unset": []}

    state: dict = {"stale": True}
    for expected, change in zip(steps, deltas):
        state = cp.apply_delta(state, json.loads(json.dumps(change)))
        assert state == expected


def test_a_big_local_held_for_many_steps_costs_one_capped_value():
    @workflow
    def holder(n):
        blob = "q" * 1_000_000
        for i in range(n):
            yield sig("t.x", i)
        return len(blob)

    sim = Sim(holder, 5)
    sim.decide()
    for k in range(1, 6):
        sim.complete(k)
        sim.decide()
    assert sim.last.status is RunStatus.COMPLETED
    previous, sizes = None, []
    for entry in sim.log:
        for ck in entry.decision.checkpoints:
            sizes.append(len(json.dumps(cp.delta(previous, ck.locals))))
            previous = ck.locals
    assert sizes[0] < 400 and all(s < 100 for s in sizes[1:]), sizes


def test_locals_always_pass_the_store_serializer():
    @workflow
    def keyed():
        by_id = {1: "a", 2: "b"}  # noqa: F841
        yield sig("t.x")

    ck = checkpoint_of(keyed)

    serde.dumps(ck.locals, "locals", None)


def test_a_checkpoint_is_a_snapshot_not_a_view():
    @workflow
    def grows():
        items = [1]
        yield now()
        items.append(2)
        yield sig("t.x")

    d = started().replay(grows)

    assert [c.locals["items"] for c in d.checkpoints] == [[1], [1, 2]]


def _reference_safe(value):
    """The plain definition the snapshot must match: a JSON round trip, else a capped repr."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return cp._repr(value)
    return cp._repr(value) if len(text) > cp.MAX_VALUE_CHARS else json.loads(text)


def test_each_local_is_snapshotted_as_a_json_round_trip_with_its_size_counted_exactly():
    cyclic: list = []
    cyclic.append(cyclic)
    values = [None, True, False, 0, -7, 10**1999, 10**2000, 10**5000, 1.5, math.nan, -math.inf, "", "é\u2028\"",
              "x" * 1998, "x" * 1999, (1, [2, 3]), {1: "a", "b": None}, {"t": (1, 2)}, cyclic, Opaque(), Broken(),
              {1, 2}, b"bytes", RunStatus.RUNNING]
    for value in values:
        safe, chars = cp._safe(value)
        expected = _reference_safe(value)
        assert safe == expected and type(safe) is type(expected), (value, safe, expected)
        assert chars == len(json.dumps(safe)), (value, chars)


def _plain_repr(value):
    """The plain definition of a capped repr: the whole ``repr``, then cut."""
    try:
        text = repr(value)
    except Exception as exc:
        text = f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"
    return text if len(text) <= cp.MAX_REPR_CHARS else text[: cp.MAX_REPR_CHARS - 3] + "..."


def _random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.35:
        return rng.choice([0, -7, 2.5, None, True, False, "s" * rng.randint(0, 900), "it's", 'a"b', "é",
                           b"raw", Opaque(), math.inf])
    if r < 0.55:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 40))]
    if r < 0.65:
        return tuple(_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3)))
    if r < 0.72:
        return {rng.randint(0, 9) for _ in range(rng.randint(0, 5))}
    if r < 0.8:
        return {rng.randint(0, 99): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 6))}
    return {str(rng.randint(0, 99)) * rng.randint(1, 30): _random_value(rng, depth + 1)
            for _ in range(rng.randint(0, 8))}


def test_random_locals_are_snapshotted_and_repred_as_the_plain_definitions_say():
    rng = random.Random(20261127)
    cyclic_dict: dict = {}
    cyclic_dict["me"] = cyclic_dict
    inner: list = []
    outer = (inner,)
    inner.append(outer)
    values = [_random_value(rng) for _ in range(3_000)] + [
        cyclic_dict, outer, (1,), frozenset({1}), frozenset(), set(), collections.OrderedDict(a=[1] * 300),
        collections.namedtuple("Point", "x y")(1, [2] * 300), collections.defaultdict(list, {"k": [1] * 900})]
    for value in values:
        assert cp._repr(value) == _plain_repr(value), value
        safe, chars = cp._safe(value)
        expected = _reference_safe(value)
        assert safe == expected and type(safe) is type(expected), (value, safe, expected)
        assert chars == len(json.dumps(safe)), (value, chars)


class Counted:
    calls = 0

    def __repr__(self) -> str:
        Counted.calls += 1
        return "<counted>"


def test_a_snapshot_costs_what_the_caps_allow_not_what_the_locals_weigh(monkeypatch):
    """An agent's conversation grows in a local for thousands of steps: its snapshot at each step
    must not encode or repr all of it (it is stored as a 200-character repr either way)."""
    encoded: list[int] = []
    plain_encode = cp._encode

    def measured(value):
        text = plain_encode(value)
        encoded.append(len(text))
        return text

    monkeypatch.setattr(cp, "_encode", measured)
    Counted.calls = 0

    @workflow
    def agent():
        messages = [{"role": "assistant", "content": "r" * 2_000} for _ in range(5_000)]
        handles = [Counted() for _ in range(100_000)]
        yield sig("t.x", len(messages), len(handles))

    ck = checkpoint_of(agent)

    assert ck.locals["messages"] == _plain_repr([{"role": "assistant", "content": "r" * 2_000}])
    assert ck.locals["handles"].startswith("[<counted>, <counted>") and ck.locals["handles"].endswith("...")
    assert Counted.calls < 50, f"{Counted.calls:,} items repred for a 200-character repr"
    assert encoded and max(encoded) <= cp.MAX_VALUE_CHARS, f"encoded {max(encoded):,} characters of a local"
