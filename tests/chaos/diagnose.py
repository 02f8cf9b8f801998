"""Why chaos runs are not finished: a dump from the store, the broker and the worker logs, for the
moment a wait times out (so a CI failure says what state a run was left in)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from tests.chaos.support import ChaosCluster


def _age(now: Any, ts: Any) -> str:
    from persistence.store import aware

    ts = aware(ts)
    if ts is None:
        return "-"
    age = (now - ts).total_seconds()
    return f"{age:.1f}s ago" if age >= 0 else f"in {-age:.1f}s"


def _broker_view(cluster: ChaosCluster, task_ids: list[str]) -> list[str]:
    """Where the messages of these attempts are in Redis: a queue list, kombu's ``unacked`` hash
    (fetched by a worker, not yet acknowledged or rejected), or nowhere (acknowledged or lost)."""
    import json

    import redis

    lines: list[str] = []
    try:
        client = redis.Redis.from_url(cluster.broker, socket_connect_timeout=2)
        try:
            where: dict[str, list[str]] = {}
            for name in [n.decode(errors="replace") for n in client.scan_iter(f"{cluster.queue}*")]:
                if client.type(name) != b"list":
                    continue
                raw = client.lrange(name, 0, -1)
                lines.append(f"broker queue {name!r}: {len(raw)} message(s)")
                for m in raw:
                    tid = json.loads(m).get("headers", {}).get("id")
                    where.setdefault(tid, []).append(f"queue {name!r}")
            unacked = client.hgetall("unacked")
            lines.append(f"broker unacked hash: {len(unacked)} message(s)")
            for tag, m in unacked.items():
                tid = json.loads(m)[0].get("headers", {}).get("id")
                where.setdefault(tid, []).append(f"unacked (tag {tag.decode()})")
            for tid in task_ids:
                lines.append(f"message of {tid}: {', '.join(where.get(tid, [])) or 'nowhere in the broker'}")
        finally:
            client.close()
    except Exception as exc:
        lines.append(f"(broker read failed: {type(exc).__name__}: {exc})")
    return lines


def diagnose_runs(baton: Any, run_ids: list[str], cluster: ChaosCluster | None = None, *, limit: int = 10,
                  events: int = 15, log_lines: int = 40) -> str:
    """A dump, from the store, of why these runs are not finished: for use when a wait times out.

    For each unfinished run (at most ``limit``): its run row, its last ``events`` history events,
    its attempt rows, its unfired timers; then the workers' heartbeat rows and the leases, which
    worker processes are alive (``cluster``), the worker log lines naming those runs and the tail
    of each worker log. Never raises: a failing part is reported in its place.
    """
    from sqlalchemy import select

    from persistence.models import utcnow
    from persistence.store import events_t, leases_t, runs, tasks_t, timers_t, workers_t

    store = baton.store
    now = utcnow()
    out: list[str] = [f"=== diagnosis at {now.isoformat()} (ages relative to it) ==="]
    shown: list[str] = []
    open_tasks: list[str] = []
    try:
        with store.read() as conn:
            rows = conn.execute(select(runs).where(runs.c.run_id.in_(run_ids))).all()
            unfinished = [r for r in rows if r.status != "completed"]
            out.append(f"{len(unfinished)} of {len(run_ids)} run(s) not completed "
                       f"(statuses: {dict(Counter(r.status for r in rows))})")
            for r in unfinished[:limit]:
                shown.append(r.run_id)
                out.append(f"--- run {r.run_id} ({r.workflow}): status={r.status} last_seq={r.last_seq} "
                           f"decided_seq={r.decided_seq} needs_advance={r.needs_advance} "
                           f"advance_requested_at={_age(now, r.advance_requested_at)} step={r.step} "
                           f"waiting={r.waiting} updated_at={_age(now, r.updated_at)} error={r.error}")
                evs = conn.execute(select(events_t).where(events_t.c.run_id == r.run_id)
                                   .order_by(events_t.c.seq.desc()).limit(events)).all()
                for e in reversed(evs):
                    out.append(f"    event seq={e.seq} {e.kind} step={e.step} slot={e.slot} key={e.key} "
                               f"at={_age(now, e.at)} payload={e.payload[:160]}")
                for t in conn.execute(select(tasks_t).where(tasks_t.c.run_id == r.run_id)
                                      .order_by(tasks_t.c.step, tasks_t.c.slot, tasks_t.c.attempt)):
                    out.append(f"    task {t.id} state={t.state} worker={t.worker} dispatches={t.dispatches} "
                               f"created={_age(now, t.created_at)} published={_age(now, t.published_at)} "
                               f"started={_age(now, t.started_at)} finished={_age(now, t.finished_at)} "
                               f"not_before={_age(now, t.not_before)}")
                    if t.state in ("scheduled", "started"):
                        open_tasks.append(t.id)
                for tm in conn.execute(select(timers_t).where(timers_t.c.run_id == r.run_id,
                                                              timers_t.c.fired.is_(False))):
                    out.append(f"    unfired timer {tm.id} {tm.kind} step={tm.step} slot={tm.slot} "
                               f"attempt={tm.attempt} fire_at={_age(now, tm.fire_at)}")
            for w in conn.execute(select(workers_t).order_by(workers_t.c.id)):
                out.append(f"worker row {w.id}: started={_age(now, w.started_at)} last_beat={_age(now, w.last_beat)}")
            for lease in conn.execute(select(leases_t)):
                out.append(f"lease {lease.name}: owner={lease.owner} until={_age(now, lease.until)}")
    except Exception as exc:  # the store may be the thing that is broken
        out.append(f"(store read failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if cluster is not None and cluster.broker.startswith("redis"):
        out += _broker_view(cluster, [t for t in open_tasks])
    if cluster is not None:
        for p in cluster.procs:
            env = cluster.envs.get(p.pid, {})
            extra = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith("BATON_FAULT") or k == "replaced")
            state = "alive" if p.poll() is None else f"exited rc={p.returncode}"
            out.append(f"process pid {p.pid}: {state} {extra}")
        try:
            logs = {f.name: f.read_text(errors="replace").splitlines() for f in sorted(cluster.tmp.glob("worker*.log"))}
        except OSError as exc:
            logs = {}
            out.append(f"(could not read worker logs: {exc})")
        if shown:
            named = [f"{name}: {line}" for name, lines in logs.items() for line in lines
                     if any(rid in line for rid in shown)]
            out.append(f"--- worker log lines naming these runs ({len(named)}; last {3 * log_lines}):")
            out += named[-3 * log_lines:]
        for name, lines in logs.items():
            out.append(f"--- tail of {name} ({len(lines)} lines):")
            out += lines[-log_lines:]
    return "\n".join(out)
