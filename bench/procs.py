"""The benchmarks' worker processes: one ``celery worker`` subprocess per side, and the CPU and
memory of a process tree read from ``/proc``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            out += [int(x) for x in text]
    except OSError:
        pass
    return out


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (children's own time included per pid, not their reaped children)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


class Worker:
    """One ``celery worker`` subprocess (its own session, so the whole group can be signalled)."""

    count = 0

    def __init__(self, side: str, env: dict[str, str], queue: str, logdir: Path, pool: str, concurrency: int) -> None:
        self.side = side
        self.env = env
        self.queue = queue
        self.logdir = logdir
        self.pool = pool
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None
        self.logfile: Path | None = None

    def start(self) -> Worker:
        Worker.count += 1
        name = f"{self.side}{Worker.count}-{self.queue}@%h"
        self.logfile = self.logdir / f"worker-{self.side}-{Worker.count}.log"
        env = dict(os.environ)
        env.update(self.env)
        env["PYTHONPATH"] = str(ROOT)
        with open(self.logfile, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "bench.app", "worker", "-P", self.pool,
                 "-c", str(self.concurrency), "-n", name, "-Q", self.queue, "--without-mingle",
                 "--without-gossip", "-l", "WARNING"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.logfile.read_text(errors="replace")[-3000:] if self.logfile else ""
            raise RuntimeError(f"{self.side} worker exited with {self.proc.returncode}:\n{tail}")

    def pids(self) -> list[int]:
        return [self.pid, *_children(self.pid)] if self.alive() else []

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def cpu_main(self) -> float:
        """CPU of the main process alone (consumer, timers, Baton's sweeper thread)."""
        return cpu_seconds([self.pid]) if self.alive() else 0.0

    def rss(self) -> dict[str, float]:
        """RSS in MB of the main process, of the largest pool child, and of the whole tree."""
        main = _rss_kb(self.pid) / 1024
        kids = [_rss_kb(p) / 1024 for p in _children(self.pid)]
        return {"main": main, "max_child": max(kids, default=0.0), "total": main + sum(kids)}

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        self.proc = None
