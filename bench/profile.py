"""Where a Baton worker spends its time: py-spy attached to the worker during a scenario.

Starts the same Baton worker as ``bench/run.py`` (``-P prefork -c 2 --without-mingle --without-gossip``,
PostgreSQL or SQLite, Redis broker), warms it up, then attaches ``py-spy record --subprocesses
--function`` to the worker's main process (so the pool children are sampled too) while the
scenario runs, and prints:

- the samples per process (main process vs pool children);
- the top functions by self time and by total (inclusive) time over all processes;
- ``--idle`` (the default runs both passes): the same with idle samples included, i.e. wall-clock
  time, restricted to stacks inside a task's execution (``trace_task``) so that a pool child
  waiting for its next message does not count, but time blocked on PostgreSQL or Redis does.

Run: ``.venv/bin/python bench/profile.py [--scenario seq|fan] [--size N] [--reps N] [--store pg|sqlite]``.
py-spy is not a project dependency: ``.venv/bin/pip install py-spy``. The raw collapsed stacks are
kept (``--out DIR``) for flame graphs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder would shadow the standard library (``profile``): import from ROOT instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import env as bench  # noqa: E402

TASK_FRAMES = ("trace_task ", "fast_trace_task ")


@dataclass
class Profile:
    samples: int = 0
    per_process: Counter[str] = field(default_factory=Counter)
    self_: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    components: Counter[str] = field(default_factory=Counter)


def short(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (pkg/file.py:12)``, site-packages and ROOT trimmed."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for cut in ("site-packages/", str(ROOT) + "/", "lib/python3.11/"):
        if cut in where:
            where = where.split(cut, 1)[1]
    return f"{name} ({where})" if where else name


PLUMBING = ("<frozen runpy>", "click/", "celery/__main__", "celery/bin/", "celery/bootsteps.py", "celery/apps/",
            "celery/worker/worker.py", "celery/worker/loops.py", "celery/worker/consumer/consumer.py",
            "celery/concurrency/", "billiard/", "kombu/asynchronous/hub.py", "threading.py", "celery/app/trace.py",
            "celery/app/task.py", "celery/utils/dispatch/signal.py", "contextlib.py")
COMPONENTS = (("psycopg/", "psycopg (PostgreSQL driver: network waits, send/recv)"),
              ("sqlalchemy/", "SQLAlchemy (statement building, compile cache, result rows)"),
              ("sqlite3", "sqlite3"),
              ("redis/", "redis-py (broker socket)"), ("kombu/", "kombu (messaging, event loop)"),
              ("billiard/", "billiard (pool IPC)"), ("celery/", "celery"),
              ("sdk/", "Baton sdk/"), ("persistence/", "Baton persistence/"), ("tasks/", "Baton tasks/"),
              ("json/", "json"), ("<frozen", "import machinery"))


def component(name: str) -> str:
    for key, label in COMPONENTS:
        if key in name:
            return label
    return "other (stdlib, builtins)"


def parse(path: Path, main_pid: int, in_task_only: bool) -> Profile:
    prof = Profile()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        pid = str(main_pid)
        while frames and frames[0].startswith("process "):
            pid = frames[0].split(":", 1)[0].replace("process ", "")
            frames = frames[1:]
        if not frames:
            continue
        if in_task_only and not any(f.startswith(TASK_FRAMES) for f in frames):
            continue
        prof.per_process["main" if pid == str(main_pid) else f"pool child {pid}"] += n
        prof.samples += n
        names = [short(f) for f in frames]
        prof.self_[names[-1]] += n
        prof.components[component(names[-1])] += n
        for name in set(names):
            if not any(p in name for p in PLUMBING):
                prof.total[name] += n
    return prof


def report(title: str, prof: Profile, top: int, rate: int) -> str:
    out = [f"### {title}", "", f"{prof.samples} samples at {rate} Hz ({prof.samples / rate:.1f} s of process time)",
           "", "samples per process: " + ", ".join(f"{k} {v}" for k, v in sorted(prof.per_process.items())), ""]
    out += ["self time by component:", "", "| % | samples | component |", "|---:|---:|---|"]
    for name, n in prof.components.most_common():
        out.append(f"| {100 * n / max(1, prof.samples):.1f} | {n} | {name} |")
    out.append("")
    own = Counter({k: v for k, v in prof.total.items()
                   if any(f"({p}/" in k for p in ("sdk", "persistence", "tasks", "bench"))})
    for label, counter in (("self", prof.self_), ("total (inclusive; worker plumbing frames left out)", prof.total),
                           ("total, Baton's own functions only", own)):
        out += [f"top {top} by {label} time:", "", "| % | samples | function |", "|---:|---:|---|"]
        for name, n in counter.most_common(top):
            out.append(f"| {100 * n / max(1, prof.samples):.1f} | {n} | `{name}` |")
        out.append("")
    return "\n".join(out)


def record(env: bench.Env, scenario: str, size: int, reps: int, rate: int, idle: bool, out: Path) -> Path:
    assert env.baton_w is not None
    raw = out / f"{scenario}-{'wall' if idle else 'cpu'}-{uuid.uuid4().hex[:6]}.txt"
    cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(env.baton_w.pid), "--subprocesses",
           "--function", "--nonblocking", "--format", "raw", "--rate", str(rate), "-o", str(raw)]
    if idle:
        cmd.append("--idle")
    if not Path(cmd[0]).exists():
        cmd[0] = shutil.which("py-spy") or "py-spy"
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.5)  # let py-spy attach to the main process and its pool children
    if spy.poll() is not None:
        raise RuntimeError(f"py-spy exited: {spy.stderr.read().decode() if spy.stderr else ''}")
    ns = env.baton_ns
    wf = ns.seq if scenario == "seq" else ns.fan
    for i in range(reps):
        if scenario == "thru":  # ``size`` runs of 10 steps at once
            t0 = time.time()
            ids = [ns.seq.start(10).id for _ in range(size)]
            bench.wait_runs(env, ids, 900, interval=0.25)
            took = size * 10 / (bench.finished_at(env, ids) - t0)
            unit = f"{took:.0f} tasks/s"
        else:
            took = bench.baton_one(env, wf, size, timeout=900)
            unit = f"{took / size * 1000:.2f} ms/step" if scenario == "seq" else f"{took:.2f} s"
        bench.log(f"profile {scenario} ({'wall' if idle else 'cpu'}) rep {i + 1}/{reps}: {unit}")
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(10)
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote no profile: {spy.stderr.read().decode() if spy.stderr else ''}")
    return raw


def sql_snapshot(prefix: Path) -> dict[str, list[float]]:
    total: dict[str, list[float]] = {}
    for path in prefix.parent.glob(prefix.name + ".*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for key, (n, secs) in data.items():
            entry = total.setdefault(key, [0, 0.0])
            entry[0] += n
            entry[1] += secs
    return total


def sql_report(env: bench.Env, scenario: str, size: int, reps: int, prefix: Path) -> str:
    """Statements, transactions and pool checkouts per step (seq) or per fanned-out task (fan)."""
    wf = env.baton_ns.seq if scenario == "seq" else env.baton_ns.fan
    time.sleep(0.5)
    before = sql_snapshot(prefix)
    took = [bench.baton_one(env, wf, size, timeout=900) for _ in range(reps)]
    time.sleep(0.5)
    after = sql_snapshot(prefix)
    units = size * reps
    unit = "step" if scenario == "seq" else "task"
    rows = []
    for key, (n, secs) in after.items():
        n0, s0 = before.get(key, [0, 0.0])
        if n - n0 > 0:
            rows.append((key, (n - n0) / units, (secs - s0) / units * 1000))
    rows.sort(key=lambda r: -r[2] if r[2] else -r[1] / 1000)
    stmts = sum(r[1] for r in rows if not r[0].startswith("("))
    secs = sum(r[2] for r in rows)
    out = [f"### SQL per {unit}: {scenario} ({size}), {reps} runs, median "
           f"{bench.med(took) / (size if scenario == 'seq' else 1) * (1000 if scenario == 'seq' else 1):.2f} "
           f"{'ms/step' if scenario == 'seq' else 's'}",
           "", f"{stmts:.1f} statements per {unit}, {secs:.2f} ms per {unit} inside cursor.execute "
           "(pool pre-ping round trips and COMMIT not included in the time)", "",
           f"| per {unit} | ms per {unit} | statement |", "|---:|---:|---|"]
    for key, n, ms in rows:
        out.append(f"| {n:.2f} | {ms:.3f} | `{key}` |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=("seq", "fan", "thru", "both"), default="both")
    p.add_argument("--seq-size", type=int, default=200)
    p.add_argument("--fan-size", type=int, default=1000)
    p.add_argument("--thru-size", type=int, default=200, help="runs of 10 steps started at once")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--store", choices=("pg", "sqlite"), default="pg")
    p.add_argument("--pool", default="prefork")
    p.add_argument("--concurrency", "-c", type=int, default=2)
    p.add_argument("--sql", action="store_true", help="also count and time SQL statements per step (no py-spy)")
    p.add_argument("--mode", choices=("cpu", "wall", "both", "none"), default="both",
                   help="cpu: busy samples only; wall: idle included, inside task execution")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--redis-dbs", default="11,12,13")
    p.add_argument("--out", default=None, help="keep raw py-spy stacks here")
    a = p.parse_args(argv)
    dbs = tuple(int(x) for x in a.redis_dbs.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="baton-profile-"))
    out = Path(a.out) if a.out else tmp
    out.mkdir(parents=True, exist_ok=True)
    env = bench.Env(a.store, a.pool, a.concurrency, dbs, tmp)  # type: ignore[arg-type]
    scenarios = ["seq", "fan"] if a.scenario == "both" else [a.scenario]
    modes = {"both": ["cpu", "wall"], "none": []}.get(a.mode, [a.mode])
    prefix = tmp / "sqlstats"
    if a.sql:
        env.extra_env["BENCH_SQL_STATS"] = str(prefix)
    sections: list[str] = []
    try:
        env.open()
        env.start_baton()
        assert env.baton_w is not None
        for scenario in scenarios:
            size = {"seq": a.seq_size, "fan": a.fan_size, "thru": a.thru_size}[scenario]
            bench.baton_one(env, env.baton_ns.fan if scenario == "fan" else env.baton_ns.seq, min(size, 50))
            if a.sql and scenario != "thru":
                sections.append(sql_report(env, scenario, size, a.reps, prefix))
                print(sections[-1], flush=True)
            for mode in modes:
                raw = record(env, scenario, size, a.reps, a.rate, mode == "wall", out)
                prof = parse(raw, env.baton_w.pid, in_task_only=mode == "wall")
                what = ("CPU (busy samples, all worker processes)" if mode == "cpu"
                        else "wall clock inside task execution (idle included: waits on PostgreSQL/Redis show)")
                sections.append(report(f"{scenario} ({size}), {a.reps} runs: {what}", prof, a.top, a.rate)
                                + f"\nraw stacks: {raw}\n")
                print(sections[-1], flush=True)
    finally:
        env.close()
        if not a.out:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
