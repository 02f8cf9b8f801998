"""``baton demo``: workers on the embedded broker, the example agent, a worker killed mid-run.

Registered on the CLI by importing this module (``sdk.cli`` does so at its end).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.text import Text

from .cli import EXIT_INTERRUPTED, CliError, cli, err, out
from .client import Baton
from .display import Snapshot, progress_line, progress_renderable, short_path, snapshot
from .events import RunStatus

# ---------------------------------------------------------------- baton demo


DEMO_MODULE = "examples.coding_agent"
DEMO_TICKET = "reject negative values in every handler"
SLOW_TASKS = (".call_model", ".run_tests")  # the example's activities that take 0.15 s or more
KILL_YOUNGER_THAN = 0.06  # seconds: a slow task started this recently has most of its time left at the kill


def _age(started: datetime | None, now: datetime) -> float:
    """Seconds since ``started`` (a stored timestamp); infinite if unknown."""
    from persistence.store import aware

    at = aware(started)
    return float("inf") if at is None else (now - at).total_seconds()


def find_examples_root() -> Path:
    """The directory holding ``examples/coding_agent.py``: this checkout, or the working directory."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "examples" / "coding_agent.py").is_file():
            return root
    raise CliError("the demo runs examples/coding_agent.py, which is not next to this installation nor in the "
                   "working directory; run `baton demo` from a clone of the Baton repository")


class Workers:
    """Demo worker subprocesses, each in its own process group so it can be SIGKILLed whole."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory = directory
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, concurrency: int) -> subprocess.Popen[bytes]:
        log = open(self.directory / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", DEMO_MODULE, "worker", "-P", "prefork",
                 "-c", str(concurrency), "-n", f"{name}@%h", "--without-mingle", "--without-gossip",
                 "-l", "WARNING"],
                cwd=self.directory, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            log.close()
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)

    def log_tail(self, name: str, lines: int = 8) -> str:
        path = self.directory / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"

    def stop(self) -> None:
        """SIGTERM every group, then SIGKILL whatever is left after a grace period."""
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the group too: pool children of a worker that died first
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


def _terminate(signum: int, frame: Any) -> None:
    # Also for SIGINT, which a shell may have set to SIG_IGN for a background job.
    raise KeyboardInterrupt  # so that `finally` stops the workers and the broker


@dataclass
class DemoState:
    """What the demo has done so far, for its live display and its final report."""

    events: list[str] = field(default_factory=list)
    killed: str | None = None
    killed_at: float | None = None
    killed_step: int = 0
    held: list[str] = field(default_factory=list)
    late: bool = False  # the big fan-out went by without a kill: take the next slow task instead
    recovered_at: float | None = None
    approved_at: float | None = None


@cli.command()
def demo(
    directory: Annotated[Path | None, typer.Option(
        "--dir", help="Working directory for the broker, the SQLite file, the logs and the generated repository "
                      "(default: a new temporary directory).")] = None,
    workers: int = typer.Option(2, "--workers", min=2, max=8, help="Worker processes to start."),
    concurrency: int = typer.Option(2, "--concurrency", min=1, max=8, help="Pool processes per worker."),
    modules: int = typer.Option(60, "--modules", min=50, max=500, help="Files in the generated repository "
                                                                      "(the size of each fan-out)."),
    kill: bool = typer.Option(True, "--kill/--no-kill", help="SIGKILL a worker mid-run."),
    timeout: float = typer.Option(240.0, "--timeout", help="Give up after this many seconds."),
) -> None:
    """Run a sample coding agent end to end on the embedded default (no servers), killing a worker mid-run."""
    began = time.monotonic()
    root = find_examples_root()
    work = (directory or Path(tempfile.mkdtemp(prefix="baton-demo-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    from tasks.embedded import embedded_broker_url, stop_embedded_broker

    broker_dir = work / "broker"
    db_path = work / "baton.sqlite3"
    for stale in (db_path, work / "baton.sqlite3-wal", work / "baton.sqlite3-shm"):
        stale.unlink(missing_ok=True)  # a fresh run every time, even in a reused --dir
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
    handlers = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGINT)}
    pool = Workers(work, env)
    try:
        out.print(f"[bold]Baton demo[/] in {escape(str(work))}")
        broker = embedded_broker_url(broker_dir)
        # No broker configured anywhere: every process takes Baton's embedded default, found through
        # BATON_HOME (the broker started above), and the SQLite file of BATON_DATABASE_URL.
        env.update(BATON_HOME=str(broker_dir), BATON_DATABASE_URL=f"sqlite:///{db_path}",
                   BATON_EXAMPLE_WORKSPACE=str(work / "workspace"),
                   PYTHONPATH=os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p))
        for key in [k for k in os.environ if k.startswith("CELERY_")]:
            del os.environ[key]
        for key in ("BATON_HOME", "BATON_DATABASE_URL", "BATON_EXAMPLE_WORKSPACE"):
            os.environ[key] = env[key]
        out.print(f"  broker    embedded redis-server on {escape(broker.removeprefix('redis+socket://'))} "
                  "(no TCP port)")
        out.print(f"  database  {escape(str(db_path))}")
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        example = importlib.import_module(DEMO_MODULE)
        baton: Baton = example.baton
        if baton.app.conf.broker_url != broker:
            raise CliError(f"{DEMO_MODULE} uses broker {baton.app.conf.broker_url!r}, not the demo's embedded one")
        baton.list(limit=1)  # creates the tables before the workers race to
        names = [f"demo{i + 1}" for i in range(workers)]
        for name in names:
            pool.start(name, concurrency)
        wait_for_workers(baton, pool, names, deadline=time.monotonic() + min(90.0, timeout))
        out.print(f"  workers   {', '.join(f'{n} (pid {pool.procs[n].pid})' for n in names)}: "
                  f"celery -A {DEMO_MODULE} worker -c {concurrency}")
        handle = example.coding_agent.start(DEMO_TICKET, modules=modules)
        out.print(f"  run       {escape(handle.id)}: coding_agent({DEMO_TICKET!r}, modules={modules})\n")
        ds = DemoState()
        snap = drive_demo(baton, handle, pool, names, ds, kill=kill, deadline=began + timeout, began=began)
        report_demo(baton, handle, snap, ds, work, began)
    except KeyboardInterrupt:
        err.print("interrupted: stopping the demo's workers and its broker")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        pool.stop()
        try:
            stop_embedded_broker(broker_dir)
        except Exception as exc:
            err.print(f"warning: could not stop the embedded broker in {broker_dir}: {exc}")


def wait_for_workers(baton: Baton, pool: Workers, names: list[str], deadline: float) -> None:
    """Ready once each worker's heartbeat row exists (its sweeper thread writes it at its first tick)."""
    pending = set(names)
    while pending:
        for name in names:
            proc = pool.procs[name]
            if proc.poll() is not None:
                raise CliError(f"worker {name} exited with code {proc.returncode} while starting: "
                               f"{pool.log_tail(name)}")
        ids = [w.id for w in baton.store.workers()]
        pending = {n for n in pending if not any(i.startswith(f"{n}@") and i.endswith(f"/{pool.procs[n].pid}")
                                                 for i in ids)}
        if pending and time.monotonic() > deadline:
            raise CliError(f"worker(s) {', '.join(sorted(pending))} did not start in time: "
                           f"{pool.log_tail(sorted(pending)[0])}")
        if pending:
            time.sleep(0.2)


