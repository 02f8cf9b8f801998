"""The ``baton`` command line: start, inspect and steer runs; ``baton demo`` shows it all with no servers.

``-A module:app`` (or ``BATON_APP``) names the module that builds the Celery app and its ``Baton``, as
``celery -A`` does. Errors are one line on stderr and a non-zero exit code; ``--debug`` shows tracebacks.

This module imports typer, rich and (through the user's app) Celery, so ``sdk/__init__.py`` never imports it.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .client import Baton
from .display import (
    Snapshot,
    describe_waiting,
    fmt_time,
    fmt_value,
    history_rows,
    progress_line,
    progress_renderable,
    snapshot,
    source_line,
    where,
)
from .errors import BatonError, WorkflowNotFound
from .events import RunStatus

APP_ENV = "BATON_APP"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

out = Console(highlight=False, soft_wrap=True)  # lines are log-friendly; tables still fit the width
err = Console(stderr=True, highlight=False)

cli = typer.Typer(
    name="baton", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Durable generator workflows on Celery: start, inspect and steer runs.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


class CliError(Exception):
    """A user error the CLI reports as one line."""


@dataclass
class State:
    app_spec: str | None
    debug: bool
    _baton: Baton | None = None

    @property
    def baton(self) -> Baton:
        if self._baton is None:
            self._baton = load_baton(self.app_spec)
        return self._baton


@cli.callback()
def _root(
    ctx: typer.Context,
    app: str | None = typer.Option(None, "-A", "--app", envvar=APP_ENV, metavar="MODULE[:APP]",
                                   help="Module defining the Celery app and its Baton (as for celery -A)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
) -> None:
    ctx.obj = State(app, debug)


# ---------------------------------------------------------------- loading the user's app


def load_baton(spec: str | None) -> Baton:
    """The ``Baton`` of ``module[:attr]``: the attribute itself, ``module.baton``, or the one in its globals."""
    if not spec:
        raise CliError(f"no app given: pass -A module:app (as for celery -A) or set {APP_ENV}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # as `celery -A` does: modules next to where you run the command
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise CliError(f"cannot load app {spec!r}: no module named {missing!r} "
                           f"(run baton from the directory that holds it, or fix -A/{APP_ENV})") from None
        raise CliError(f"cannot load app {spec!r}: importing {module_name} failed: {exc}") from exc
    except BatonError:
        raise
    except Exception as exc:
        raise CliError(f"cannot load app {spec!r}: importing {module_name} raised "
                       f"{type(exc).__name__}: {exc}") from exc
    target: Any = module
    if attr:
        if not hasattr(module, attr):
            raise CliError(f"cannot load app {spec!r}: module {module_name} has no attribute {attr!r}")
        target = getattr(module, attr)
        if isinstance(target, Baton):
            return target
    found = [v for v in vars(module).values() if isinstance(v, Baton)]
    named = getattr(module, "baton", None)
    if isinstance(named, Baton):
        found.insert(0, named)
    if attr:
        found.sort(key=lambda b: b.app is not target)  # the Baton bound to the named app first
    if not found:
        raise CliError(f"module {module_name} defines no Baton: add `baton = Baton(app)` next to its Celery app")
    return found[0]


def parse_json(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{what} is not valid JSON ({exc.msg} at column {exc.colno}): {text!r}; "
                       "quote it for the shell, e.g. '[\"a\", 1]' or '{\"ok\": true}'") from None


def state(ctx: typer.Context) -> State:
    obj = ctx.obj
    assert isinstance(obj, State)
    return obj


# ---------------------------------------------------------------- what a run is doing




# ---------------------------------------------------------------- commands on runs


@cli.command()
def start(
    ctx: typer.Context,
    workflow: str = typer.Argument(..., help="Name of a registered workflow."),
    args: str | None = typer.Argument(None, metavar="[ARGS]", help=(
        "JSON: a list of positional arguments, an object of keyword arguments, or one value "
        "(wrap a single dict argument in a list).")),
    workflow_id: str | None = typer.Option(None, "--id", help="Workflow id (idempotent: an existing id is "
                                                                "returned, not started again)."),
) -> None:
    """Start a run of WORKFLOW."""
    value = parse_json(args, "ARGS")
    baton = state(ctx).baton
    wf = baton.definition(workflow)
    pos: list[Any]
    kw: dict[str, Any]
    if args is None:
        pos, kw = [], {}
    elif isinstance(value, list):
        pos, kw = value, {}
    elif isinstance(value, dict):
        pos, kw = [], value
    else:
        pos, kw = [value], {}
    existed = workflow_id is not None and baton.store.latest_run(workflow_id) is not None
    handle = wf.start(*pos, workflow_id=workflow_id, **kw)
    if existed:
        out.print(f"run {escape(handle.id)} already exists ({handle.status()}); not started again")
    else:
        out.print(f"started {escape(handle.id)}")
    out.print(f"  follow it:  baton watch {escape(handle.id)}", style="dim")


@cli.command("ls")
def list_runs(
    ctx: typer.Context,
    status: str | None = typer.Option(None, "--status", "-s", help="running, completed, failed, cancelled, "
                                                                   "blocked or continued."),
    workflow: str | None = typer.Option(None, "--workflow", "-w", help="Only runs of this workflow."),
    limit: int = typer.Option(50, "--limit", "-n", min=1, help="At most this many runs, newest first."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per run, one per line."),
) -> None:
    """List runs, newest first."""
    baton = state(ctx).baton
    handles = baton.list(status=status, workflow=workflow, limit=limit)
    infos = [h.info() for h in handles]
    if as_json:
        for info in infos:
            out.print_json(json.dumps(info, default=str), indent=None)
        return
    if not infos:
        out.print("no runs" + (f" with status {status}" if status else "") +
                  (f" of workflow {workflow}" if workflow else ""))
        return
    table = Table(box=None, header_style="bold")
    for col in ("ID", "WORKFLOW", "STATUS", "STEP", "WAITING ON", "UPDATED"):
        table.add_column(col, no_wrap=col != "WAITING ON", overflow="fold")
    for info in infos:
        cells = (info["id"], info["workflow"], info["status"], str(info["step"]),
                 describe_waiting(info["waiting"]) if info["status"] == "running" else "-",
                 fmt_time(info["updated_at"]))
        table.add_row(*(escape(c) for c in cells))
    out.print(table, soft_wrap=False)




@cli.command()
def show(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., metavar="ID", help="Workflow id."),
    limit: int = typer.Option(40, "--limit", "-n", min=1, help="History rows to show (the latest)."),
    show_all: bool = typer.Option(False, "--all", help="Show the whole history."),
    as_json: bool = typer.Option(False, "--json", help="Print the run as JSON."),
) -> None:
    """Show a run: status, position with its source line, locals, and its history."""
    baton = state(ctx).baton
    handle = baton.get(run_id)
    info = handle.info()
    if as_json:
        info["history"] = [{"seq": e.seq, "kind": e.kind, "step": e.step, "slot": e.slot, "name": e.name,
                            "payload": e.payload, "at": e.at} for e in handle.history()]
        out.print_json(json.dumps(info, default=str))
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("id", escape(info["id"]) + (f"  (run {escape(info['run_id'])})" if info["run_id"] != info["id"]
                                               else ""))
    grid.add_row("workflow", escape(info["workflow"]))
    grid.add_row("status", escape(info["status"]))
    grid.add_row("args", escape(fmt_value(info["args"], 200)) +
                 (f"  kwargs {escape(fmt_value(info['kwargs'], 200))}" if info["kwargs"] else ""))
    grid.add_row("step", str(info["step"]))
    grid.add_row("position", escape(where(info["position"])))
    code = source_line(info["position"])
    if code:
        grid.add_row("", Text(code, style="dim"))
    if info["status"] == "running":
        grid.add_row("waiting on", escape(describe_waiting(info["waiting"])))
    for note in info.get("diagnosis") or []:
        grid.add_row("[yellow]stuck?[/]", escape(note))
    if info["result"] is not None:
        grid.add_row("result", escape(fmt_value(info["result"], 1000)))
    if info["error"]:
        grid.add_row("error", escape(f"{info['error'].get('type', '')}: {info['error'].get('message', '')}"))
    if info["forked_from"]:
        grid.add_row("forked from", escape(f"{info['forked_from']} at step {info['fork_step']}"))
    if info["parent_run_id"]:
        grid.add_row("parent", escape(info["parent_run_id"]))
    grid.add_row("started", fmt_time(info["created_at"]))
    grid.add_row("updated", fmt_time(info["updated_at"]))
    out.print(Panel(grid, title=f"run {escape(info['id'])}", title_align="left", border_style="blue"), soft_wrap=False)

    local_vars = info["locals"] or {}
    if local_vars:
        table = Table(title="locals", title_justify="left", box=None, header_style="bold")
        table.add_column("NAME", no_wrap=True)
        table.add_column("VALUE", overflow="fold")
        for name, value in local_vars.items():
            table.add_row(escape(name), escape(fmt_value(value, 160)))
        out.print(table, soft_wrap=False)

    rows = history_rows(handle.history())
    shown = rows if show_all else rows[-limit:]
    table = Table(title=f"history ({len(rows)} rows" + ("" if len(shown) == len(rows) else
                                                         f", latest {len(shown)}; --all for every row") + ")",
                  title_justify="left", box=None, header_style="bold")
    for col in ("SEQ", "STEP", "EVENT", "DETAIL", "AT"):
        table.add_column(col, no_wrap=col != "DETAIL", overflow="fold")
    for row in shown:
        table.add_row(*(escape(c) for c in row))
    out.print(table, soft_wrap=False)


@cli.command()
def watch(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., metavar="ID", help="Workflow id."),
    timeout: float | None = typer.Option(None, "--timeout", help="Give up after this many seconds (exit 1)."),
    interval: float = typer.Option(0.5, "--interval", min=0.05, help="Seconds between polls."),
) -> None:
    """Follow a run live until it ends; exit 0 if it completed, 1 otherwise."""
    baton = state(ctx).baton
    handle = baton.get(run_id)
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    last = ""
    snap = snapshot(baton, handle.id)

    def done() -> bool:
        return snap.ended or (deadline is not None and time.monotonic() > deadline)

    if out.is_terminal:
        with Live(progress_renderable(f"watching {handle.id}", snap, 0), console=out, transient=False) as live:
            while not done():
                time.sleep(interval)
                snap = snapshot(baton, handle.id)
                live.update(progress_renderable(f"watching {handle.id}", snap, time.monotonic() - started))
    else:
        while True:
            line = progress_line(snap, time.monotonic() - started)
            key = line.split("]", 1)[1]
            if key != last:
                out.print(escape(line))
                last = key
            if done():
                break
            time.sleep(interval)
            snap = snapshot(baton, handle.id)
    finish(handle, snap, timeout)


def finish(handle: Any, snap: Snapshot, timeout: float | None) -> None:
    info = handle.info()
    if snap.status == RunStatus.COMPLETED.value:
        out.print(f"{escape(handle.id)} completed → {escape(fmt_value(info['result'], 2000))}")
        return
    if not snap.ended:
        raise CliError(f"run {handle.id} still {snap.status} at step {snap.step} after {timeout}s; "
                       f"it goes on: `baton watch {handle.id}` again to keep following it")
    error = info["error"] or {}
    raise CliError(f"run {handle.id} {snap.status}: {error.get('type', '')}: {error.get('message', '')}".rstrip(": "))


@cli.command("signal")
def send_signal(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., metavar="ID", help="Workflow id."),
    name: str = typer.Argument(..., help="Signal name, as in wait_signal(NAME)."),
    payload: str | None = typer.Argument(None, metavar="[JSON]", help="Payload as JSON (default null)."),
) -> None:
    """Send a signal to a run (buffered until a wait_signal takes it)."""
    value = parse_json(payload, "the signal payload")
    handle = state(ctx).baton.get(run_id)
    handle.signal(name, value)
    out.print(f"sent signal {name!r} to {escape(handle.id)}")


@cli.command()
def cancel(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., metavar="ID", help="Workflow id."),
    reason: str = typer.Option("cancelled from the command line", "--reason", help="Shown in the run's error."),
    wait: bool = typer.Option(False, "--wait", help="Wait until the run has ended."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds --wait waits."),
) -> None:
    """Cancel a run: Cancelled is raised at its current yield, so its cleanup code runs."""
    handle = state(ctx).baton.get(run_id)
    if not handle.cancel(reason):
        raise CliError(f"run {handle.id} has already ended ({handle.status()}); nothing to cancel")
    out.print(f"cancel requested for {escape(handle.id)}")
    if wait:
        deadline = time.monotonic() + timeout
        while not RunStatus(handle.status()).terminal:
            if time.monotonic() > deadline:
                raise CliError(f"run {handle.id} still {handle.status()} {timeout}s after the cancel request; "
                               "are workers running?")
            time.sleep(0.1)
        out.print(f"{escape(handle.id)} {handle.status()}")


@cli.command()
def fork(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., metavar="ID", help="Workflow id of the original."),
    at: int = typer.Option(..., "--at", min=0, metavar="STEP",
                           help="Keep the original's first STEP steps; run live after them."),
    new_id: str | None = typer.Option(None, "--id", help="Id of the new run (default: generated)."),
) -> None:
    """Start a new run sharing the first STEP steps of a run's history (the original is untouched)."""
    baton = state(ctx).baton
    baton.get(run_id)
    handle = baton.fork(run_id, at_step=at, new_id=new_id)
    out.print(f"forked {escape(run_id)} at step {at} as {escape(handle.id)}")
    out.print(f"  follow it:  baton watch {escape(handle.id)}", style="dim")


