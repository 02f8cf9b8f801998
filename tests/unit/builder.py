"""Engine test kit: a fluent history builder, an in-memory store driver (``Sim``), and the
cache-hit / cache-miss equivalence check.

Two ways to write an engine test:

* **as a history** — ``started(1, 2).scheduled(sig("t.add", 1, 2)).completed(1, 3)`` builds
  the recorded events; ``.replay(flow)`` feeds them to a fresh ``Instance`` and returns the
  decision, whose exact commands the test asserts;
* **as a live run** — ``Sim(flow, 1, 2)`` plays the store: ``decide()`` activates the engine
  and appends the decision's events with seqs and timestamps (as ``commit_decision`` does),
  ``complete()/fail()/fire()/signal()/cancel()`` append inputs (as ``record_attempt``,
  ``fire_timer``, signals and ``cancel`` do), and ``verify()`` replays every recorded prefix
  into fresh instances and checks they agree with the live one.

Payloads go through JSON on the way in and out, exactly as they do through the store, so a
test sees what a worker would see (tuples come back as lists, no object is shared between
the live generator and the recorded history).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sdk.commands import StepSpec, normalise
from sdk.events import ALL_KINDS, Decision, Event, NewEvent, RunStatus
from sdk.replay import InboxSignal, Instance, replay
from sdk.workflow import Workflow

T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
RUN = "run-1"

TERMINAL_EVENT = {RunStatus.COMPLETED: "completed", RunStatus.FAILED: "failed",
                  RunStatus.CANCELLED: "cancelled", RunStatus.CONTINUED: "continued_as_new"}


# ---------------------------------------------------------------- definitions and commands


def workflow(fn: Callable[..., Any] | None = None, *, name: str | None = None,
             redact: Iterable[str] = ()) -> Any:
    """A real ``sdk.Workflow`` definition without a Baton: ``@workflow`` or ``@workflow(name=...)``."""

    def wrap(f: Callable[..., Any]) -> Workflow:
        return Workflow(None, f, name or f.__name__, frozenset(redact))  # type: ignore[arg-type]

    return wrap(fn) if fn is not None else wrap


def sig(task: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A Celery signature as the engine sees it: a dict with ``task`` and ``subtask_type``."""
    return {"task": task, "args": list(args), "kwargs": dict(kwargs), "options": {},
            "subtask_type": None, "immutable": False}


def command(yieldable: Any) -> dict[str, Any]:
    """The recorded ``command`` of a step: what replay compares a new yield against."""
    spec = normalise(yieldable)
    return spec.describe()


def line_of(flow: Any, text: str) -> int:
    """The line number of the one source line of ``flow`` containing ``text``."""
    fn = getattr(flow, "fn", flow)
    lines, start = inspect.getsourcelines(fn)
    hits = [start + i for i, line in enumerate(lines) if text in line]
    assert len(hits) == 1, f"{text!r} found on {len(hits)} lines of {fn.__name__}"
    return hits[0]


def step_event(k: int, yieldable: Any, line: int, **extra: Any) -> NewEvent:
    """The exact ``step_scheduled`` event the engine emits for a yield at ``line``.

    ``extra`` defaults to one empty dict per leaf (``leaves=``) for a step; a value step
    passes ``value=``.
    """
    spec = normalise(yieldable)
    desc = spec.describe()
    payload: dict[str, Any] = {"command": desc, "line": line}
    if isinstance(spec, StepSpec) and "leaves" not in extra:
        payload["leaves"] = [{} for _ in spec.leaves]
    payload.update(extra)
    leaves = desc["leaves"]
    name = f"{leaves[0]['kind']}:{leaves[0]['name']}" if len(leaves) == 1 else f"{desc['mode']}[{len(leaves)}]"
    return NewEvent("step_scheduled", k, None, payload, key=f"step:{k}", name=name)


def roundtrip(value: Any) -> Any:
    """What the store gives back for ``value``: JSON out, JSON in."""
    return json.loads(json.dumps(value, default=_default))


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


# ---------------------------------------------------------------- events <-> JSON (golden files)


def event_to_json(ev: Event) -> dict[str, Any]:
    out = asdict(ev)
    out["at"] = ev.at.isoformat() if ev.at is not None else None
    return out


def event_from_json(data: dict[str, Any]) -> Event:
    at = data.get("at")
    return Event(int(data["seq"]), str(data["kind"]), data.get("step"), data.get("slot"),
                 dict(data.get("payload") or {}), datetime.fromisoformat(at) if at else None,
                 data.get("key"), str(data.get("name") or ""))


