"""Baton against bare Celery: five scenarios, medians of several repetitions, one process run.

Each run makes a fresh PostgreSQL schema (or SQLite file), flushes its own Redis dbs, starts one
``celery worker`` for Baton and one for the bare-Celery equivalent (same flags on both:
``-P prefork -c 2 --without-mingle --without-gossip`` by default), and alternates their repetitions
(Baton, bare, Baton, bare, ...) so that noise from other load on the machine hits both sides alike.

Scenarios (sizes in full mode; ``--quick`` shrinks them):

1. ``seq``: a workflow of 200 no-op steps vs a Celery chain of 200 no-op tasks (ms per step);
2. ``fan``: one yield of 1,000 no-op tasks vs a chord of 1,000 with a no-op callback (seconds);
3. ``thru``: 200 concurrent workflows of 10 steps vs 200 ten-task chains (tasks per second);
4. ``hist``: per-step latency around steps 50, 500 and 5,000 of one long workflow, then a signal hop
   on a warm worker and one after a worker restart (cold resume: the whole history replayed);
5. ``mem``: worker RSS while 10,000 runs pass through it (each parks on a signal, so the live
   generator cache fills past its bound, then all are released);
6. ``agent``: per-step latency around steps 50, 1,000 and 2,000 of an agent loop whose conversation
   grows by a 2,000-character reply per step in a local (Baton only: locals have no Celery twin).

Run: ``.venv/bin/python bench/run.py [--quick] [--only seq,fan,...] [--store pg|sqlite] [--reps N]``.
``--json FILE`` also writes every measurement. Redis dbs 11 (Baton broker), 12 (bare broker) and
13 (bare result backend) are flushed at start; override with ``--redis-dbs``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder would shadow the standard library (``profile``): import from ROOT instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.env import (  # noqa: E402
    Env,
    bare_chain,
    bare_chord,
    bare_redis,
    bare_wait,
    baton_one,
    finished_at,
    loadavg,
    log,
    med,
    run_rows,
    step_times,
    store_of,
    wait_for,
    wait_quiet,
    wait_runs,
)

FULL = {"seq": 200, "fan": 1000, "thru_runs": 200, "thru_steps": 10, "hist": 5000, "points": (50, 500, 5000),
        "mem": 10_000, "mem_batch": 500, "mem_cache": None, "agent": 2000, "reps": 5}
QUICK = {"seq": 50, "fan": 200, "thru_runs": 20, "thru_steps": 10, "hist": 500, "points": (50, 500),
         "mem": 400, "mem_batch": 100, "mem_cache": 50, "agent": 300, "reps": 3}
SCENARIOS = ("seq", "fan", "thru", "hist", "mem", "agent")
REPLY = 2000  # characters per reply in the agent scenario


# ---------------------------------------------------------------- results


@dataclass
class Row:
    scenario: str
    metric: str
    baton: float | None
    bare: float | None
    target: str = ""
    ok: bool | None = None
    note: str = ""
    ratio: float | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ratio is None and self.baton is not None and self.bare:
            self.ratio = self.baton / self.bare


# ---------------------------------------------------------------- scenarios


class Meter:
    """Wall-clock results of both sides per repetition, and the CPU each side's processes used."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.wall: dict[str, list[float]] = {"baton": [], "bare": [], "floor": []}
        self.cpu: dict[str, list[float]] = {"baton": [], "baton_main": [], "pg": [], "bare": [], "bare_main": [],
                                            "floor": [], "floor_pg": []}

    def measure(self, side: str, fn: Callable[[], float]) -> float:
        before = self.env.cpu()
        c0 = time.process_time()
        value = fn()
        self.cpu.setdefault(f"client_{side}", []).append(time.process_time() - c0)
        time.sleep(0.3)  # let the last acknowledgements and the pool's bookkeeping land
        after = self.env.cpu()
        def pg(key: str) -> float:  # per backend: one that closed meanwhile is not counted, a new one from zero
            return sum(max(0.0, t - before[key].get(pid, 0.0)) for pid, t in after[key].items())

        if side == "baton":
            self.cpu["baton"].append(after["baton"] - before["baton"])
            self.cpu["baton_main"].append(after["baton_main"] - before["baton_main"])
            self.cpu["pg"].append(pg("pg"))
        elif side == "floor":
            self.cpu["floor"].append(after["bare"] - before["bare"])
            self.cpu["floor_pg"].append(pg("floor_pg"))
        else:
            self.cpu["bare"].append(after["bare"] - before["bare"])
            self.cpu["bare_main"].append(after["bare_main"] - before["bare_main"])
        self.wall[side].append(value)
        return value

    def rows(self, scenario: str, metric: str, target: str, ok: Callable[[float], bool], units: float,
             unit: str) -> list[Row]:
        b, c = med(self.wall["baton"]), med(self.wall["bare"])
        out = [Row(scenario, metric, b, c, target, ok(b / c), samples=dict(self.wall))]
        # Repetitions alternate (Baton, bare, Baton, ...): each pair shares the machine's load of
        # the moment, so the median of the pairs' ratios is steadier than the ratio of the medians.
        pairs = [x / y for x, y in zip(self.wall["baton"], self.wall["bare"], strict=False) if y]
        if len(pairs) > 1:
            out.append(Row(scenario, "  median of the per-repetition ratios (Baton and bare alternate)", None, None,
                           ratio=med(pairs), note=" / ".join(f"{x:.2f}" for x in pairs)))
        wb = med(self.cpu["baton"]) / units * 1000
        pg = med(self.cpu["pg"]) / units * 1000 if self.env.store == "pg" else None
        wc = med(self.cpu["bare"]) / units * 1000
        out.append(Row(scenario, f"worker CPU ms per {unit} (all worker processes)", wb, wc,
                       samples={k: list(v) for k, v in self.cpu.items()}))
        mb, mc = (med(self.cpu[k]) / units * 1000 for k in ("baton_main", "bare_main"))
        out.append(Row(scenario, "  of which the worker's main process (consumer)", mb, mc))
        if pg is not None:
            out.append(Row(scenario, f"PostgreSQL backend CPU ms per {unit} (Baton's connections)", pg, None))
        out.append(Row(scenario, f"  the bench client's own CPU ms per {unit} (starting, waiting)",
                       med(self.cpu["client_baton"]) / units * 1000, med(self.cpu["client_bare"]) / units * 1000))
        if self.wall["floor"]:
            f = med(self.wall["floor"])
            out.append(Row(scenario, "**floor**: bare Celery, each task also INSERTs and COMMITs one row (floor "
                           "in the Baton column; ratio floor/bare)", f, c, samples={"floor": self.wall["floor"]}))
            out.append(Row(scenario, "  Baton / floor", None, None, ratio=b / f))
            out.append(Row(scenario, f"  floor: worker CPU ms per {unit} / its PostgreSQL backend CPU ms per {unit}",
                           med(self.cpu["floor"]) / units * 1000, None,
                           note=f"{med(self.cpu['floor_pg']) / units * 1000:.2f}"))
        return out