@cli.command()
def resume(ctx: typer.Context, run_id: str = typer.Argument(..., metavar="ID", help="Workflow id.")) -> None:
    """Retry a blocked run after a code fix (re-drives a running one)."""
    handle = state(ctx).baton.resume(run_id)
    out.print(f"resumed {escape(handle.id)} ({handle.status()})")


@cli.command()
def dashboard(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8089, "--port", help="Port to listen on."),
    token: str | None = typer.Option(None, "--token", envvar="BATON_DASHBOARD_TOKEN",
                                     help="Require this token on every page and API call "
                                          "(set one to listen beyond localhost)."),
    flower_url: str | None = typer.Option(None, "--flower-url", envvar="BATON_FLOWER_URL",
                                          help="Flower's address, to link each step to its task."),
) -> None:
    """Serve the web dashboard: runs, timelines, positions and locals."""
    baton = state(ctx).baton
    from dashboards.server import serve

    serve(baton, host, port, token, flower_url)


@cli.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def flower(ctx: typer.Context) -> None:
    """Run Flower on the app, with Baton's run and step on each task (extra options go to Flower)."""
    baton = state(ctx).baton
    from dashboards.flower import run_flower

    run_flower(baton.app, baton, list(ctx.args))


# ---------------------------------------------------------------- migrate