def copy_events(events: Iterable[Event]) -> list[Event]:
    """Fresh objects, as a new load from the store would give."""
    return [event_from_json(roundtrip(event_to_json(e))) for e in events]


# ---------------------------------------------------------------- the history builder


class History:
    """A recorded history, built fluently in the order things happened.

    Steps are numbered as the engine numbers them (1 at the first yield); ``scheduled()``
    takes the next number unless ``step=`` is given. Times start at ``T0`` and move with
    ``tick()``.
    """

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.clock = T0
        self.last_step = 0

    # ------------------------------------------------------------ plumbing
    def add(self, kind: str, step: int | None = None, slot: int | None = None,
            payload: dict[str, Any] | None = None, key: str | None = None, name: str = "") -> History:
        """Append any event (even a nonsensical one: fuzz and corruption tests use this)."""
        self.events.append(Event(len(self.events) + 1, kind, step, slot, roundtrip(payload or {}), self.clock,
                                 key, name))
        return self

    def tick(self, seconds: float) -> History:
        self.clock += timedelta(seconds=seconds)
        return self

    # ------------------------------------------------------------ inputs
    def started(self, *args: Any, **kwargs: Any) -> History:
        return self.add("started", payload={"workflow": "", "args": list(args), "kwargs": kwargs})

    def completed(self, step: int, result: Any = None, *, slot: int = 0, attempt: int = 1) -> History:
        return self.add("activity_completed", step, slot, {"attempt": attempt, "result": result},
                        key=f"att:{step}:{slot}:{attempt}")

    def failed(self, step: int, error_type: str = "ValueError", message: str = "boom", *, slot: int = 0,
               attempt: int = 1, task: str = "") -> History:
        error = {"type": error_type, "message": message, "traceback": f"Traceback: {error_type}: {message}"}
        if task:
            error["task"] = task
        return self.add("activity_failed", step, slot, {"attempt": attempt, "error": error},
                        key=f"att:{step}:{slot}:{attempt}")

    def timer_fired(self, step: int, *, slot: int = 0, kind: str = "sleep") -> History:
        return self.add("timer_fired", step, slot, {"kind": kind}, key=f"timer:{step}:{slot}")

    def signal(self, step: int, payload: Any = None, *, slot: int = 0, signal_id: int = 1,
               name: str = "") -> History:
        return self.add("signal_received", step, slot, {"payload": payload, "signal_id": signal_id},
                        key=f"sig:{signal_id}", name=name)

    def child_completed(self, step: int, result: Any = None, *, slot: int = 0, child: str = "") -> History:
        return self.add("child_completed", step, slot, {"result": result, "child": child},
                        key=f"child:{step}:{slot}")

    def child_failed(self, step: int, error_type: str = "ValueError", message: str = "boom", *,
                     slot: int = 0, child: str = "") -> History:
        error = {"type": error_type, "message": message, "traceback": ""}
        return self.add("child_failed", step, slot, {"error": error, "child": child}, key=f"child:{step}:{slot}")

    def cancel(self, reason: str = "") -> History:
        return self.add("cancel_requested", payload={"reason": reason}, key="cancel")

    # ------------------------------------------------------------ outputs
    def scheduled(self, yieldable: Any, *, step: int | None = None, line: int = 0,
                  **extra: Any) -> History:
        """``step_scheduled`` for a yield; a value step takes ``value=`` (or ``error=``)."""
        k = self.last_step + 1 if step is None else step
        self.last_step = max(self.last_step, k)
        spec = normalise(yieldable)
        payload: dict[str, Any] = {"command": spec.describe(), "line": line}
        if isinstance(spec, StepSpec):
            payload["leaves"] = [{} for _ in spec.leaves]
        payload.update(extra)
        return self.add("step_scheduled", k, None, payload, key=f"step:{k}")

    def attempt(self, step: int, attempt: int, *, slot: int = 0, not_before: datetime | None = None,
                after: str = "ValueError") -> History:
        nb = (not_before or self.clock).isoformat()
        return self.add("attempt_scheduled", step, slot, {"attempt": attempt, "not_before": nb, "after": after})

    def ended(self, kind: str, **payload: Any) -> History:
        return self.add(kind, self.last_step, None, payload, key="end")

    # ------------------------------------------------------------ use
    def replay(self, flow: Any, *, run_id: str = RUN, now: datetime | None = None,
               decided_seq: int | None = None, inbox: Iterable[InboxSignal] = ()) -> Decision:
        """A fresh instance fed this whole history (the cache-miss path)."""
        _, d = replay(flow, run_id, copy_events(self.events), now=now or self.clock,
                      decided_seq=len(self.events) if decided_seq is None else decided_seq, inbox=list(inbox))
        return d

    def instance(self, flow: Any, *, run_id: str = RUN, now: datetime | None = None,
                 decided_seq: int | None = None) -> tuple[Instance, Decision]:
        return replay(flow, run_id, copy_events(self.events), now=now or self.clock,
                      decided_seq=len(self.events) if decided_seq is None else decided_seq)