def scen_seq(env: Env, size: dict[str, Any], reps: int) -> list[Row]:
    n = size["seq"]
    ns = env.baton_ns
    m = Meter(env)

    def bare(floor: bool = False) -> float:
        key = f"seq:{uuid.uuid4().hex}"
        sig = bare_chain(env, n, key, floor=floor)
        t0 = time.time()
        sig.apply_async()
        return (bare_wait(env, key, 1, 300)[0] - t0) / n * 1000

    for rep in range(reps):
        b = m.measure("baton", lambda: baton_one(env, ns.seq, n) / n * 1000)
        c = m.measure("bare", bare)
        fl = f", floor {m.measure('floor', lambda: bare(True)):.2f} ms/step" if env.floor else ""
        log(f"seq rep {rep + 1}/{reps}: baton {b:.2f} ms/step, bare {c:.2f} ms/step{fl} (load {loadavg()})")
    return m.rows("1 sequential", f"ms per step, {n} steps", "≤ 1.3x", lambda r: r <= 1.3, n, "step")


def scen_fan(env: Env, size: dict[str, Any], reps: int) -> list[Row]:
    n = size["fan"]
    ns = env.baton_ns
    m = Meter(env)

    def bare(floor: bool = False) -> float:
        key = f"fan:{uuid.uuid4().hex}"
        sig = bare_chord(env, n, key, floor=floor)
        t0 = time.time()
        sig.apply_async()
        return bare_wait(env, key, 1, 600)[0] - t0

    for rep in range(reps):
        b = m.measure("baton", lambda: baton_one(env, ns.fan, n, timeout=900))
        c = m.measure("bare", bare)
        fl = f", floor {m.measure('floor', lambda: bare(True)):.2f} s" if env.floor else ""
        log(f"fan rep {rep + 1}/{reps}: baton {b:.2f} s, bare {c:.2f} s{fl} (load {loadavg()})")
    return m.rows("2 fan-out", f"seconds for {n} tasks + join", "≤ 1.0x", lambda r: r <= 1.0, n, "task")


