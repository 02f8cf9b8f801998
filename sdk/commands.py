"""What a workflow may yield, and how each yield becomes one recorded step.

Every yield is normalised into a :class:`StepSpec`: a combinator (``one``, ``all``,
``first``) over *leaves* (an activity, a child run, a timer, a signal wait), or a
:class:`ValueSpec` for values computed once and recorded (``now()``, ``uuid4()``, ...).
Celery signatures are recognised by shape (a dict with ``task`` and ``subtask_type``), so
this module, like the rest of the engine, never imports Celery.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from .serde import digest

# ---------------------------------------------------------------- leaves


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Engine-managed retries of one activity, with exponential backoff.

    Args:
        max_attempts: attempts in all, the first included (1 means no retry).
        initial_interval: seconds before the second attempt.
        backoff: factor applied to the interval after each failed attempt.
        max_interval: ceiling for the interval, in seconds.
        non_retryable: exception type names that fail the step at once.
    """

    max_attempts: int = 3
    initial_interval: float = 1.0
    backoff: float = 2.0
    max_interval: float = 60.0
    non_retryable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_interval < 0 or self.backoff < 1 or self.max_interval < 0:
            raise ValueError("RetryPolicy intervals must be >= 0 and backoff >= 1")

    def delay(self, failed_attempt: int) -> float:
        """Seconds to wait after attempt ``failed_attempt`` (1-based) failed."""
        return float(min(self.max_interval, self.initial_interval * self.backoff ** (failed_attempt - 1)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_attempts": self.max_attempts,
            "initial_interval": self.initial_interval,
            "backoff": self.backoff,
            "max_interval": self.max_interval,
            "non_retryable": list(self.non_retryable),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RetryPolicy | None:
        if not data:
            return None
        return cls(
            max_attempts=int(data["max_attempts"]),
            initial_interval=float(data["initial_interval"]),
            backoff=float(data["backoff"]),
            max_interval=float(data["max_interval"]),
            non_retryable=tuple(data.get("non_retryable", ())),
        )


# Options of a signature that travel with the message. Everything else (link, chord
# bookkeeping, task_id) is Baton's to set.
PASS_OPTIONS = ("queue", "routing_key", "exchange", "priority", "countdown", "expires",
                "time_limit", "soft_time_limit")


@dataclass(frozen=True, slots=True)
class Activity:
    """One Celery task to run. ``step(...)`` adds retry and timeout."""

    task: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    retry: RetryPolicy | None = None
    timeout: float | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": "activity", "name": self.task, "digest": digest([list(self.args), dict(self.kwargs)])}


@dataclass(frozen=True, slots=True)
class Child:
    """A child workflow run; made by ``some_workflow.s(...)``."""

    workflow: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"kind": "child", "name": self.workflow, "digest": digest([list(self.args), dict(self.kwargs)])}


@dataclass(frozen=True, slots=True)
class Timer:
    """A durable timer: ``sleep(seconds)`` or ``sleep_until(datetime)``."""

    seconds: float | None = None
    until: datetime | None = None

    def describe(self) -> dict[str, Any]:
        if self.until is not None:
            return {"kind": "timer", "name": "sleep_until", "digest": self.until.isoformat()}
        return {"kind": "timer", "name": "sleep", "digest": format(self.seconds or 0.0, ".15g")}


@dataclass(frozen=True, slots=True)
class SignalWait:
    """``wait_signal(name, timeout)``: resolves with the oldest unconsumed payload."""

    name: str
    timeout: float | None = None

    def describe(self) -> dict[str, Any]:
        digest = "" if self.timeout is None else format(self.timeout, ".15g")
        return {"kind": "signal", "name": self.name, "digest": digest}


Leaf = Activity | Child | Timer | SignalWait


@dataclass(frozen=True, slots=True)
class Gather:
    """Fan-out: every item runs; the results come back as a list, in order."""

    items: tuple[Any, ...]
    return_exceptions: bool = False


@dataclass(frozen=True, slots=True)
class First:
    """Race: ``(index, result)`` of the first item to settle; the others are cancelled."""

    items: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class StepSpec:
    """A normalised yield: a combinator over leaves."""

    mode: str  # "one" | "all" | "first"
    leaves: tuple[Leaf, ...]
    return_exceptions: bool = False

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "leaves": [leaf.describe() for leaf in self.leaves]}


