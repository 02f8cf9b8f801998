"""The replay engine: recorded history in, a :class:`Decision` out. No I/O of any kind.

An :class:`Instance` owns one live generator. ``activate(events, ...)`` applies the new
input events in ``seq`` order, resuming the generator whenever its current step resolves,
and checks every yield against the step recorded at that number (kind, name, digest of
the arguments). At the end of the history (the *frontier*) it records new steps and says
what to schedule. The same instance can be kept in a cache and fed only the events after
its position; a fresh instance fed the whole history reaches the identical state. User
code failing becomes a failed decision, divergence a blocked one: ``activate`` itself
raises only for corrupt input.
"""

from __future__ import annotations

import json
import random as _random
import traceback as _tb
import uuid as _uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from . import checkpoint as cp
from .commands import (
    Activity,
    Child,
    ContinueAsNew,
    Leaf,
    SignalWait,
    StepSpec,
    Timer,
    ValueSpec,
    format_step,
    normalise,
    step_label,
)
from .errors import (
    ActivityError,
    BatonError,
    Cancelled,
    NonDeterminismError,
    SerializationError,
    error_from_dict,
)
from .events import (
    ActivityTask,
    CancelTask,
    Checkpoint,
    ChildTask,
    Decision,
    Event,
    NewEvent,
    RunStatus,
    TimerTask,
)
from .serde import dumps, dumps_args
from .steps import Step


class Definition(Protocol):
    """What the engine needs of a workflow: its name and its generator function."""

    name: str
    fn: Callable[..., Any]
    redact: frozenset[str]


@dataclass(frozen=True, slots=True)
class InboxSignal:
    """An unconsumed signal offered to the frontier (oldest first)."""

    id: int
    name: str
    payload: Any


def failure(exc: BaseException) -> dict[str, Any]:
    """A failure as data: type, message, traceback text."""
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(_tb.format_exception(type(exc), exc, exc.__traceback__)),
    }


def _child_id(run_id: str, step: int, slot: int, width: int) -> str:
    return f"{run_id}/{step}" if width == 1 else f"{run_id}/{step}.{slot}"