def started(*args: Any, **kwargs: Any) -> History:
    """Start a history: ``started(1, 2).scheduled(...).completed(1, 3)``."""
    return History().started(*args, **kwargs)


# ---------------------------------------------------------------- the in-memory store


@dataclass
class Signal:
    id: int
    name: str
    payload: Any
    consumed: int | None = None


@dataclass
class Logged:
    """One activation the Sim performed, with everything needed to redo it cold."""

    prefix: int  # history length the activation saw
    decided_before: int
    now: datetime
    inbox: list[InboxSignal]
    decision: Decision
    boundary: int  # history length once its events were committed
    inbox_after: list[InboxSignal] = field(default_factory=list)
    gen_state: dict[str, Any] | None = None
    snapshot: dict[str, Any] = field(default_factory=dict)  # the decision as committed


class Sim:
    """A one-run in-memory store and advance loop around the engine.

    ``cache=True`` keeps one live ``Instance`` between decisions (the cache-hit path);
    ``cache=False`` builds a fresh one from the whole history each time (cache miss).
    ``workers=n`` advances the run on n workers in turn, each with its own cache, so a
    cached instance often has to catch up on decisions another worker committed.
    """

    def __init__(self, flow: Any, *args: Any, run_id: str = RUN, now: datetime = T0, cache: bool = True,
                 workers: int = 1, max_payload: int | None = None, **kwargs: Any) -> None:
        self.flow = flow
        self.run_id = run_id
        self.clock = now
        self.cache = cache
        self.max_payload = max_payload
        self.rows: list[dict[str, Any]] = []  # stored events, as JSON-ready dicts
        self.signals: list[Signal] = []
        self.caches: list[Instance | None] = [None] * workers
        self.turn = 0
        self.decided = 0
        self.status = RunStatus.RUNNING
        self.log: list[Logged] = []
        self.attempts: dict[tuple[int, int], int] = {}
        self._append(NewEvent("started", payload={"workflow": flow.name, "args": list(args), "kwargs": kwargs}))

    # ------------------------------------------------------------ the store
    @property
    def events(self) -> list[Event]:
        """The whole history, freshly loaded."""
        return [event_from_json(roundtrip(r)) for r in self.rows]

    @property
    def last(self) -> Decision:
        return self.log[-1].decision

    def kinds(self) -> list[str]:
        return [r["kind"] for r in self.rows]

    def _append(self, ev: NewEvent) -> int:
        seq = len(self.rows) + 1
        self.rows.append({"seq": seq, "kind": ev.kind, "step": ev.step, "slot": ev.slot,
                          "payload": roundtrip(ev.payload), "at": self.clock.isoformat(), "key": ev.key,
                          "name": ev.name})
        return seq

    def _inbox(self) -> list[InboxSignal]:
        return [InboxSignal(s.id, s.name, roundtrip(s.payload)) for s in self.signals if s.consumed is None]

    def input(self, kind: str, step: int | None = None, slot: int | None = None,
              payload: dict[str, Any] | None = None, key: str | None = None, name: str = "") -> bool:
        """Append an input as ``Store.append_input`` does: refused once terminal, deduplicated by key."""
        if self.status.terminal:
            return False
        if key is not None and any(r["key"] == key for r in self.rows):
            return False
        self._append(NewEvent(kind, step, slot, payload or {}, key, name))
        return True

    # ------------------------------------------------------------ the advance
    def decide(self) -> Decision:
        """One advance: activate the engine on what it has not seen, then commit the decision."""
        assert not self.status.terminal and self.status is not RunStatus.BLOCKED, f"run is {self.status.value}"
        worker = self.turn % len(self.caches)
        self.turn += 1
        inst = self.caches[worker] if self.cache else None
        if inst is None or inst.poisoned or inst.finished:
            inst = Instance(self.flow, self.run_id, self.max_payload)
        events = [e for e in self.events if e.seq > inst.seq]
        prefix, before, inbox = len(self.rows), self.decided, self._inbox()
        d = inst.activate(events, now=self.clock, decided_seq=self.decided, inbox=inbox)
        entry = Logged(prefix, before, self.clock, [InboxSignal(s.id, s.name, roundtrip(s.payload)) for s in inbox],
                       d, prefix, snapshot=comparable(d))
        self.log.append(entry)
        if d.status is RunStatus.BLOCKED:
            self.status = RunStatus.BLOCKED
            self.caches[worker] = None
            return d
        new = list(d.events)
        if d.status.terminal:
            if d.status is RunStatus.COMPLETED:
                payload: dict[str, Any] = {"result": d.result}
            elif d.status is RunStatus.CONTINUED:
                assert d.continue_as_new is not None
                payload = {"args": d.continue_as_new[0], "kwargs": d.continue_as_new[1]}
            else:
                payload = {"error": d.error}
            new.append(NewEvent(TERMINAL_EVENT[d.status], d.step, None, payload, key="end"))
        for ev in new:
            self._append(ev)
            if ev.kind == "signal_received":
                sig_row = next(s for s in self.signals if s.id == ev.payload["signal_id"])
                sig_row.consumed = ev.step
        for a in d.activities:
            self.attempts[(a.step, a.slot)] = a.attempt
        self.decided = len(self.rows)
        self.status = d.status
        entry.boundary = len(self.rows)
        entry.inbox_after = self._inbox()
        entry.gen_state = state(inst)
        inst.seq = self.decided  # as tasks.advance does: the live instance skips its own outputs
        self.caches[worker] = inst
        return d

    # ------------------------------------------------------------ inputs, fluently
    def tick(self, seconds: float) -> Sim:
        self.clock += timedelta(seconds=seconds)
        return self

    def complete(self, step: int, result: Any = None, *, slot: int = 0, attempt: int | None = None) -> Sim:
        n = attempt or self.attempts.get((step, slot), 1)
        self.input("activity_completed", step, slot, {"attempt": n, "result": result}, f"att:{step}:{slot}:{n}")
        return self

    def fail(self, step: int, error_type: str = "ValueError", message: str = "boom", *, slot: int = 0,
             attempt: int | None = None) -> Sim:
        n = attempt or self.attempts.get((step, slot), 1)
        error = {"type": error_type, "message": message,
                 "traceback": f"Traceback (most recent call last):\n{error_type}: {message}\n"}
        self.input("activity_failed", step, slot, {"attempt": n, "error": error}, f"att:{step}:{slot}:{n}")
        return self

    def fire(self, step: int, *, slot: int = 0, kind: str = "sleep") -> Sim:
        self.input("timer_fired", step, slot, {"kind": kind}, f"timer:{step}:{slot}")
        return self

    def signal(self, name: str, payload: Any = None) -> Sim:
        """Buffer a signal (the signals table); a wait takes it at the next decision."""
        self.signals.append(Signal(len(self.signals) + 1, name, roundtrip(payload)))
        return self

    def child_completed(self, step: int, result: Any = None, *, slot: int = 0, child: str = "") -> Sim:
        self.input("child_completed", step, slot, {"result": result, "child": child}, f"child:{step}:{slot}")
        return self

    def child_failed(self, step: int, error_type: str = "ValueError", message: str = "boom", *, slot: int = 0,
                     child: str = "") -> Sim:
        error = {"type": error_type, "message": message, "traceback": ""}
        self.input("child_failed", step, slot, {"error": error, "child": child}, f"child:{step}:{slot}")
        return self

    def cancel(self, reason: str = "") -> Sim:
        self.input("cancel_requested", payload={"reason": reason}, key="cancel")
        return self

    # ------------------------------------------------------------ checks
    def replay(self, upto: int | None = None, decided_seq: int | None = None,
               inbox: Iterable[InboxSignal] = ()) -> tuple[Instance, Decision]:
        """A fresh instance fed the first ``upto`` events (all by default): the cache-miss path."""
        events = self.events[:upto]
        return replay(self.flow, self.run_id, events, now=self.clock,
                      decided_seq=len(events) if decided_seq is None else decided_seq, inbox=list(inbox))

    def verify(self) -> None:
        """Every activation, redone cold from its prefix, decides the same; every committed
        boundary replays to the same state with no new outputs."""
        events = self.events
        for i, entry in enumerate(self.log):
            if not _draws_randomness(entry.decision):
                _, cold = replay(self.flow, self.run_id, copy_events(events[:entry.prefix]), now=entry.now,
                                 decided_seq=entry.decided_before, inbox=entry.inbox)
                assert comparable(cold) == entry.snapshot, f"activation {i} differs when redone cold"
            if entry.decision.status is RunStatus.BLOCKED:
                continue
            inst, again = replay(self.flow, self.run_id, copy_events(events[:entry.boundary]), now=entry.now,
                                 decided_seq=entry.boundary, inbox=entry.inbox_after)
            assert_no_outputs(again)
            assert again.status is entry.decision.status, f"boundary {entry.boundary}"
            assert again.step == entry.decision.step
            assert again.waiting_on == entry.decision.waiting_on
            assert again.result == roundtrip(entry.decision.result)
            assert (again.error or {}).get("type") == (entry.decision.error or {}).get("type")
            assert (again.error or {}).get("message") == (entry.decision.error or {}).get("message")
            assert state(inst) == entry.gen_state, f"state after boundary {entry.boundary} differs"


