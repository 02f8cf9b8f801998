"""Flower configuration for a Baton deployment.

Use it with stock Flower or with Flower plus Baton's Workflows section:

    celery -A agents flower --conf=dashboards/flowerconfig.py
    baton -A agents flower --conf=dashboards/flowerconfig.py

Flower executes this file and keeps the names that are Flower options. Environment
variables still win here because each value below reads its ``FLOWER_*`` variable first
(Flower applies the config file after the environment, so a literal would override it).
Workers must send task events for Flower to see tasks start and finish: start them with
``-E`` (or set ``worker_send_task_events = True``). To list queued tasks before a worker takes
them, set ``task_send_sent_event = True`` on the app (Baton leaves it off: a second publish per task).
"""

from __future__ import annotations

import os


def _flag(name: str, default: bool) -> bool:
    return os.environ.get(name, str(default)).strip().lower() in ("1", "true", "yes", "on")


# Listen on loopback unless told otherwise; put a reverse proxy with TLS in front for remote access.
address = os.environ.get("FLOWER_ADDRESS", "127.0.0.1")
port = int(os.environ.get("FLOWER_PORT", "5555"))

# Serve under a path (behind a proxy): Flower at /flower/, Baton's pages at /flower/workflows/.
url_prefix = os.environ.get("FLOWER_URL_PREFIX", "")

# Persistent state: off by default (Flower rebuilds its view from events; Baton's own history is
# in the database). Turn on to keep Flower's task list across restarts, saved to `db`.
persistent = _flag("FLOWER_PERSISTENT", False)
db = os.environ.get("FLOWER_DB", "flower-state.db")
state_save_interval = int(os.environ.get("FLOWER_STATE_SAVE_INTERVAL", "60000"))  # ms; 0 = only at exit
max_tasks = int(os.environ.get("FLOWER_MAX_TASKS", "100000"))

# Show args and kwargs in the task list: Baton puts `baton_run` and `baton_step` into each
# activity's kwargs as displayed, so the run id is visible and searchable (`kwargs:baton_run=<id>`).
tasks_columns = os.environ.get("FLOWER_TASKS_COLUMNS", "name,uuid,state,args,kwargs,received,runtime,worker")

# Ask workers to send task events even if they were started without -E (re-sent every few
# seconds; lost on a worker restart until the next broadcast). -E on workers is still best.
enable_events = _flag("FLOWER_ENABLE_EVENTS", True)

# Basic auth example. Set FLOWER_BASIC_AUTH="admin:a-long-password" (comma-separate several users)
# rather than writing a password here. Flower's auth also protects Baton's /workflows pages.
basic_auth = [u for u in os.environ.get("FLOWER_BASIC_AUTH", "").split(",") if u]
# basic_auth = ["admin:change-me"]