class Instance:
    """One workflow run's generator, driven by its history."""

    def __init__(self, definition: Definition, run_id: str, max_payload: int | None = None) -> None:
        self.definition = definition
        self.run_id = run_id
        self.max_payload = max_payload
        self.gen: Generator[Any, Any, Any] | None = None
        self.seq = 0  # last event applied (inputs and indexed outputs alike)
        self.step = 0  # yields consumed so far
        self.current: Step | None = None
        self.finished = False
        self.poisoned = False  # a blocked instance must never be reused
        self.cancel_reason: str | None = None
        self.scheduled: dict[int, Event] = {}
        self.attempts: dict[tuple[int, int, int], Event] = {}
        self.last_locals: dict[str, Any] | None = None
        self.host: dict[str, Any] = {}  # opaque to the engine: what the hosting runtime keeps with it
        self._max_recorded_step = 0
        self._last_pos: dict[str, Any] = {"file": "?", "line": 0, "function": "?"}
        self._d = Decision()
        self._now = datetime.min
        self._live_from = 0
        self._live = True

    # ------------------------------------------------------------ entry point
    def activate(
        self,
        events: Sequence[Event],
        *,
        now: datetime,
        decided_seq: int,
        inbox: Sequence[InboxSignal] | Callable[[], Sequence[InboxSignal]] = (),
    ) -> Decision:
        """Apply ``events`` (all with ``seq`` > ``self.seq``) and decide what happens next.

        Args:
            events: the history after this instance's position, in seq order.
            now: the clock for frontier decisions (recorded, so replay never reads it).
            decided_seq: inputs at or below it were already acted on by a committed decision,
                so their side effects (cancelling losers) are not repeated.
            inbox: unconsumed signals, oldest first, offered to a signal wait at the frontier
                (or a function returning them, called only if a wait is reached).
        """
        if self.poisoned:
            raise BatonError(f"run {self.run_id}: this engine instance is blocked; build a fresh one")
        self._d = Decision()
        self._now = now
        self._live_from = decided_seq
        fresh = [e for e in events if e.seq > self.seq]
        current: Event | None = None
        try:
            for current in fresh:
                self._index(current)
            for current in fresh:
                self.seq = current.seq
                if current.kind in ("step_scheduled", "attempt_scheduled"):
                    continue
                self._live = current.seq > decided_seq
                self._apply(current)
            current = None
            self._live = True
            self._offer_inbox(inbox)
        except (KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
            # User code's exceptions are caught in _drive; anything here is a malformed event.
            self.poisoned = True
            where = f"event seq {current.seq} ({current.kind})" if current is not None else "its inbox"
            raise BatonError(f"run {self.run_id}: corrupt history at {where}: {type(exc).__name__}: {exc}; "
                             "the store was edited by hand or by an incompatible Baton") from exc
        except NonDeterminismError as exc:
            self.poisoned = True
            self._d.status = RunStatus.BLOCKED
            self._d.error = {**failure(exc), "step": exc.step, "recorded": exc.recorded, "new": exc.new,
                             "file": exc.file, "line": exc.line}
        self._d.step = self.step
        if self._d.status is RunStatus.RUNNING and self.current is not None:
            self._d.waiting_on = self.current.waiting()
            self._d.fan = self.current.fan()
        return self._d

    # ------------------------------------------------------------ indexing outputs
    def _index(self, ev: Event) -> None:
        if ev.kind == "step_scheduled" and ev.step is not None:
            self.scheduled[ev.step] = ev
            self._max_recorded_step = max(self._max_recorded_step, ev.step)
        elif ev.kind == "attempt_scheduled" and ev.step is not None and ev.slot is not None:
            self.attempts[(ev.step, ev.slot, int(ev.payload["attempt"]))] = ev

    # ------------------------------------------------------------ inputs
    def _apply(self, ev: Event) -> None:
        kind = ev.kind
        if kind == "started":
            self._start(ev)
            return
        if kind in ("completed", "failed", "cancelled", "continued_as_new"):
            self.finished = True
            return
        if self.finished or self.gen is None:
            return  # late input for a run that has ended: ignored by design
        if kind == "cancel_requested":
            self._cancel(str(ev.payload.get("reason", "")))
            return
        cur = self.current
        if cur is None or cur.done or ev.step != cur.number or ev.slot is None:
            return  # a late result of a step already resolved (a race loser, a cancelled step)
        slot = ev.slot
        if not 0 <= slot < len(cur.outcomes) or cur.outcomes[slot] is not None:
            return
        leaf = cur.spec.leaves[slot]
        if kind == "activity_completed":
            if int(ev.payload.get("attempt", 1)) == cur.attempts[slot]:
                self._settle(cur, slot, (True, ev.payload.get("result")))
        elif kind == "activity_failed":
            self._activity_failed(cur, slot, leaf, ev)
        elif kind == "timer_fired":
            if isinstance(leaf, SignalWait):
                err = {"kind": "signal_timeout", "type": "SignalTimeout", "name": leaf.name,
                       "timeout": leaf.timeout or 0, "message": f"no signal {leaf.name!r}"}
                self._settle(cur, slot, (False, err))
            elif isinstance(leaf, Timer):
                self._settle(cur, slot, (True, None))
        elif kind == "signal_received":
            if isinstance(leaf, SignalWait):
                self._settle(cur, slot, (True, ev.payload.get("payload")))
        elif kind == "child_completed":
            self._settle(cur, slot, (True, ev.payload.get("result")))
        elif kind == "child_failed":
            self._settle(cur, slot, (False, {**ev.payload.get("error", {}), "kind": "child",
                                             "child": ev.payload.get("child", "")}))
        else:
            raise BatonError(f"run {self.run_id}: unknown history event kind {kind!r} at seq {ev.seq}")

    def _start(self, ev: Event) -> None:
        if self.gen is not None:
            return
        args = list(ev.payload.get("args", []))
        kwargs = dict(ev.payload.get("kwargs", {}))
        try:
            gen = self.definition.fn(*args, **kwargs)
        except Exception as exc:
            self._fail(exc)
            return
        if not isinstance(gen, Generator):
            self._fail(TypeError(
                f"workflow {self.definition.name!r} returned {type(gen).__name__}, not a generator; "
                "a workflow body must contain at least one yield"))
            return
        self.gen = gen
        self._drive("send", None)

    def _activity_failed(self, cur: Step, slot: int, leaf: Leaf, ev: Event) -> None:
        attempt = int(ev.payload.get("attempt", 1))
        if attempt != cur.attempts[slot]:
            return
        error = dict(ev.payload.get("error", {}))
        policy = leaf.retry if isinstance(leaf, Activity) else None
        if (isinstance(leaf, Activity) and policy is not None and attempt < policy.max_attempts
                and error.get("type") not in policy.non_retryable):
            nxt = attempt + 1
            cur.attempts[slot] = nxt
            if self.attempts.pop((cur.number, slot, nxt), None) is not None:
                return  # replay: the retry was already scheduled (its record taken, as a step's is)
            at = ev.at or self._now
            not_before = at + timedelta(seconds=policy.delay(attempt))
            self._emit(NewEvent("attempt_scheduled", cur.number, slot,
                                {"attempt": nxt, "not_before": not_before.isoformat(), "after": error.get("type")},
                                name=leaf.task))
            self._d.activities.append(ActivityTask(cur.number, slot, nxt, leaf.task, list(leaf.args),
                                                   dict(leaf.kwargs), dict(leaf.options), leaf.timeout,
                                                   not_before))
            return
        error.setdefault("task", leaf.task if isinstance(leaf, Activity) else "")
        self._settle(cur, slot, (False, error))

    def _settle(self, cur: Step, slot: int, outcome: tuple[bool, Any]) -> None:
        cur.outcomes[slot] = outcome
        cur.settled.append(slot)
        mode = cur.spec.mode
        if mode == "first":
            cur.done = True
            self._cancel_leaves(cur, except_slot=slot)
            ok, value = outcome
            if ok:
                self._drive("send", (slot, value))
            else:
                self._drive("throw", error_from_dict(value, value.get("task", "")))
            return
        if len(cur.settled) < len(cur.outcomes):  # each slot settles once (guarded in _apply)
            return
        cur.done = True
        if mode == "one":
            ok, value = outcome
            if ok:
                self._drive("send", value)
            else:
                self._drive("throw", error_from_dict(value, value.get("task", "")))
            return
        failures = [i for i in cur.settled if not cur.outcomes[i][0]]  # type: ignore[index]
        if failures and not cur.spec.return_exceptions:
            bad = cur.outcomes[failures[0]][1]  # type: ignore[index]
            self._drive("throw", error_from_dict(bad, bad.get("task", "")))
            return
        values: list[Any] = []
        for out in cur.outcomes:
            assert out is not None
            values.append(out[1] if out[0] else error_from_dict(out[1], out[1].get("task", "")))
        self._drive("send", values)

    def _cancel(self, reason: str) -> None:
        if self.cancel_reason is not None:
            return
        self.cancel_reason = reason
        cur = self.current
        if cur is not None and not cur.done:
            cur.done = True
            self._cancel_leaves(cur, except_slot=None)
        self._drive("throw", Cancelled(reason))

    def _cancel_leaves(self, cur: Step, except_slot: int | None) -> None:
        if not self._live:
            return
        for slot, leaf in enumerate(cur.spec.leaves):
            if slot == except_slot or cur.outcomes[slot] is not None:
                continue
            width = len(cur.spec.leaves)
            if isinstance(leaf, Activity):
                self._d.cancels.append(CancelTask(cur.number, slot, "activity"))
            elif isinstance(leaf, Child):
                self._d.cancels.append(CancelTask(cur.number, slot, "child",
                                                  _child_id(self.run_id, cur.number, slot, width)))
            elif isinstance(leaf, Timer | SignalWait):
                self._d.cancels.append(CancelTask(cur.number, slot, "timer"))

    def _offer_inbox(self, source: Sequence[InboxSignal] | Callable[[], Sequence[InboxSignal]]) -> None:
        cur = self.current
        if self.finished or cur is None or cur.done or not cur.has_signal or not any(
                isinstance(leaf, SignalWait) and cur.outcomes[i] is None for i, leaf in enumerate(cur.spec.leaves)):
            return
        inbox = source() if callable(source) else source
        taken: set[int] = set()
        progressed = True
        while progressed and not self.finished and self.current is not None and not self.current.done:
            progressed = False
            cur = self.current
            for slot, leaf in enumerate(cur.spec.leaves):
                if cur.done or not isinstance(leaf, SignalWait) or cur.outcomes[slot] is not None:
                    continue
                sig = next((s for s in inbox if s.name == leaf.name and s.id not in taken), None)
                if sig is None:
                    continue
                taken.add(sig.id)
                self._d.consumed_signals.append(sig.id)
                self._emit(NewEvent("signal_received", cur.number, slot,
                                    {"payload": sig.payload, "signal_id": sig.id}, key=f"sig:{sig.id}",
                                    name=leaf.name))
                self._settle(cur, slot, (True, _copy(sig.payload)))
                progressed = True

    # ------------------------------------------------------------ the generator
    def _drive(self, method: str, value: Any) -> None:
        """Resume the generator and run it until it waits on an unresolved step or ends."""
        assert self.gen is not None
        while True:
            try:
                yielded = self.gen.send(value) if method == "send" else self.gen.throw(value)
            except StopIteration as stop:
                self._finish(stop.value)
                return
            except Cancelled as exc:
                self._end_cancelled(exc.reason)
                return
            except NonDeterminismError:
                raise
            except Exception as exc:
                self._fail(exc)
                return
            try:
                spec = normalise(yielded)
            except (TypeError, ValueError) as exc:
                method, value = "throw", exc  # thrown at that very yield; no step consumed
                continue
            if isinstance(spec, ValueSpec):
                method, value = self._value_step(spec)
                continue
            desc = spec.describe()
            rec = self.scheduled.get(self.step + 1)
            try:
                # A yield its recorded step matches was checked when recorded. One that does not
                # match may be a yield refused then (no step consumed): refused again here, it is
                # thrown in again, and what the workflow yields next meets the recorded step.
                matches = rec is not None and rec.payload.get("command") == desc
                texts = {} if matches else self._check_arguments(spec)
            except SerializationError as exc:
                method, value = "throw", exc  # refused at the yield, like a bad yield
                continue
            self._schedule(spec, desc, texts)
            return

    def _check_arguments(self, spec: StepSpec) -> dict[int, tuple[str, str]]:
        """Refuse arguments JSON cannot carry, or too large; returns each slot's (args, kwargs)
        JSON, which its task row stores (encoded once)."""
        texts = {}
        for slot, leaf in enumerate(spec.leaves):
            if isinstance(leaf, Activity | Child):
                name = leaf.task if isinstance(leaf, Activity) else leaf.workflow
                where = f" (item {slot})" if len(spec.leaves) > 1 else ""
                texts[slot] = dumps_args(list(leaf.args), dict(leaf.kwargs),
                                         f"arguments of {name}{where} at step {self.step + 1}", self.max_payload)
        return texts

    def _check(self, k: int, desc: dict[str, Any]) -> Event | None:
        if self.gen is not None:
            self._last_pos = cp.position(self.gen)
        # Taken, not read: a step's record is compared once, here, so a live instance holds the
        # records of the steps ahead of it only, not its whole history.
        rec = self.scheduled.pop(k, None)
        if rec is None:
            return None
        recorded = rec.payload.get("command")
        if recorded != desc:
            assert self.gen is not None
            pos = cp.position(self.gen)
            raise NonDeterminismError(
                f"run {self.run_id} step {k}: the workflow now yields {format_step(desc)} at "
                f"{pos['file']}:{pos['line']} ({pos['function']}), but its history recorded {format_step(recorded)} "
                f"(at line {rec.payload.get('line', '?')}). The code changed under a running workflow: "
                "restore it, or guard the change with `if (yield patched('change-id')):`, "
                f"then call baton.resume({self.run_id!r})",
                run_id=self.run_id, step=k, recorded=recorded, new=desc, file=pos["file"], line=pos["line"],
            )
        return rec

    def _value_step(self, spec: ValueSpec) -> tuple[str, Any]:
        k = self.step + 1
        rec = self.scheduled.get(k)
        if spec.kind == "patched":
            is_marker = rec is not None and rec.payload.get("command") == spec.describe()
            if rec is not None and not is_marker:
                return "send", False  # history predates the change: old path, no step consumed
        self.step = k
        rec = self._check(k, spec.describe())
        if rec is None:
            payload = self._compute(spec)
            self._record_step(k, spec.describe(), extra=payload)
        else:
            payload = rec.payload
        if "error" in payload:
            err = payload["error"]
            return "throw", ActivityError(err.get("task", spec.kind), err["type"], err["message"],
                                          err.get("traceback", ""))
        value = _copy(payload.get("value"))  # the generator never holds the recorded object itself
        if spec.kind == "now":
            return "send", datetime.fromisoformat(str(value))
        if spec.kind == "uuid4":
            return "send", _uuid.UUID(value)
        return "send", value

    def _compute(self, spec: ValueSpec) -> dict[str, Any]:
        if spec.kind == "now":
            return {"value": self._now.isoformat()}
        if spec.kind == "uuid4":
            return {"value": str(_uuid.uuid4())}
        if spec.kind == "random":
            return {"value": _random.random()}
        if spec.kind == "patched":
            return {"value": True}
        assert spec.fn is not None
        name = getattr(spec.fn, "__qualname__", repr(spec.fn))
        try:
            value = spec.fn(*spec.args)
            text = dumps(value, f"result of side_effect {name}", self.max_payload)
        except Exception as exc:
            return {"error": {**failure(exc), "task": name}}
        return {"value": json.loads(text)}  # what a replay will see: tuples become lists

    def _schedule(self, spec: StepSpec, desc: dict[str, Any], texts: dict[int, tuple[str, str]]) -> None:
        k = self.step + 1
        self.step = k
        width = len(spec.leaves)
        cur = Step.new(k, spec, desc["leaves"])
        self.current = cur
        if self._check(k, desc) is not None:
            return  # replay: already scheduled; its inputs follow in the history
        leaves_extra: list[dict[str, Any]] = []
        for slot, leaf in enumerate(spec.leaves):
            extra: dict[str, Any] = {}
            if isinstance(leaf, Activity):
                args_json, kwargs_json = texts.get(slot, (None, None))
                self._d.activities.append(ActivityTask(k, slot, 1, leaf.task, list(leaf.args), dict(leaf.kwargs),
                                                       dict(leaf.options), leaf.timeout, args_json=args_json,
                                                       kwargs_json=kwargs_json))
            elif isinstance(leaf, Child):
                child = _child_id(self.run_id, k, slot, width)
                extra["child"] = child
                self._d.children.append(ChildTask(k, slot, child, leaf.workflow, list(leaf.args),
                                                  dict(leaf.kwargs)))
            elif isinstance(leaf, Timer):
                fire_at = leaf.until if leaf.until is not None else self._now + timedelta(seconds=leaf.seconds or 0)
                extra["fire_at"] = fire_at.isoformat()
                self._d.timers.append(TimerTask(k, slot, "sleep", fire_at))
            elif leaf.timeout is not None:
                fire_at = self._now + timedelta(seconds=leaf.timeout)
                extra["fire_at"] = fire_at.isoformat()
                self._d.timers.append(TimerTask(k, slot, "signal_timeout", fire_at))
            leaves_extra.append(extra)
        self._record_step(k, desc, extra={"leaves": leaves_extra}, waiting=cur.waiting())

    def _record_step(self, k: int, desc: dict[str, Any], extra: dict[str, Any],
                     waiting: list[dict[str, Any]] | None = None) -> None:
        assert self.gen is not None
        pos = cp.position(self.gen)
        payload = {"command": desc, "line": pos["line"], **extra}
        ev = NewEvent("step_scheduled", k, None, payload, key=f"step:{k}", name=step_label(desc))
        self._emit(ev)
        self._max_recorded_step = max(self._max_recorded_step, k)
        current = cp.snapshot_locals(self.gen, self.definition.redact)
        self._d.checkpoints.append(Checkpoint(k, pos, current, waiting or [], self._now))
        self.last_locals = current

    def _emit(self, ev: NewEvent) -> None:
        self._d.events.append(ev)

    # ------------------------------------------------------------ endings
    def _finish(self, value: Any) -> None:
        if self.cancel_reason is not None:
            self._end_cancelled(self.cancel_reason)
            return
        self._guard_replay_end("returned")
        self.finished = True
        self.current = None
        if isinstance(value, ContinueAsNew):
            try:
                dumps([list(value.args), dict(value.kwargs)], "continue_as_new() arguments", self.max_payload)
            except SerializationError as exc:
                self._fail(exc)
                return
            self._d.status = RunStatus.CONTINUED
            self._d.continue_as_new = (list(value.args), dict(value.kwargs))
            return
        try:
            dumps(value, f"return value of workflow {self.definition.name!r}", self.max_payload)
        except SerializationError as exc:
            self._fail(exc)
            return
        self._d.status = RunStatus.COMPLETED
        self._d.result = value

    def _fail(self, exc: BaseException) -> None:
        self._guard_replay_end(f"raised {type(exc).__name__}: {exc}")
        self.finished = True
        self.current = None
        self._d.status = RunStatus.FAILED
        self._d.error = failure(exc)

    def _end_cancelled(self, reason: str) -> None:
        self._guard_replay_end("ended cancelled")
        self.finished = True
        self.current = None
        self._d.status = RunStatus.CANCELLED
        self._d.error = {"type": "Cancelled", "message": reason or "cancelled", "traceback": ""}

    def _guard_replay_end(self, how: str) -> None:
        if self._max_recorded_step > self.step:
            nxt = self.scheduled[self._max_recorded_step].payload.get("command")
            pos = self._last_pos
            raise NonDeterminismError(
                f"run {self.run_id}: the workflow {how} after step {self.step} (last yield at {pos['file']}:"
                f"{pos['line']}, in {pos['function']}) on replay, but its history goes on to step "
                f"{self._max_recorded_step} ({format_step(nxt)}). The code changed under a running workflow: restore "
                f"it, then call baton.resume({self.run_id!r})",
                run_id=self.run_id, step=self.step + 1, recorded=nxt, new=how, file=pos["file"], line=pos["line"],
            )

    def awaits_only(self, step: int, slot: int, attempt: int) -> bool:
        """True if the run waits on this one activity attempt and nothing else: its outcome
        alone decides what comes next, so a cached instance may decide before the store is
        read (the host then checks, under the lock, that nothing else happened meanwhile)."""
        cur = self.current
        return (cur is not None and self.gen is not None and not cur.done and not self.finished
                and not self.poisoned and self.cancel_reason is None and cur.number == step and slot == 0
                and len(cur.outcomes) == 1 and cur.attempts[0] == attempt
                and isinstance(cur.spec.leaves[0], Activity))


def _copy(value: Any) -> Any:
    """A private copy of JSON data, so user code mutating it cannot rewrite history."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return json.loads(json.dumps(value))


def replay(definition: Definition, run_id: str, events: Sequence[Event], *, now: datetime,
           decided_seq: int, inbox: Sequence[InboxSignal] | Callable[[], Sequence[InboxSignal]] = ()
           ) -> tuple[Instance, Decision]:
    """Build a fresh instance and feed it a whole history (the cache-miss path)."""
    inst = Instance(definition, run_id)
    return inst, inst.activate(events, now=now, decided_seq=decided_seq, inbox=inbox)