# ---------------------------------------------------------------- recorded values


@dataclass(frozen=True, slots=True)
class ValueSpec:
    """A value computed once at the frontier, recorded, and replayed unchanged."""

    kind: str  # "now" | "uuid4" | "random" | "side_effect" | "patched"
    fn: Callable[..., Any] | None = None
    args: tuple[Any, ...] = ()
    name: str = ""

    def describe(self) -> dict[str, Any]:
        name = self.name
        if self.kind == "side_effect" and self.fn is not None:
            name = getattr(self.fn, "__qualname__", repr(self.fn))
        return {"mode": "value", "leaves": [{"kind": self.kind, "name": name, "digest": ""}]}


@dataclass(frozen=True, slots=True)
class ContinueAsNew:
    """Returned by a workflow to restart itself with a fresh, empty history."""

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]


# ---------------------------------------------------------------- public constructors


def _seconds(value: float | int | timedelta, what: str) -> float:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(f"{what} takes seconds (int or float) or a timedelta, not {type(value).__name__}")
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{what} needs a duration >= 0, got {value!r}")
    return seconds


def sleep(duration: float | int | timedelta) -> Timer:
    """A durable timer: yield it and the run resumes once ``duration`` has passed.

    No worker is held while it waits; any worker fires it once it is due.
    """
    return Timer(seconds=_seconds(duration, "sleep()"))


