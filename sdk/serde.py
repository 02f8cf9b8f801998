"""JSON in and out of the store: strict, size-capped, and naming whatever fails.

Everything Baton records (arguments, results, signal payloads, locals) is plain JSON.
Nothing is ever pickled. A value JSON cannot carry is refused where it is passed, with
the path to the offending part (``argument 'cfg' at ['db']['conn']``).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, NoReturn

from .errors import SerializationError

DEFAULT_MAX_PAYLOAD = 1024 * 1024  # bytes; configurable through Baton(max_payload_bytes=...)


def _find_bad(value: Any, path: str) -> tuple[str, str] | None:
    """Return (path, type name) of the first part JSON cannot carry faithfully."""
    if value is None or isinstance(value, bool | str):
        return None
    if isinstance(value, int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, f"float {value!r}")
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            bad = _find_bad(item, f"{path}[{i}]")
            if bad:
                return bad
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return (f"{path} key {key!r}", f"{type(key).__name__} key")
            bad = _find_bad(item, f"{path}[{key!r}]")
            if bad:
                return bad
        return None
    return (path, type(value).__name__)


# ``json.dumps`` with options builds an encoder per call; this one is built once (encoding is
# stateless, so threads may share it).
_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def dumps(value: Any, what: str, max_bytes: int | None = DEFAULT_MAX_PAYLOAD) -> str:
    """Encode ``value`` as JSON text or raise ``SerializationError`` naming ``what``.

    The C encoder goes first and refuses most of what JSON cannot carry (other types, NaN, a
    value inside itself); :func:`_str_keys` then looks for the one change it makes silently
    (a non-string key would come back a string). The slower walk that names the offending
    part runs only for a value already refused, so a large argument costs one encode and one
    pass over its containers, not a path string per item."""
    text, size = _checked(value, what)
    _within(size, what, max_bytes)
    return text


def dumps_args(args: list[Any], kwargs: dict[str, Any], what: str, max_bytes: int | None) -> tuple[str, str]:
    """``args`` and ``kwargs`` as the two JSON texts a task row stores, checked as
    ``dumps([args, kwargs], what, max_bytes)`` would check them (same errors, same size),
    so that a step's arguments are encoded once, not once to check and again to store."""
    try:
        (a, a_size), (k, k_size) = _checked(args, what), _checked(kwargs, what)
    except SerializationError:
        dumps([args, kwargs], what, None)  # raises, naming the path within both
        raise
    _within(a_size + k_size + 3, what, max_bytes)  # "[" args "," kwargs "]"
    return a, k


def _checked(value: Any, what: str) -> tuple[str, int]:
    """The JSON text of ``value`` and its size in UTF-8 bytes, or ``SerializationError``."""
    try:
        text: str | None = _compact(value)
    except (TypeError, ValueError, RecursionError):
        text = None
    if text is None or not _str_keys(value):
        _refuse(value, what)
    assert text is not None
    if text.isascii():
        return text, len(text)
    try:
        return text, len(text.encode())
    except UnicodeEncodeError as exc:  # a lone surrogate: no store, broker or driver takes it
        raise SerializationError(
            f"{what} holds a lone surrogate ({text[exc.start]!r}), which UTF-8 cannot carry; decode "
            "bytes with errors='replace', or pass them as base64") from None


def _within(size: int, what: str, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise SerializationError(
            f"{what} is {size:,} bytes of JSON, over the {max_bytes:,}-byte payload limit; "
            "store large data elsewhere (a file, an object store) and pass a reference, "
            "or raise the limit with Baton(app, max_payload_bytes=...)"
        )


def _str_keys(value: Any) -> bool:
    """Whether every mapping in ``value`` (already encoded: no cycles) has only string keys."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, dict):
            if not all(isinstance(k, str) for k in v):
                return False
            todo.extend(c for c in v.values() if isinstance(c, list | tuple | dict))
        elif isinstance(v, list | tuple):
            todo.extend(c for c in v if isinstance(c, list | tuple | dict))
    return True


def _refuse(value: Any, what: str) -> NoReturn:
    try:
        bad = _find_bad(value, "")
    except RecursionError:
        raise SerializationError(f"{what} is nested too deeply, or contains itself; pass plain data "
                                 "(dict, list, str, int, float, bool, None) without cycles") from None
    where, kind = bad if bad is not None else ("", "value")
    at = f" at {where}" if where else ""
    raise SerializationError(
        f"{what}{at} is a {kind}, which JSON cannot carry; pass plain data "
        "(dict, list, str, int, float, bool, None), e.g. convert it with str() or .isoformat()"
    )


def dumps_known(value: Any, what: str) -> str:
    """Encode a value already checked where it entered (a recorded result, a signal's
    payload) or built by Baton itself (waiting lists, positions, locals snapshots, which are
    JSON round-trips): no walk of the value first. Anything JSON refuses still gets
    :func:`dumps`' error naming ``what``."""
    try:
        return _compact(value)
    except (TypeError, ValueError):
        return dumps(value, what, None)


def loads(text: str | None) -> Any:
    """Decode JSON text written by :func:`dumps` (``None`` stays ``None``)."""
    return None if text is None else json.loads(text)


def digest(value: Any) -> str:
    """A short, stable fingerprint of JSON-able data, used to compare replayed commands."""
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