def state(inst: Instance) -> dict[str, Any]:
    """What must be identical between a live instance and a fresh replay of its history."""
    from sdk import checkpoint as cp

    cur = inst.current
    out: dict[str, Any] = {
        "step": inst.step, "finished": inst.finished, "cancel_reason": inst.cancel_reason,
        "current": None if cur is None else _freeze([cur.number, cur.done, cur.outcomes, cur.attempts]),
    }
    frame = cp.innermost_frame(inst.gen) if inst.gen is not None and not inst.finished else None
    if frame is not None:
        out["position"] = cp.position(inst.gen)  # type: ignore[arg-type]
        # types kept: a tuple in the live generator and a list in the replayed one is a divergence
        out["locals"] = {k: _freeze(v) for k, v in frame.f_locals.items() if not k.startswith(".")}
    return out


def _freeze(value: Any) -> Any:
    """A structural snapshot (types kept) so later mutation cannot change it."""
    if isinstance(value, list):
        return ("list", [_freeze(v) for v in value])
    if isinstance(value, tuple):
        return ("tuple", [_freeze(v) for v in value])
    if isinstance(value, dict):
        return ("dict", [(k, _freeze(v)) for k, v in value.items()])
    if isinstance(value, str | int | float | bool | type(None)):
        return value
    return ("repr", type(value).__name__)