def sleep_until(when: datetime) -> Timer:
    """A durable timer that fires at ``when`` (naive datetimes are taken as UTC)."""
    if not isinstance(when, datetime):
        raise TypeError(f"sleep_until() takes a datetime, not {type(when).__name__}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return Timer(until=when)


def wait_signal(name: str, timeout: float | int | timedelta | None = None) -> SignalWait:
    """Wait for the oldest unconsumed signal ``name``; raises ``SignalTimeout`` after ``timeout``."""
    if not isinstance(name, str) or not name:
        raise TypeError("wait_signal() needs a non-empty signal name")
    return SignalWait(name=name, timeout=None if timeout is None else _seconds(timeout, "wait_signal(timeout=)"))


def gather(*items: Any, return_exceptions: bool = False) -> Gather:
    """Run every item at once; the step's result is the list of their results, in order.

    With ``return_exceptions=True`` failures come back as error values instead of raising.
    """
    if not items:
        raise ValueError("gather() needs at least one item: there is nothing to wait for")
    return Gather(items=tuple(items), return_exceptions=return_exceptions)


def first(*items: Any) -> First:
    """Race the items: ``(index, result)`` of the first to settle; the rest are cancelled."""
    if not items:
        raise ValueError("first() needs at least one item: an empty race never finishes")
    return First(items=tuple(items))


def step(signature: Any, retry: RetryPolicy | None = None, timeout: float | timedelta | None = None) -> Activity:
    """An activity with engine-managed retries and a per-attempt timeout (seconds)."""
    base = _leaf(signature)
    if not isinstance(base, Activity):
        raise TypeError(f"step() takes a Celery signature, not {type(signature).__name__}")
    seconds = None if timeout is None else _seconds(timeout, "step(timeout=)")
    if seconds is not None and seconds <= 0:
        raise ValueError("step(timeout=) must be > 0 seconds")
    return Activity(base.task, base.args, base.kwargs, base.options, retry, seconds)


def now() -> ValueSpec:
    """The current time (UTC, aware), recorded once; replays return the recorded value."""
    return ValueSpec("now")


def uuid4() -> ValueSpec:
    """A random UUID, recorded once."""
    return ValueSpec("uuid4")


def random() -> ValueSpec:
    """A float in [0, 1), recorded once."""
    return ValueSpec("random")


def side_effect(fn: Callable[..., Any], *args: Any) -> ValueSpec:
    """Call ``fn(*args)`` once, at the frontier; record and replay its JSON result."""
    if not callable(fn):
        raise TypeError(f"side_effect() needs a callable, not {type(fn).__name__}")
    return ValueSpec("side_effect", fn=fn, args=args)


def patched(change_id: str) -> ValueSpec:
    """True on code paths new to this run, False when replaying history recorded before them."""
    if not isinstance(change_id, str) or not change_id:
        raise TypeError("patched() needs a non-empty change id string")
    return ValueSpec("patched", name=change_id)


def continue_as_new(*args: Any, **kwargs: Any) -> ContinueAsNew:
    """``return continue_as_new(...)`` ends this run and starts the workflow afresh, same id."""
    return ContinueAsNew(args=args, kwargs=kwargs)


# ---------------------------------------------------------------- normalisation

ACCEPTED = (
    "a Celery signature (task.s(...)), a list/tuple/group of them, gather(...), first(...), "
    "step(...), sleep(...), sleep_until(...), wait_signal(...), a child workflow's .s(...), "
    "now(), uuid4(), random(), side_effect(...) or patched(...)"
)


def _is_signature(obj: Any) -> bool:
    return isinstance(obj, dict) and "task" in obj and "subtask_type" in obj


def _leaf(obj: Any) -> Leaf:
    if isinstance(obj, Activity | Child | Timer | SignalWait):
        return obj
    if _is_signature(obj):
        kind = obj.get("subtask_type")
        if kind is not None:
            raise TypeError(
                f"a Celery {kind} cannot be yielded as one step; yield its tasks one by one, "
                "or a list of them for a fan-out"
            )
        options = {k: v for k, v in dict(obj.get("options") or {}).items() if k in PASS_OPTIONS}
        return Activity(str(obj["task"]), tuple(obj.get("args") or ()), dict(obj.get("kwargs") or {}), options)
    raise TypeError(f"cannot yield {type(obj).__name__!s} {_short(obj)}; a workflow may yield {ACCEPTED}")


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


def _items(objs: Iterable[Any]) -> tuple[Leaf, ...]:
    leaves = tuple(_leaf(o) for o in objs)
    if not leaves:
        raise ValueError("cannot yield an empty fan-out: there is nothing to wait for")
    return leaves


def normalise(obj: Any) -> StepSpec | ValueSpec:
    """Turn one yielded object into its step; ``TypeError``/``ValueError`` name what is wrong."""
    if isinstance(obj, ValueSpec):
        return obj
    if isinstance(obj, Gather):
        return StepSpec("all", _items(obj.items), obj.return_exceptions)
    if isinstance(obj, First):
        return StepSpec("first", _items(obj.items))
    if isinstance(obj, list | tuple):
        return StepSpec("all", _items(obj))
    if _is_signature(obj) and obj.get("subtask_type") == "group":
        return StepSpec("all", _items(obj.get("kwargs", {}).get("tasks", ())))
    return StepSpec("one", (_leaf(obj),))


def step_label(desc: dict[str, Any]) -> str:
    """A step description's short name for histories: ``activity:t.add`` or ``all[60]``."""
    leaves = desc.get("leaves", [])
    if len(leaves) == 1:
        return f"{leaves[0]['kind']}:{leaves[0]['name']}"
    return f"{desc.get('mode')}[{len(leaves)}]"


def format_step(desc: Any) -> str:
    """A step description for error messages: its leaves, their digests and the mode."""
    if not isinstance(desc, dict):
        return repr(desc)
    leaves = ", ".join(f"{x.get('kind')} {x.get('name')!r}" + (f" #{x['digest']}" if x.get("digest") else "")
                       for x in desc.get("leaves", []))
    mode = desc.get("mode")
    return leaves if mode in ("one", "value") else f"{mode}({leaves})"
