"""Position and locals of a suspended generator, made JSON-safe and bounded.

Bounds (documented in docs/design.md): each value's JSON is capped at
``MAX_VALUE_CHARS``; a larger or non-JSON value is stored as a ``repr`` truncated to
``MAX_REPR_CHARS``. A checkpoint's locals are capped at ``MAX_CHECKPOINT_CHARS`` in all;
past that, the remaining names hold a short marker. Per-step history stores only what
changed since the previous step, so a 1 MB local held for 5,000 steps costs one capped
value, not 5 GB.
"""

from __future__ import annotations

import functools
import json
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


# One encoder, reused: ``json.dumps`` with any option builds a new one per call. Same output
# as ``json.dumps(value, allow_nan=False)``; the sizes below are of that text.
_encode = json.JSONEncoder(allow_nan=False).encode
_OVER_BUDGET_CHARS = len(_encode(OVER_BUDGET))
_REDACTED = "<redacted>"
_REDACTED_CHARS = len(_encode(_REDACTED))


@functools.lru_cache(maxsize=4096)
def _name_chars(name: str) -> int:
    return len(_encode(name))


def _safe(value: Any) -> tuple[Any, int]:
    """The value as the store will hold it, and the length of its JSON text.

    A value whose JSON is certainly over the cap (a long string, a big container: an agent's
    growing conversation) is found so by :func:`_at_least` without being encoded, and its repr
    is built only as far as the cap: a snapshot costs what the caps allow, not what the locals
    weigh."""
    kind = type(value)
    if value is None or kind is bool:
        return value, 4 if value is None or value else 5  # null, true, false
    if _at_least(value, MAX_VALUE_CHARS) > MAX_VALUE_CHARS:
        return _safe_repr(value)
    try:
        text = str(value) if kind is int else _encode(value)  # int: ValueError past CPython's digit limit
    except (TypeError, ValueError, RecursionError):
        return _safe_repr(value)
    if len(text) > MAX_VALUE_CHARS:
        return _safe_repr(value)
    if kind is int or kind is str:
        return value, len(text)
    # a snapshot in the store's own terms (int keys become str, tuples lists)
    return json.loads(text), len(text)


def _at_least(value: Any, limit: int) -> int:
    """A lower bound on the length of ``value``'s JSON text, counted only until it passes
    ``limit``: every item visited adds at least one character, so about ``limit`` items at most
    are visited, however large the value. A type JSON refuses counts as one character (its
    encoding fails later)."""
    total = 0
    todo = [value]
    while todo and total <= limit:
        v = todo.pop()
        if isinstance(v, str):
            total += len(v) + 2  # the quotes; escapes only add
        elif isinstance(v, list | tuple):
            total += 2 * len(v) or 2  # brackets, and ", " between items
            if total <= limit:
                todo.extend(v)
        elif isinstance(v, dict):
            total += 6 * len(v) or 2  # braces, and per entry a key's quotes, ": " and ", "
            if total <= limit:
                for k, item in v.items():
                    if isinstance(k, str):
                        total += len(k)
                    todo.append(item)
        else:
            total += 1
    return total


def _safe_repr(value: Any) -> tuple[str, int]:
    text = _repr(value)
    return text, len(_encode(text))


def _repr(value: Any) -> str:
    try:
        text = _repr_head(value, MAX_REPR_CHARS + 1)
    except Exception as exc:  # a broken __repr__ must not break the run
        text = f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"
    if len(text) > MAX_REPR_CHARS:
        text = text[: MAX_REPR_CHARS - 3] + "..."
    return text


_BRACKETS: dict[type, tuple[str, str]] = {list: ("[", "]"), tuple: ("(", ")"), dict: ("{", "}"), set: ("{", "}"),
                                          frozenset: ("frozenset({", "})")}


def _repr_head(value: Any, need: int, active: frozenset[int] = frozenset()) -> str:
    """The start of ``repr(value)``, at least ``need`` characters of it where it is that long,
    built without the rest: the repr of a 10 MB list costs what its first items do. Builtin
    containers and strings only (a subclass may have its own repr); a long string's quotes are
    chosen from its first characters. ``active``: the containers being written (one inside
    itself is written ``[...]``, as ``repr`` does)."""
    kind = type(value)
    if kind is str:
        return repr(value[:need])
    if kind not in _BRACKETS or not value:
        return repr(value)
    opening, closing = _BRACKETS[kind]
    if id(value) in active:
        return opening[-1] + "..." + closing[0]
    inner = active | {id(value)}
    out, size = [opening], len(opening)

    def add(text: str) -> bool:  # True once ``need`` characters are written
        nonlocal size
        out.append(text)
        size += len(text)
        return size >= need

    for i, item in enumerate(value.items() if kind is dict else value):
        if i and add(", "):
            break
        if kind is dict:
            if add(_repr_head(item[0], need - size, inner)) or add(": "):
                break
            item = item[1]
        if add(_repr_head(item, need - size, inner)):
            break
    else:
        if kind is tuple and len(value) == 1:
            out.append(",")
        out.append(closing)
    return "".join(out)


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
    budget = MAX_CHECKPOINT_CHARS - sum(_name_chars(n) + _OVER_BUDGET_CHARS + 2 for n in names) - 2
    out: dict[str, Any] = {}
    for name in names:
        value = frame.f_locals[name]
        safe, chars = (_REDACTED, _REDACTED_CHARS) if name in redact else _safe(value)
        extra = chars - _OVER_BUDGET_CHARS
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
