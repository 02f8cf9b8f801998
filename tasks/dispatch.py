"""Publishing, always after the commit that made it necessary.

Activities go out under their own task name, with Baton's ids in message headers (for
the worker hooks) and mirrored in ``kwargsrepr`` so Flower shows and searches them.
Every publish is safe to repeat: task ids are deterministic per attempt, and results
are recorded once per attempt key.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from persistence import runtime as rt
from persistence.models import utcnow
from persistence.store import tasks_t
from sdk import serde

from . import eager
from .faults import EAGER_KEPT, fault

if TYPE_CHECKING:
    from .wiring import Runtime

log = logging.getLogger("baton.dispatch")

HEADER_RUN = "baton_run"
HEADER_STEP = "baton_step"
HEADER_TIMEOUT = "baton_timeout"


PUBLISH_CHUNK = 64  # messages per pipeline: workers can start on the first ones while the rest go out


def publish(runtime: Runtime, messages: list[dict[str, Any]], may_keep: bool = True) -> None:
    """Send activity attempts (their rows are already committed).

    Several at once (a fan-out) go through kombu's producer batch, in chunks: on Redis one
    pipeline of LPUSHes per chunk instead of a client and a round trip per message. With eager
    steps, a decision's next activity, or this process's share of a fan-out, may be kept to
    run here instead (``tasks.eager.keep``); never a re-send (``may_keep=False``).
    """
    if not messages:
        return
    if may_keep:
        before = len(messages)
        messages = eager.keep(runtime, messages)
        if len(messages) < before:
            fault(EAGER_KEPT)
        if not messages:
            return
    runtime.ensure_broker()
    if len(messages) == 1:
        _send(runtime, messages[0], None)
        return
    half = (len(messages) + 1) // 2
    chunk = min(PUBLISH_CHUNK, half)
    with runtime.app.producer_or_acquire() as producer:
        for start in range(0, len(messages), chunk):
            with producer.batch():
                for msg in messages[start:start + chunk]:
                    _send(runtime, msg, producer)
            if start < half <= start + chunk < len(messages):
                fault("mid_fanout_publish")  # about half of a fan-out sent


# Destinations this process has published to once, with Celery's declaration of the queue.
# Later messages skip it (``declare=[]``): kombu would only find the queue in its own cache of
# declared entities, at about a quarter of a publish's CPU. Keyed by task name and routing
# options (``task_routes`` may route by name).
_declared: set[tuple[Any, ...]] = set()
_ROUTING = ("queue", "exchange", "routing_key", "exchange_type")


def _send(runtime: Runtime, msg: dict[str, Any], producer: Any) -> None:
    options = dict(msg["options"] or {})
    where = (id(runtime.app), msg["task"], *(repr(options.get(k)) for k in _ROUTING))
    if where in _declared:
        options.setdefault("declare", [])
    if msg["attempt"] > 1:
        options.pop("countdown", None)  # a retry waited on not_before, not on the broker
    argsrepr, kwargsrepr = shown(msg)
    runtime.app.send_task(msg["task"], args=msg["args"], kwargs=msg["kwargs"], task_id=msg["id"],
                          headers=headers_of(msg), argsrepr=argsrepr, kwargsrepr=kwargsrepr, producer=producer,
                          **options)
    _declared.add(where)


def shown(msg: dict[str, Any]) -> tuple[str, str]:
    """An attempt's arguments as Flower shows them: the kwargs with Baton's ids mirrored in."""
    kwargs = {**msg["kwargs"], "baton_run": msg["run_id"], "baton_step": msg["step"]}
    if msg["slot"]:
        kwargs["baton_slot"] = msg["slot"]
    if msg["attempt"] > 1:
        kwargs["baton_attempt"] = msg["attempt"]
    return repr(tuple(msg["args"])), repr(kwargs)


def headers_of(msg: dict[str, Any]) -> dict[str, Any]:
    """Baton's message headers for an attempt (read back by the worker hooks)."""
    headers = {HEADER_RUN: msg["run_id"], HEADER_STEP: msg["step"], "baton_slot": msg["slot"],
               "baton_attempt": msg["attempt"]}
    if msg["timeout"]:
        headers[HEADER_TIMEOUT] = msg["timeout"]
    return headers


def republish(runtime: Runtime, ids: list[str]) -> int:
    """Send again attempts the sweeper found unsent or lost; returns how many went out."""
    if not ids:
        return 0
    store = runtime.store
    with store.read() as conn:
        rows = [r for r in conn.execute(select(tasks_t).where(tasks_t.c.id.in_(ids))) if r.state == "scheduled"]
    publish(runtime, [rt.row_message(r) for r in rows], may_keep=False)
    with store.tx() as conn:
        rt.mark_published(conn, [r.id for r in rows], utcnow())
    return len(rows)