@cli.command()
def migrate(ctx: typer.Context) -> None:
    """Bring the database to this Baton's schema (stop the workers first)."""
    from persistence.migrations import migrate as run_migrations

    baton = state(ctx).baton
    applied = run_migrations(baton.database_url)
    out.print(f"schema up to date ({'applied ' + ', '.join(map(str, applied)) if applied else 'nothing to apply'})")


# ---------------------------------------------------------------- entry point


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if not isinstance(exc, CliError | BatonError | ValueError | TypeError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if len(text) > 600:
        text = text[:597] + "..."
    return text


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``baton`` script."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("BATON_DEBUG", "") not in ("", "0")
    try:
        cli(args=args, prog_name="baton")
    except SystemExit:
        raise
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        if debug:
            raise
        hint = "" if isinstance(exc, CliError | BatonError | WorkflowNotFound) else " (--debug for the traceback)"
        err.print(f"[red]error:[/] {escape(one_line(exc))}{hint}", soft_wrap=True)
        sys.exit(EXIT_ERROR)


from . import demo as _demo  # noqa: E402,F401 - registers `baton demo` on `cli`

if __name__ == "__main__":
    # `python -m sdk.cli`: run the imported module's CLI, the one `baton demo` registered itself on
    from sdk.cli import main as _main

    _main()
