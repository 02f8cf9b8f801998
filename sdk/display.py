"""How the CLI shows runs: waiting lists, positions, values, progress and history rows.

Pure formatting over the store's rows (rich renderables and plain text), shared by ``baton show``,
``watch`` and ``baton demo``.
"""

from __future__ import annotations

import json
import linecache
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .client import Baton
from .events import RunStatus


def describe_waiting(waiting: list[dict[str, Any]]) -> str:
    """``60 x coding_agent.call_model``, ``signal 'approval'``, ``timer``... from a checkpoint's waiting_on."""
    if not waiting:
        return "-"
    groups: Counter[tuple[str, str]] = Counter((str(w.get("kind", "?")), str(w.get("name", ""))) for w in waiting)
    parts = []
    for (kind, name), n in groups.items():
        label = {"activity": name, "signal": f"signal {name!r}", "timer": f"timer ({name or 'sleep'})",
                 "child": f"child run {name}", "more": f"{name} (not listed)"}.get(kind, f"{kind} {name}".strip())
        parts.append(f"{n} x {label}" if n > 1 else label)
    return ", ".join(parts)


def source_line(position: dict[str, Any] | None) -> str:
    if not position or not position.get("file") or not position.get("line"):
        return ""
    return linecache.getline(str(position["file"]), int(position["line"])).strip()


def short_path(path: str) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return path


def where(position: dict[str, Any] | None) -> str:
    if not position or not position.get("file"):
        return "-"
    return f"{short_path(str(position['file']))}:{position.get('line')} in {position.get('function')}"


def fmt_time(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def fmt_value(value: Any, limit: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Snapshot:
    """What a run is doing now, read from the store."""

    status: str
    step: int
    position: dict[str, Any]
    waiting: list[dict[str, Any]]
    step_total: int = 0
    step_done: int = 0
    tasks: Counter[str] = field(default_factory=Counter)
    by_worker: Counter[str] = field(default_factory=Counter)
    rows: list[Any] = field(default_factory=list)

    @property
    def waiting_text(self) -> str:
        return describe_waiting(self.waiting)

    @property
    def ended(self) -> bool:
        return self.status != RunStatus.RUNNING.value


def snapshot(baton: Baton, run_id: str) -> Snapshot:
    row = baton.store.require_run(run_id)
    from . import serde

    snap = Snapshot(status=str(row.status), step=int(row.step or 0), position=serde.loads(row.position) or {},
                    waiting=serde.loads(row.waiting) or [])
    snap.rows = list(baton.store.task_rows(row.run_id))
    latest: dict[tuple[int, int], Any] = {}
    for t in snap.rows:
        key = (t.step, t.slot)
        if key not in latest or t.attempt > latest[key].attempt:
            latest[key] = t
        if t.state == "done" and t.worker:
            snap.by_worker[str(t.worker).split("@")[0]] += 1
    for t in latest.values():
        snap.tasks[t.state] += 1
    here = [t for (s, _), t in latest.items() if s == snap.step]
    snap.step_total = len(here)
    snap.step_done = sum(t.state in ("done", "failed", "cancelled") for t in here)
    return snap


def progress_renderable(title: str, snap: Snapshot, elapsed: float, extra: list[Text] | None = None) -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column()
    status_style = {"completed": "green", "running": "yellow"}.get(snap.status, "red")
    grid.add_row("status", Text(f"{snap.status}  ({elapsed:.0f}s)", style=status_style))
    grid.add_row("step", Text(f"{snap.step}  {where(snap.position)}"))
    code = source_line(snap.position)
    if code:
        grid.add_row("", Text(code, style="dim"))
    waiting: Any = Text(snap.waiting_text)
    if snap.step_total > 1 and not snap.ended:
        waiting = Table.grid(padding=(0, 1))
        waiting.add_row(ProgressBar(total=snap.step_total, completed=snap.step_done, width=30),
                        Text(f"{snap.step_done}/{snap.step_total}  {snap.waiting_text}"))
    grid.add_row("waiting on", waiting)
    done = snap.tasks.get("done", 0)
    grid.add_row("tasks", Text(f"{done} done, {snap.tasks.get('started', 0)} running, "
                               f"{snap.tasks.get('published', 0) + snap.tasks.get('scheduled', 0)} queued"))
    for line in extra or []:
        grid.add_row("", line)
    return Panel(grid, title=title, title_align="left", border_style="blue")


def progress_line(snap: Snapshot, elapsed: float) -> str:
    text = f"[{elapsed:5.1f}s] step {snap.step:>3}  {snap.status:<9} waiting on {snap.waiting_text}"
    if snap.step_total > 1 and not snap.ended:
        text += f" ({snap.step_done}/{snap.step_total} done)"
    return text


def history_rows(events: list[Any]) -> list[tuple[str, str, str, str, str]]:
    """Events grouped so that a fan-out's 60 completions read as one row: (seqs, step, kind, detail, at)."""
    rows: list[tuple[str, str, str, str, str]] = []
    group: list[Any] = []

    def flush() -> None:
        if not group:
            return
        first, last = group[0], group[-1]
        seqs = str(first.seq) if len(group) == 1 else f"{first.seq}-{last.seq}"
        if len(group) == 1:
            detail = event_detail(first)
        else:
            names = Counter(e.name for e in group)
            detail = ", ".join(f"{n} x {name}" if n > 1 else name for name, n in names.items())
        kind = first.kind if len(group) == 1 else f"{first.kind} x{len(group)}"
        rows.append((seqs, "" if first.step is None else str(first.step), kind, detail, fmt_time(last.at)))
        group.clear()

    for e in events:
        if group and (e.kind != group[0].kind or e.step != group[0].step or e.kind == "step_scheduled"):
            flush()
        group.append(e)
    flush()
    return rows


def event_detail(e: Any) -> str:
    p = e.payload or {}
    if e.kind == "started":
        return f"{p.get('workflow')}(args={fmt_value(p.get('args'), 60)}, kwargs={fmt_value(p.get('kwargs'), 60)})"
    if e.kind == "step_scheduled":
        text = f"{e.name}  line {p.get('line')}"
        if "value" in p:
            text += f" → {fmt_value(p['value'], 60)}"
        return text
    if e.kind in ("activity_completed", "child_completed"):
        return f"{e.name} → {fmt_value(p.get('result'), 60)}"
    if e.kind in ("activity_failed", "child_failed", "failed"):
        error = p.get("error") or {}
        return f"{e.name} {error.get('type', '')}: {fmt_value(error.get('message', ''), 80)}".strip()
    if e.kind == "attempt_scheduled":
        return f"{e.name} attempt {p.get('attempt')} after {p.get('after', '')}"
    if e.kind == "signal_received":
        return f"{e.name} ← {fmt_value(p.get('payload'), 60)}"
    if e.kind == "completed":
        return f"→ {fmt_value(p.get('result'), 80)}"
    return fmt_value({k: v for k, v in p.items() if k != "traceback"}, 80) if p else e.name
