"""Position and locals of a suspended generator, made JSON-safe and bounded.

Bounds (documented in docs/design.md): each value's JSON is capped at
``MAX_VALUE_CHARS``; a larger or non-JSON value is stored as a ``repr`` truncated to
``MAX_REPR_CHARS``. A checkpoint's locals are capped at ``MAX_CHECKPOINT_CHARS`` in all;
past that, the remaining names hold a short marker. Per-step history stores only what
changed since the previous step, so a 1 MB local held for 5,000 steps costs one capped
value, not 5 GB.
"""

from __future__ import annotations

import json
import math
import types
from collections.abc import Generator
from typing import Any

MAX_VALUE_CHARS = 2_000
MAX_REPR_CHARS = 200
MAX_CHECKPOINT_CHARS = 64_000
OVER_BUDGET = "<omitted: checkpoint size cap reached>"


def innermost_frame(gen: Generator[Any, Any, Any]) -> types.FrameType | None:
    """The frame actually paused at a yield, following ``yield from`` delegation."""
    frame: types.FrameType | None = getattr(gen, "gi_frame", None)
    inner: Any = gen
    while getattr(inner, "gi_yieldfrom", None) is not None and hasattr(inner.gi_yieldfrom, "gi_frame"):
        inner = inner.gi_yieldfrom
        if inner.gi_frame is not None:
            frame = inner.gi_frame  # a nested generator's frame
    assert frame is None or isinstance(frame, types.FrameType)
    return frame


def position(gen: Generator[Any, Any, Any]) -> dict[str, Any]:
    """File, line and function of the current yield (diagnostic, never a resume pointer)."""
    frame = innermost_frame(gen)
    if frame is None:
        return {"file": "", "line": 0, "function": ""}
    return {"file": frame.f_code.co_filename, "line": frame.f_lineno, "function": frame.f_code.co_name}


def _safe(value: Any) -> Any:
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return _repr(value)
    if len(text) > MAX_VALUE_CHARS:
        return _repr(value)
    return json.loads(text)  # a snapshot in the store's own terms (int keys become str, tuples lists)


def _repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not break the run
        text = f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"
    if len(text) > MAX_REPR_CHARS:
        text = text[: MAX_REPR_CHARS - 3] + "..."
    return text


def snapshot_locals(
    gen: Generator[Any, Any, Any], redact: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """A JSON-safe, size-capped view of the paused generator's locals."""
    frame = innermost_frame(gen)
    if frame is None:
        return {}
    names = [n for n in frame.f_locals if not n.startswith(".")]  # ".0" etc. are comprehension internals
    # Every name is listed; room for a marker per name is reserved first, so the whole view
    # (JSON punctuation included) stays under the cap whatever the values are.
    marker = {n: len(json.dumps(n)) + len(json.dumps(OVER_BUDGET)) + 2 for n in names}
    budget = MAX_CHECKPOINT_CHARS - sum(marker.values()) - 2
    out: dict[str, Any] = {}
    for name in names:
        value = frame.f_locals[name]
        safe = "<redacted>" if name in redact else _safe(value)
        if isinstance(safe, float) and not math.isfinite(safe):
            safe = _repr(safe)
        extra = len(json.dumps(safe)) - len(json.dumps(OVER_BUDGET))
        if extra > budget:
            out[name] = OVER_BUDGET
            continue
        budget -= max(extra, 0)
        out[name] = safe
    return out


def delta(previous: dict[str, Any] | None, current: dict[str, Any]) -> dict[str, Any]:
    """What changed from ``previous`` to ``current``: ``{"set": {...}, "unset": [...]}``."""
    if previous is None:
        return {"full": True, "set": current, "unset": []}
    changed = {k: v for k, v in current.items() if k not in previous or previous[k] != v}
    removed = [k for k in previous if k not in current]
    return {"full": False, "set": changed, "unset": removed}


def apply_delta(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the locals of a step from the previous step's locals and its delta."""
    out = {} if change.get("full") else dict(base)
    out.update(change.get("set", {}))
    for name in change.get("unset", []):
        out.pop(name, None)
    return out
