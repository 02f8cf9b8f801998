"""A yielded step's live state inside the engine: its slots' outcomes and attempts, and the
two questions the host asks of it (what does it wait on; is it a fan-out whose results can
be counted down without running the generator). Pure data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .commands import Activity, SignalWait, StepSpec

# A checkpoint's waiting list names at most this many open slots, then counts the rest: a
# 1,000-way fan-out must not rewrite 1,000 descriptions on every completion.
MAX_WAITING_LISTED = 20


@dataclass(slots=True)
class Step:
    number: int
    spec: StepSpec
    outcomes: list[tuple[bool, Any] | None]
    attempts: list[int]
    settled: list[int] = field(default_factory=list)
    done: bool = False
    leaf_desc: list[dict[str, Any]] = field(default_factory=list)  # computed once: digests are not free
    has_signal: bool = False
    fanout: bool = False  # two or more activities, all needed: only the last open slot can resolve it
    first_open: int = 0  # no slot before it is open (slots never reopen): waiting lists start here

    @classmethod
    def new(cls, number: int, spec: StepSpec, leaf_desc: list[dict[str, Any]]) -> Step:
        width = len(spec.leaves)
        return cls(number, spec, [None] * width, [1] * width, leaf_desc=leaf_desc,
                   has_signal=any(isinstance(leaf, SignalWait) for leaf in spec.leaves),
                   fanout=(spec.mode == "all" and width >= 2
                           and all(isinstance(leaf, Activity) for leaf in spec.leaves)))

    def fan(self) -> tuple[int, int] | None:
        """(step, open slots) while this is an unresolved fan-out, else None."""
        if self.done or not self.fanout:
            return None
        return self.number, len(self.outcomes) - len(self.settled)

    def waiting(self) -> list[dict[str, Any]]:
        """The open slots' descriptions (at most ``MAX_WAITING_LISTED``, then a count)."""
        out: list[dict[str, Any]] = []
        outcomes = self.outcomes
        while self.first_open < len(outcomes) and outcomes[self.first_open] is not None:
            self.first_open += 1
        for slot in range(self.first_open, len(outcomes)):  # O(listed), not O(width), per completion
            if outcomes[slot] is None:
                if len(out) == MAX_WAITING_LISTED:
                    break
                out.append({**self.leaf_desc[slot], "slot": slot, "attempt": self.attempts[slot]})
        rest = len(outcomes) - len(self.settled) - len(out)
        if rest > 0:
            out.append({"kind": "more", "name": f"{rest} more", "digest": "",
                        "slot": -1, "attempt": 0, "count": rest})
        return out