def drive_demo(baton: Baton, handle: Any, pool: Workers, names: list[str], ds: DemoState, *, kill: bool,
               deadline: float, began: float) -> Snapshot:
    """Poll the run, kill a worker mid fan-out, approve when asked; return the final snapshot."""
    victim = names[0]
    start = time.monotonic()
    approve_after: float | None = None
    last_line = ""
    live = Live(console=out, refresh_per_second=8, transient=False) if out.is_terminal else None

    def note(message: str) -> None:
        ds.events.append(f"[{time.monotonic() - start:5.1f}s] {message}")
        if live is None:
            out.print(escape(ds.events[-1]))

    if live is not None:
        live.start()
    try:
        while True:
            snap = snapshot(baton, handle.id)
            now = time.monotonic()
            line = progress_line(snap, now - start)
            if live is not None:
                extra = [Text(e, style="magenta") for e in ds.events[-4:]]
                live.update(progress_renderable(f"run {handle.id}", snap, now - start,
                                                [*extra, worker_line(names, snap, ds)]))
            elif line.split("]", 1)[1] != last_line:
                out.print(escape(line))
                last_line = line.split("]", 1)[1]
            for name in names:
                if name != ds.killed and pool.procs[name].poll() is not None:
                    raise CliError(f"worker {name} exited unexpectedly ({pool.procs[name].returncode}): "
                                   f"{pool.log_tail(name)}")
            if kill and ds.killed is None and not snap.ended:
                # Only tasks long enough to still be running when the SIGKILL lands: a 20 ms file read
                # often finishes between this look at the store and the kill.
                # ... and only those started a moment ago: one further along may finish, and be
                # recorded by the victim, between this look and the kill (then nothing was lost).
                wall = datetime.now(UTC)
                held = [t.id for t in snap.rows if t.state == "started" and str(t.worker).startswith(f"{victim}@")
                        and str(t.task).endswith(SLOW_TASKS) and _age(t.started_at, wall) < KILL_YOUNGER_THAN]
                mid_fanout = snap.step_total >= 10 and snap.step_total // 4 <= snap.step_done < snap.step_total - 5
                # On a loaded machine a look at the store can take longer than the window of the
                # fan-out of slow tasks: once it is over, any later slow task the victim holds will do
                # (and the approval wait last).
                slow = Counter(t.step for t in snap.rows if str(t.task).endswith(SLOW_TASKS))
                ds.late = ds.late or any(n >= 10 and s < snap.step for s, n in slow.items())
                asking = any(w.get("kind") == "signal" for w in snap.waiting)
                if (held and (mid_fanout or ds.late)) or asking:
                    pool.kill(victim)
                    # Lost are the attempts still started once it is dead; any it recorded first were not.
                    after = {t.id: t.state for t in baton.store.task_rows(handle.run_id)}
                    held = [i for i in held if after.get(i) == "started"]
                    ds.killed, ds.killed_at, ds.killed_step, ds.held = victim, now, snap.step, held
                    note(f"SIGKILLed worker {victim} (pid {pool.procs[victim].pid}) and its pool at step "
                         f"{snap.step}, holding {len(held)} task(s) mid-flight")
            if ds.killed and ds.recovered_at is None and ds.held:
                rows = {t.id: t for t in snap.rows}
                held = [rows[i] for i in ds.held if i in rows]
                # Reclaimed attempts keep their task id: done by a survivor, the row names that worker.
                if all(t.state in ("done", "failed", "cancelled") for t in held):
                    ds.recovered_at = now
                    survivors = sorted({str(t.worker).split("@")[0] for t in held
                                        if t.worker and not str(t.worker).startswith(f"{victim}@")})
                    note(f"the {len(held)} task(s) {victim} held were found lost and re-run on "
                         f"{', '.join(survivors) or 'another worker'} "
                         f"({now - (ds.killed_at or now):.1f}s after the kill)")
            waiting_approval = any(w.get("kind") == "signal" and w.get("name") == "approval" for w in snap.waiting)
            if waiting_approval and (ds.killed or not kill) and ds.approved_at is None:
                if approve_after is None:
                    approve_after = now + 1.0  # a human takes a moment; the run holds no worker meanwhile
                    note("the agent asks for a human approval (signal 'approval'); the demo will approve")
                elif now >= approve_after:
                    handle.signal("approval", {"approved": True, "by": "baton demo"})
                    ds.approved_at = now
                    note("sent signal 'approval' {\"approved\": true}")
            if snap.ended:
                return snap
            if now > deadline:
                raise CliError(f"the demo did not finish within {deadline - began:.0f}s (run {handle.id} at step "
                               f"{snap.step}, waiting on {snap.waiting_text}); worker logs are in "
                               f"{pool.directory}")
            time.sleep(0.25)
    finally:
        if live is not None:
            live.stop()


