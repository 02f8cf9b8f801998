"""The recorded history of a run, and the decision the engine returns for it.

A history is an ordered list of :class:`Event`. Two families:

* *inputs* (``started``, ``activity_completed``, ``activity_failed``, ``timer_fired``,
  ``signal_received``, ``child_completed``, ``child_failed``, ``cancel_requested``) drive
  the generator, and are applied strictly in ``seq`` order;
* *outputs* (``step_scheduled``, ``attempt_scheduled``) record what the generator asked
  for; replay looks them up by step and compares, it never feeds them in.

This split is what makes a cached live generator and a cold replay agree: both apply the
same inputs in the same order, whichever worker appended the outputs in between.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any


class RunStatus(str, Enum):
    """Where a run stands; stored as its string value."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BLOCKED = "blocked"
    CONTINUED = "continued"  # closed by continue_as_new; the chain goes on in a newer run

    @property
    def terminal(self) -> bool:
        return self in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.CONTINUED)


INPUT_KINDS = frozenset({
    "started", "activity_completed", "activity_failed", "timer_fired", "signal_received",
    "child_completed", "child_failed", "cancel_requested",
})
OUTPUT_KINDS = frozenset({"step_scheduled", "attempt_scheduled"})
TERMINAL_KINDS = frozenset({"completed", "failed", "cancelled", "continued_as_new"})
ALL_KINDS = INPUT_KINDS | OUTPUT_KINDS | TERMINAL_KINDS


@dataclass(frozen=True, slots=True)
class Event:
    """One recorded fact of a run. ``key`` makes an input idempotent (unique per run)."""

    seq: int
    kind: str
    step: int | None = None
    slot: int | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    at: datetime | None = None
    key: str | None = None
    name: str = ""


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event the engine asks the store to append (the store assigns seq and time)."""

    kind: str
    step: int | None = None
    slot: int | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    name: str = ""


@dataclass(frozen=True, slots=True)
class ActivityTask:
    """An attempt of an activity to create and publish."""

    step: int
    slot: int
    attempt: int
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]
    timeout: float | None = None
    not_before: datetime | None = None
    # args and kwargs as JSON, when the engine encoded them already (checking them at the yield)
    args_json: str | None = field(default=None, compare=False, repr=False)
    kwargs_json: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class TimerTask:
    """A durable timer row: ``kind`` is ``sleep`` or ``signal_timeout``."""

    step: int
    slot: int
    kind: str
    fire_at: datetime


@dataclass(frozen=True, slots=True)
class ChildTask:
    """A child run to create in the same transaction as the parent's decision."""

    step: int
    slot: int
    run_id: str
    workflow: str
    args: list[Any]
    kwargs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CancelTask:
    """Something outstanding to stop: an activity attempt, a timer, or a child run."""

    step: int
    slot: int
    kind: str  # "activity" | "timer" | "child" | "signal"
    child_run_id: str | None = None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where the generator stands at a yield, and what it holds.

    ``locals`` maps names to JSON-safe values (values that do not serialise, or are over
    the size cap, appear as a truncated ``repr``). ``position`` has file, line, function.
    """

    step: int
    position: dict[str, Any]
    locals: dict[str, Any]
    waiting_on: list[dict[str, Any]]
    at: datetime | None = None


@dataclass(slots=True)
class Decision:
    """What one engine activation concluded. Outputs only: the engine performs no I/O."""

    status: RunStatus = RunStatus.RUNNING
    events: list[NewEvent] = field(default_factory=list)
    activities: list[ActivityTask] = field(default_factory=list)
    timers: list[TimerTask] = field(default_factory=list)
    children: list[ChildTask] = field(default_factory=list)
    cancels: list[CancelTask] = field(default_factory=list)
    consumed_signals: list[int] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    result: Any = None
    error: dict[str, Any] | None = None
    continue_as_new: tuple[list[Any], dict[str, Any]] | None = None
    step: int = 0
    waiting_on: list[dict[str, Any]] = field(default_factory=list)
    # (step, open slots) when the run now waits on a fan-out of activities alone: its successful
    # completions can then be recorded without running the generator, until the last one.
    fan: tuple[int, int] | None = None
