"""Fault injection for the crash tests: ``BATON_FAULT=<point>`` makes the process exit hard
(``os._exit``) when it reaches that point of the advance path.

With ``BATON_FAULT_ONCE=<path>`` the fault fires once across processes (the first to get
there creates the file), so a replacement worker started with the same environment
recovers instead of crashing again. Unset in production: the check is one dict lookup.
"""

from __future__ import annotations

import os

POINTS = ("after_commit", "after_publish", "mid_fanout_publish", "before_record", "after_fan_in")
# after_fan_in: a fan-out's last result committed with its run flagged, the decision not yet
# taken (PostgreSQL's one-statement record; on SQLite the two are one transaction).
POSTGRES_ONLY = ("after_fan_in",)
# Not in the crash-points matrix (it needs eager steps): a pool process has kept a fan-out's share
# to run eagerly (``tasks.eager``) and published none of it, nor the rest of the fan-out.
EAGER_KEPT = "eager_kept"


def fault(point: str) -> None:
    if os.environ.get("BATON_FAULT") != point:
        return
    once = os.environ.get("BATON_FAULT_ONCE")
    if once:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{point} {os.getpid()}\n".encode())
        os.close(fd)
    os._exit(99)