def worker_line(names: list[str], snap: Snapshot, ds: DemoState) -> Text:
    text = Text("workers: ")
    for name in names:
        dead = name == ds.killed
        text.append(f"{name} {'✗ killed' if dead else '✓'} {snap.by_worker.get(name, 0)} tasks   ",
                    style="red" if dead else "green")
    return text


def report_demo(baton: Baton, handle: Any, snap: Snapshot, ds: DemoState, work: Path, began: float) -> None:
    if snap.status != RunStatus.COMPLETED.value:
        error = handle.info()["error"] or {}
        raise CliError(f"the demo run {handle.id} ended {snap.status}: {error.get('type')}: {error.get('message')}")
    result = handle.result(timeout=5)
    events = handle.history()
    per_worker = ", ".join(f"{name}: {n}" for name, n in sorted(snap.by_worker.items()))
    out.print(Panel(Text(json.dumps(result, indent=2)), title="result", title_align="left", border_style="green"),
              soft_wrap=False)
    out.print(f"[green]✓[/] run completed: {snap.step} steps, {len(events)} events, "
              f"{sum(snap.by_worker.values())} tasks ({escape(per_worker)})")
    if ds.killed:
        recovered = f", recovered in {ds.recovered_at - ds.killed_at:.1f}s" if ds.recovered_at and ds.killed_at \
            else ""
        out.print(f"[green]✓[/] worker {ds.killed} was SIGKILLed at step {ds.killed_step} with {len(ds.held)} "
                  f"task(s) in flight; the run carried on in the others{recovered}")
    out.print(f"[green]✓[/] demo finished in {time.monotonic() - began:.1f}s\n")
    app = f"baton -A {DEMO_MODULE}"
    out.print(f"[bold]Where to look next[/] (the demo's broker, database and logs are in {escape(str(work))}):")
    for line, comment in (
        (f"export BATON_HOME={work / 'broker'} BATON_DATABASE_URL=sqlite:///{work / 'baton.sqlite3'}", ""),
        (f"{app} show {handle.id}", "the run: position, locals, history"),
        (f"{app} dashboard", "the same in a browser"),
        (f"celery -A {DEMO_MODULE} worker &", "start workers, then branch the run after step 8:"),
        (f"{app} fork {handle.id} --at 8", ""),
        (short_path(str(find_examples_root() / "examples" / "coding_agent.py")), "the workflow's code"),
    ):
        out.print(f"  {escape(line)}" + (f"   [dim]# {escape(comment)}[/]" if comment else ""))


