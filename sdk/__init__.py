"""Baton: durable generator workflows on ordinary Celery workers.

Everything users need is importable from here. Importing ``sdk`` loads neither Celery
nor a database driver; ``Baton(app)`` loads them when it is constructed.
"""

from __future__ import annotations

from .client import Baton
from .commands import (
    RetryPolicy,
    continue_as_new,
    first,
    gather,
    now,
    patched,
    random,
    side_effect,
    sleep,
    sleep_until,
    step,
    uuid4,
    wait_signal,
)
from .errors import (
    ActivityError,
    BatonError,
    Cancelled,
    DefinitionError,
    NonDeterminismError,
    SerializationError,
    SignalTimeout,
    StoreError,
    WorkflowAlreadyStarted,
    WorkflowFailed,
    WorkflowNotFound,
)
from .events import Checkpoint, Event, RunStatus
from .workflow import Workflow, WorkflowHandle

__all__ = [
    "ActivityError",
    "Baton",
    "BatonError",
    "Cancelled",
    "Checkpoint",
    "DefinitionError",
    "Event",
    "NonDeterminismError",
    "RetryPolicy",
    "RunStatus",
    "SerializationError",
    "SignalTimeout",
    "StoreError",
    "Workflow",
    "WorkflowAlreadyStarted",
    "WorkflowFailed",
    "WorkflowHandle",
    "WorkflowNotFound",
    "continue_as_new",
    "first",
    "gather",
    "now",
    "patched",
    "random",
    "side_effect",
    "sleep",
    "sleep_until",
    "step",
    "uuid4",
    "wait_signal",
]