def scen_thru(env: Env, size: dict[str, Any], reps: int) -> list[Row]:
    runs, steps = size["thru_runs"], size["thru_steps"]
    total = runs * steps
    ns = env.baton_ns
    m = Meter(env)

    def baton() -> float:
        t0 = time.time()
        ids = [ns.seq.start(steps).id for _ in range(runs)]
        wait_runs(env, ids, 900, interval=0.25)  # the time is read from the runs' rows, not the poll
        return total / (finished_at(env, ids) - t0)

    def bare(floor: bool = False) -> float:
        key = f"thru:{uuid.uuid4().hex}"
        sigs = [bare_chain(env, steps, key, floor=floor) for _ in range(runs)]
        t0 = time.time()
        for s in sigs:
            s.apply_async()
        return total / (max(bare_wait(env, key, runs, 600)) - t0)

    for rep in range(reps):
        b = m.measure("baton", baton)
        c = m.measure("bare", bare)
        fl = f", floor {m.measure('floor', lambda: bare(True)):.0f} tasks/s" if env.floor else ""
        log(f"thru rep {rep + 1}/{reps}: baton {b:.0f} tasks/s, bare {c:.0f} tasks/s{fl} (load {loadavg()})")
    return m.rows("3 throughput", f"tasks/s, {runs} x {steps}-step", "≥ 0.7x", lambda r: r >= 0.7, total, "task")