def assert_no_outputs(d: Decision) -> None:
    assert d.events == [] and d.activities == [] and d.timers == [] and d.children == [], d
    assert d.cancels == [] and d.consumed_signals == [] and d.checkpoints == [], d


def comparable(d: Decision) -> dict[str, Any]:
    """A decision as plain data, for comparing a live activation with the same one redone cold."""
    out = roundtrip({
        "status": d.status.value, "events": [asdict(e) for e in d.events],
        "activities": [asdict(a) for a in d.activities], "timers": [asdict(t) for t in d.timers],
        "children": [asdict(c) for c in d.children], "cancels": [asdict(c) for c in d.cancels],
        "consumed": d.consumed_signals, "checkpoints": [asdict(c) for c in d.checkpoints],
        "result": d.result, "error": d.error, "continue_as_new": d.continue_as_new, "step": d.step,
        "waiting_on": d.waiting_on,
    })
    assert isinstance(out, dict)
    return out


def well_formed(d: Decision) -> None:
    """The shape every decision must have, whatever history produced it."""
    from sdk import serde

    assert isinstance(d.status, RunStatus)
    for ev in d.events:
        assert isinstance(ev, NewEvent) and ev.kind in ALL_KINDS, ev
        assert ev.kind in ("step_scheduled", "attempt_scheduled", "signal_received"), ev
        serde.dumps(ev.payload, f"payload of {ev.kind}", None)
    steps = [ev.step for ev in d.events if ev.kind == "step_scheduled"]
    assert len(steps) == len(set(steps)), "a step scheduled twice in one decision"
    for ck in d.checkpoints:
        serde.dumps(ck.locals, "checkpoint locals", None)
        assert set(ck.position) == {"file", "line", "function"}
    for a in d.activities:
        serde.dumps([a.args, a.kwargs, a.options], "activity", None)
    for c in d.children:
        serde.dumps([c.args, c.kwargs], "child", None)
    if d.status is RunStatus.COMPLETED:
        serde.dumps(d.result, "result", None)
        assert d.error is None
    elif d.status in (RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.BLOCKED):
        assert d.error is not None and {"type", "message", "traceback"} <= set(d.error), d.error
        serde.dumps(d.error, "error", None)
        assert d.result is None
    elif d.status is RunStatus.CONTINUED:
        assert d.continue_as_new is not None
        serde.dumps(list(d.continue_as_new), "continue_as_new", None)
    else:
        assert d.error is None and d.result is None
    if d.status is not RunStatus.RUNNING:
        assert d.waiting_on == []


def _draws_randomness(d: Decision) -> bool:
    """uuid4()/random() at the frontier differ on every draw: such activations cannot be redone equal."""
    return any(leaf.get("kind") in ("uuid4", "random")
               for ev in d.events if ev.kind == "step_scheduled"
               for leaf in ev.payload["command"]["leaves"])