def defer(runtime: Runtime, ids: list[str]) -> None:
    """Hand attempts whose publish failed to the sweeper (due now); best effort."""
    if not ids:
        return
    try:
        with runtime.store.tx() as conn:
            conn.execute(update(tasks_t).where(tasks_t.c.id.in_(ids), tasks_t.c.state == "scheduled")
                         .values(published_at=None, not_before=utcnow()))
    except Exception as exc:  # then lost_after re-sends them
        log.warning("baton: could not hand %d attempt(s) to the sweeper: %s", len(ids), exc)


def acked_late(app: Any, name: str) -> bool:
    """Whether a running task's message stays unacknowledged until it ends (only then does its
    absence from ``unacked`` mean nobody holds it); an unknown task counts as no."""
    task = app.tasks.get(name)
    return bool(task is not None and (task.acks_late if task.acks_late is not None else app.conf.task_acks_late))


def can_list_queues(runtime: Runtime) -> bool:
    """Whether :func:`queued_task_ids` can see the broker's queues (Redis only)."""
    return str(runtime.app.conf.broker_url or "").startswith(("redis", "rediss", "redis+socket"))


def waiting(runtime: Runtime, queue: str | None) -> int:
    """How many messages wait in ``queue`` (Redis; 0 if it cannot be read)."""
    if not queue or not can_list_queues(runtime):
        return 0
    try:
        with runtime.app.pool.acquire(block=True) as conn:
            return int(conn.default_channel.client.llen(queue))
    except Exception:  # then a kept share is published: what no eager steps would do anyway
        return 0


def queued_task_ids(runtime: Runtime, rows: list[Any], unacked: bool = False) -> set[str]:
    """Ids of these attempts still waiting in the broker's queues (Redis only; else none).

    With ``unacked``, also those a worker fetched and has not acknowledged (kombu's
    ``unacked`` hash); then a broker that cannot be read counts every attempt as held, so a
    running attempt is never taken away on a broker error.
    """
    if not can_list_queues(runtime):
        return {r.id for r in rows} if unacked else set()
    default = runtime.app.conf.task_default_queue or "celery"
    queues = {str((serde.loads(r.options) or {}).get("queue") or default) for r in rows}
    found: set[str] = set()
    try:
        with runtime.app.connection_for_read() as conn:
            client = conn.default_channel.client
            for queue in queues:
                # kombu keeps priorities in sibling lists "<queue>\x06\x16<n>"
                for name in [queue, *(f"{queue}\x06\x16{p}" for p in range(1, 10))]:
                    for raw in client.lrange(name, 0, -1):
                        try:
                            found.add(json.loads(raw)["headers"]["id"])
                        except (ValueError, KeyError, TypeError):
                            continue
            if unacked:
                key = (runtime.app.conf.broker_transport_options or {}).get("unacked_key", "unacked")
                for raw in client.hvals(key):
                    try:
                        found.add(json.loads(raw)[0]["headers"]["id"])
                    except (ValueError, KeyError, TypeError, IndexError):
                        continue
    except Exception as exc:  # no answer from the broker: assume nothing is queued (re-send; harmless)
        log.warning("baton: could not list queued messages: %s", exc)
        if unacked:
            return {r.id for r in rows}
    return found


def advance_runs(runtime: Runtime, run_ids: list[str]) -> None:
    if run_ids:
        runtime.ensure_broker()
    for run_id in dict.fromkeys(run_ids):
        runtime.advance_task.apply_async((run_id,), kwargsrepr=repr({"baton_run": run_id}))


def revoke(runtime: Runtime, ids: list[str], terminate: bool = False) -> None:
    if not ids:
        return
    try:
        runtime.ensure_broker()
        runtime.app.control.revoke(ids, terminate=terminate, signal="SIGKILL" if terminate else "SIGTERM")
    except Exception as exc:  # revocation is an optimisation: late results are ignored anyway
        log.warning("baton: could not revoke %d task(s): %s", len(ids), exc)


def send(runtime: Runtime, out: rt.Outbox) -> None:
    """Carry out an outbox after its transaction committed."""
    from .wiring import cancel_run

    publish(runtime, out.publish)
    republish(runtime, out.republish)
    revoke(runtime, out.revoke)
    revoke(runtime, out.terminate, terminate=True)
    more = rt.Outbox()
    for run_id, reason in out.cancel_runs:
        cancel_run(runtime.store, run_id, reason, more)
    advance_runs(runtime, out.advance + more.advance)
    if more.publish or more.republish or more.revoke or more.cancel_runs:
        send(runtime, rt.Outbox(publish=more.publish, republish=more.republish, revoke=more.revoke,
                                cancel_runs=more.cancel_runs))