def _window(times: dict[int, float], k: int, width: int = 50) -> float:
    """Median latency (ms) of the ``width`` steps around step ``k`` (ending at ``k`` near the end):
    decision s+1 minus decision s."""
    last = max(times) - 1
    hi = min(last, k + width // 2)
    lo = max(1, hi - width + 1)
    lat = [(times[s + 1] - times[s]) * 1000 for s in range(lo, hi + 1) if s in times and s + 1 in times]
    return med(lat)


def _slope(times: dict[int, float]) -> float:
    """Least-squares slope of per-step latency (ms) against step number, in ms per 1,000 steps."""
    pts = [(s, (times[s + 1] - times[s]) * 1000) for s in sorted(times) if s + 1 in times]
    if len(pts) < 3:
        return 0.0
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    var = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / var * 1000 if var else 0.0


def replay_in_process(env: Env, run_id: str, profile: bool = False, wf: Any = None) -> tuple[float, float, int, str]:
    """Seconds to load a run's whole history, and to replay it in a fresh Instance, here; with
    ``profile``, also cProfile's top functions for the two together."""
    import cProfile
    import io
    import pstats

    from persistence.models import utcnow
    from sdk.replay import Instance

    store = store_of(env)
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    t0 = time.perf_counter()
    events = store.events(run_id)
    t1 = time.perf_counter()
    inst = Instance(wf or env.baton_ns.long, run_id)
    inst.activate(events, now=utcnow(), decided_seq=10**9)
    t2 = time.perf_counter()
    text = ""
    if prof:
        prof.disable()
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("tottime").print_stats(15)
        stats.sort_stats("cumulative").print_stats(25)
        text = buf.getvalue()
    return t1 - t0, t2 - t1, len(events), text


def scen_hist(env: Env, size: dict[str, Any], reps: int, bare_too: bool = True) -> list[Row]:
    n = size["hist"]
    points = size["points"]
    ns = env.baton_ns
    h = ns.long.start(n)
    t0 = time.time()
    wait_for(lambda: (env.baton_w.check() if env.baton_w else None) or
             run_rows(env, [h.id])[0].step >= n + 1, n * 0.2 + 60, f"long run to reach step {n}", 0.25)
    baton_total = time.time() - t0
    times = step_times(env, h.id)
    times = {k: v for k, v in times.items() if k <= n + 1}
    baton_at = {k: _window(times, k) for k in points}
    slope = _slope(times)
    log(f"hist baton: {n} steps in {baton_total:.1f}s; " +
        ", ".join(f"step {k}: {v:.2f} ms" for k, v in baton_at.items()) + f"; slope {slope:.2f} ms per 1,000 steps")

    # warm hop: signal with the worker that advanced the run up
    # Hops are timed as a client sees them: from signal() until the next step's decision is
    # committed and visible (polled every 2 ms), so the history load and replay both count.
    t0 = time.time()
    h.signal("warm", None)
    wait_for(lambda: run_rows(env, [h.id])[0].step >= n + 2, 120, "warm signal hop", 0.002)
    warm = time.time() - t0
    wait_for(lambda: run_rows(env, [h.id])[0].step >= n + 3, 120, "the run to wait for the cold signal", 0.01)
    # cold hop: restart the worker (a fresh process, no cached generator), warm its pools on other runs
    env.start_baton()
    t0 = time.time()
    h.signal("cold", None)
    wait_for(lambda: run_rows(env, [h.id])[0].step >= n + 4, 120, "cold signal hop", 0.002)
    cold = time.time() - t0
    wait_runs(env, [h.id], 120, interval=0.01)
    load_s, replay_s, nev, _ = replay_in_process(env, h.id)
    if env.profile_replay:
        log("cProfile of loading and replaying the history in this process (slower than unprofiled):\n"
            + replay_in_process(env, h.id, profile=True)[3])
    log(f"hist baton: warm hop {warm * 1000:.0f} ms, cold hop {cold * 1000:.0f} ms; in-process: load "
        f"{nev} events {load_s * 1000:.0f} ms, replay {replay_s * 1000:.0f} ms")

    bare_at: dict[int, float] = {}
    if bare_too:
        key, stamp = f"hist:{uuid.uuid4().hex}", f"stamp:{uuid.uuid4().hex}"
        t0 = time.time()
        bare_chain(env, n, key, stamp=stamp).apply_async()
        bare_wait(env, key, 1, n * 0.5 + 120)
        raw = bare_redis(env).lrange(stamp, 0, -1)
        stamps = {int(x.split(b":")[0]) + 1: float(x.split(b":")[1]) for x in raw}  # 1-based step numbers
        bare_at = {k: _window(stamps, k) for k in points}
        log(f"hist bare: {n} steps in {time.time() - t0:.1f}s; " +
            ", ".join(f"step {k}: {v:.2f} ms" for k, v in bare_at.items()))
    rows = [Row("4 history", f"ms per step around step {k} (median of 50 steps)", baton_at[k], bare_at.get(k))
            for k in points]
    first, last = points[0], points[-1]
    ratio = baton_at[last] / baton_at[first]
    rows.append(Row("4 history", f"step {last} / step {first} (Baton)", None, None, "≤ 1.5", ratio <= 1.5,
                    ratio=ratio))
    rows.append(Row("4 history", f"trend: least-squares slope of step latency over all {n} steps, ms per 1,000 "
                    "steps", slope, None))
    rows.append(Row("4 history", f"warm signal hop at step {n + 1} (s)", warm, None))
    rows.append(Row("4 history", f"cold resume after restart, {n}-step history (s)", cold, None, "< 0.5 s",
                    cold < 0.5, note=f"in-process: load {nev} events {load_s:.3f} s + replay {replay_s:.3f} s"))
    return rows


def scen_agent(env: Env, size: dict[str, Any], reps: int) -> list[Row]:
    """An agent loop: one reply of ``REPLY`` characters per step appended to a conversation held
    in a local (4 MB after 2,000 steps); each step's call gets the last message only."""
    n = size["agent"]
    h = env.baton_ns.agent.start(n, REPLY, False)
    t0 = time.time()
    wait_runs(env, [h.id], n * 0.5 + 60, interval=0.25)
    times = step_times(env, h.id)
    points = (50, n // 2, n)
    at = {k: _window(times, k) for k in points}
    load_s, replay_s, nev, _ = replay_in_process(env, h.id, wf=env.baton_ns.agent)
    log(f"agent: {n} steps in {time.time() - t0:.1f}s; " + ", ".join(f"step {k}: {v:.2f} ms" for k, v in at.items())
        + f"; replay of {nev} events: load {load_s:.3f} s + replay {replay_s:.3f} s")
    ratio = at[n] / at[50]
    return [Row("6 agent", f"ms per step around step {k} (conversation {k * REPLY / 1e6:.1f} MB)", at[k], None)
            for k in points] + [
        Row("6 agent", f"step {n} / step 50", None, None, "≤ 1.5", ratio <= 1.5, ratio=ratio),
        Row("6 agent", f"load + replay of the {n}-step history in process (s)", load_s + replay_s, None)]


def scen_mem(env: Env, size: dict[str, Any], reps: int) -> list[Row]:
    total, batch = size["mem"], size["mem_batch"]
    env.cache_size = size["mem_cache"]
    ns = env.baton_ns
    env.start_baton()
    env.start_bare()
    assert env.baton_w is not None and env.bare_w is not None
    base_b, base_c = env.baton_w.rss(), env.bare_w.rss()
    samples_b: list[tuple[int, dict[str, float]]] = [(0, base_b)]
    ids: list[str] = []
    t0 = time.time()
    for i in range(0, total, batch):
        chunk = [ns.parked.start(j).id for j in range(i, min(total, i + batch))]
        ids += chunk
        wait_runs(env, chunk, 600, pred=lambda r: r.step >= 2, what="runs to park", interval=0.1)
        samples_b.append((len(ids), env.baton_w.rss()))
        if len(ids) % max(batch, total // 5) == 0:
            log(f"mem baton: {len(ids)} runs parked, worker RSS {samples_b[-1][1]['total']:.0f} MB")
    parked = env.baton_w.rss()
    for i in range(0, total, batch):
        chunk = ids[i:i + batch]
        for rid in chunk:
            env.baton_ns.baton.get(rid).signal("go", None)
        wait_runs(env, chunk, 600, interval=0.1)
        if (i + batch) % max(batch, total // 5) == 0:
            log(f"mem baton: {i + batch} runs released and completed, worker RSS {env.baton_w.rss()['total']:.0f} MB")
    done = env.baton_w.rss()
    samples_b.append((2 * total, done))
    baton_s = time.time() - t0
    log(f"mem baton: {total} runs in {baton_s:.0f}s; RSS MB total {base_b['total']:.0f} -> parked "
        f"{parked['total']:.0f} -> done {done['total']:.0f} (max child {done['max_child']:.0f})")

    samples_c: list[tuple[int, dict[str, float]]] = [(0, base_c)]
    key = f"mem:{uuid.uuid4().hex}"
    t0 = time.time()
    for i in range(0, total, batch):
        m = min(total, i + batch) - i
        for _ in range(m):
            bare_chain(env, 2, key).apply_async()
        bare_wait(env, key, m, 600)
        samples_c.append((i + m, env.bare_w.rss()))
    bare_done = env.bare_w.rss()
    log(f"mem bare: {total} chains in {time.time() - t0:.0f}s; RSS MB total {base_c['total']:.0f} -> "
        f"{bare_done['total']:.0f}")
    half = next(s for n, s in samples_b if n >= total // 2)
    growth = (parked["total"] - half["total"]) / (total / 2) * 1000
    cache = env.cache_size or 1000
    rows = [
        Row("5 memory", f"worker RSS MB after warm-up (main + {env.concurrency} children)", base_b["total"],
            base_c["total"]),
        Row("5 memory", f"worker RSS MB with {total} runs parked (live generators)", parked["total"], None,
            note=f"cache bound {cache}/process"),
        Row("5 memory", f"worker RSS MB after {total} runs completed", done["total"], bare_done["total"]),
        Row("5 memory", f"RSS growth MB per 1,000 runs, 2nd half of parking ({total // 2}->{total})", growth, None,
            "bounded", growth < 2.0 or parked["total"] - half["total"] < 1.0,
            note="bounded = under 2 MB per 1,000 runs, or under 1 MB in all, once every cache is full"),
    ]
    rows[0].samples = {"baton": [s["total"] for _, s in samples_b], "bare": [s["total"] for _, s in samples_c]}
    env.cache_size = None
    return rows


# ---------------------------------------------------------------- table


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if abs(x) >= 0.1 else f"{x:.3f}"


def table(rows: list[Row]) -> str:
    lines = ["| scenario | metric | Baton | bare Celery | Baton/bare | target | met |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        ok = "" if r.ok is None else ("yes" if r.ok else "**no**")
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {r.scenario} | {r.metric}{note} | {fmt(r.baton)} | {fmt(r.bare)} | {ratio} | {r.target} "
                     f"| {ok} |")
    return "\n".join(lines)


def machine() -> dict[str, str]:
    import celery
    import kombu
    import sqlalchemy

    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    rev = "?"
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "sdk", "persistence", "tasks"],
                               capture_output=True, text=True, timeout=10).stdout.rstrip()
        if dirty.strip():
            rev += " + uncommitted changes in " + ", ".join(sorted({ln[3:].split("/")[0] for ln in dirty.splitlines()}))
    except (OSError, subprocess.SubprocessError):
        pass
    return {"code": rev, "cpu": f"{os.cpu_count()} x {cpu}", "memory": mem, "os": platform.platform(),
            "python": platform.python_version(), "celery": celery.__version__, "kombu": kombu.__version__,
            "sqlalchemy": sqlalchemy.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (about 2-3 minutes in all)")
    p.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    p.add_argument("--store", choices=("pg", "sqlite"), default="pg")
    p.add_argument("--reps", type=int, default=None, help="repetitions per scenario (default 5, quick 3)")
    p.add_argument("--pool", default="prefork", help="worker pool for both sides (prefork, solo, threads)")
    p.add_argument("--concurrency", "-c", type=int, default=2)
    p.add_argument("--redis-dbs", default="11,12,13", help="Baton broker, bare broker, bare result backend")
    p.add_argument("--bare-hist", choices=("auto", "yes", "no"), default="auto",
                   help="run the bare chain in the history scenario too (auto: only up to 1,000 steps; a Celery "
                        "chain message carries every remaining task, so a 5,000-task chain is slow to start)")
    p.add_argument("--profile-replay", action="store_true",
                   help="history scenario: also print cProfile's view of loading and replaying the long history")
    p.add_argument("--quiet-load", type=float, default=None,
                   help="before starting, wait (up to --quiet-wait s) until the 1-minute load average is below this")
    p.add_argument("--quiet-wait", type=float, default=600)
    p.add_argument("--bare-celery-defaults", action="store_true",
                   help="bare side with Celery's own defaults (early ack, prefetch 4) instead of Baton's settings")
    p.add_argument("--eager-steps", type=int, default=0,
                   help="Baton(eager_steps=N): up to N next activities run in the deciding process (default 0)")
    p.add_argument("--task-events", action="store_true",
                   help="both sides' workers send task events (as with -E, for Flower)")
    p.add_argument("--json", default=None, help="write all measurements to this file")
    p.add_argument("--keep", action="store_true", help="keep the PostgreSQL schema and the worker logs")
    for key in ("seq", "fan", "hist", "mem"):
        p.add_argument(f"--{key}-size", type=int, default=None, help=f"override the size of scenario {key}")
    a = p.parse_args(argv)
    size = dict(QUICK if a.quick else FULL)
    for key in ("seq", "fan", "hist", "mem"):
        if getattr(a, f"{key}_size"):
            size[key] = getattr(a, f"{key}_size")
    if a.hist_size:
        size["points"] = (*(k for k in (50, 500, 5000) if k < a.hist_size), a.hist_size)
    reps = a.reps or size["reps"]
    if a.task_events:
        os.environ["BENCH_TASK_EVENTS"] = "1"  # read by bench.app._base_app, in both sides' workers
    if a.eager_steps:
        os.environ["BENCH_EAGER_STEPS"] = str(a.eager_steps)  # read by bench.app.build_baton in the Baton worker
    if a.bare_celery_defaults:
        os.environ["BENCH_BARE_DEFAULTS"] = "1"  # read by bench.app.build_bare, here and in the bare worker
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    for s in only:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
    dbs = tuple(int(x) for x in a.redis_dbs.split(","))
    assert len(dbs) == 3
    if a.quiet_load is not None:
        wait_quiet(a.quiet_load, a.quiet_wait)
    tmp = Path(tempfile.mkdtemp(prefix="baton-bench-"))
    env = Env(a.store, a.pool, a.concurrency, dbs, tmp, keep=a.keep)  # type: ignore[arg-type]
    env.profile_replay = a.profile_replay
    rows: list[Row] = []
    started = time.time()
    info = machine()
    log(f"bench: {'quick' if a.quick else 'full'}, store {a.store}, pool {a.pool} -c {a.concurrency}, reps {reps}, "
        f"scenarios {','.join(only)}; load {loadavg()}; logs in {tmp}")
    try:
        env.open()
        need_workers = any(s != "mem" for s in only)
        if need_workers:
            env.start_baton()
            env.start_bare()
        for s in SCENARIOS:
            if s not in only:
                continue
            t = time.time()
            if s == "seq":
                rows += scen_seq(env, size, reps)
            elif s == "fan":
                rows += scen_fan(env, size, reps)
            elif s == "thru":
                rows += scen_thru(env, size, reps)
            elif s == "hist":
                bare_hist = a.bare_hist == "yes" or (a.bare_hist == "auto" and size["hist"] <= 1000)
                rows += scen_hist(env, size, reps, bare_too=bare_hist)
            elif s == "mem":
                rows += scen_mem(env, size, reps)
            elif s == "agent":
                rows += scen_agent(env, size, reps)
            log(f"{s} done in {time.time() - t:.0f}s")
    finally:
        env.close()
    elapsed = time.time() - started
    head = (f"{'quick' if a.quick else 'full'} mode, store {a.store}, Redis broker, pool {a.pool} -c {a.concurrency}, "
            f"medians of {reps} (history, memory: one run each), {elapsed:.0f} s in all; load average at the end "
            f"{loadavg()}" + (f"; Baton with eager_steps={a.eager_steps}" if a.eager_steps else "")
            + ("; task events on both sides" if a.task_events else ""))
    print(head)
    print(f"machine: {info['cpu']}, {info['memory']}, {info['os']}, Python {info['python']}, Celery "
          f"{info['celery']}, kombu {info['kombu']}, SQLAlchemy {info['sqlalchemy']}; code {info['code']}")
    print()
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"head": head, "machine": info, "size": {k: v for k, v in size.items()},
                                            "rows": [r.__dict__ for r in rows]}, indent=1, default=str))
    if not a.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
