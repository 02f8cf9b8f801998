"""The tables. One row per run, per history event, per step checkpoint, per activity
attempt, per timer, per signal, per worker heartbeat, plus a schema-version row.

JSON columns are TEXT holding JSON written by ``sdk.serde.dumps`` (never pickle).
Timestamps are timezone-aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Column, DateTime, Index, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

# 2: baton_runs.fan_step/fan_open, baton_tasks.result (deferred fan-in);
# 3: the runs list's indexes (created_at; status and workflow each with created_at, replacing
#    their own), and one on settled attempts (metrics)
SCHEMA_VERSION = 3
FINISHED = "finished_at IS NOT NULL"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts(nullable: bool = False, index: bool = False) -> Column:  # type: ignore[type-arg]
    return Column(DateTime(timezone=True), nullable=nullable, index=index)


class Run(SQLModel, table=True):
    """A run of a workflow. ``workflow_id`` groups a continue-as-new chain."""

    __tablename__ = "baton_runs"
    # The runs list, newest first, whole or by status or workflow: each reads one index in order.
    __table_args__ = (Index("ix_baton_runs_created_at", "created_at"),
                      Index("ix_baton_runs_status_created", "status", "created_at"),
                      Index("ix_baton_runs_workflow_created", "workflow", "created_at"))

    run_id: str = Field(primary_key=True, max_length=255)
    workflow_id: str = Field(index=True, max_length=255)
    workflow: str = Field(max_length=255)
    status: str = Field(max_length=16)
    args: str = Field(sa_column=Column(Text, nullable=False))
    kwargs: str = Field(sa_column=Column(Text, nullable=False))
    result: str | None = Field(default=None, sa_column=Column(Text))
    error: str | None = Field(default=None, sa_column=Column(Text))
    parent_run_id: str | None = Field(default=None, index=True, max_length=255)
    parent_step: int | None = None
    parent_slot: int | None = None
    previous_run_id: str | None = Field(default=None, max_length=255)
    next_run_id: str | None = Field(default=None, max_length=255)
    forked_from: str | None = Field(default=None, max_length=255)
    fork_step: int | None = None
    last_seq: int = 0
    decided_seq: int = 0
    step: int = 0
    waiting: str | None = Field(default=None, sa_column=Column(Text))
    fan_step: int | None = None  # the current step, when it is a fan-out of activities (deferred fan-in)
    fan_open: int | None = None  # its slots still without an outcome; the completion that takes it to 0 decides
    position: str | None = Field(default=None, sa_column=Column(Text))
    locals: str | None = Field(default=None, sa_column=Column(Text))
    needs_advance: bool = Field(default=True, index=True)
    advance_requested_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    created_at: datetime = Field(sa_column=_ts())
    updated_at: datetime = Field(sa_column=_ts())
    finished_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


class EventRow(SQLModel, table=True):
    """One history event. ``(run_id, seq)`` orders; ``(run_id, key)`` makes inputs idempotent."""

    __tablename__ = "baton_events"
    __table_args__ = (
        UniqueConstraint("run_id", "seq", name="uq_baton_events_seq"),
        UniqueConstraint("run_id", "key", name="uq_baton_events_key"),
    )

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(max_length=255)
    seq: int
    kind: str = Field(max_length=32)
    step: int | None = None
    slot: int | None = None
    name: str = Field(default="", max_length=255)
    key: str | None = Field(default=None, max_length=255)
    payload: str = Field(sa_column=Column(Text, nullable=False))
    at: datetime = Field(sa_column=_ts())


class CheckpointRow(SQLModel, table=True):
    """A step's position and locals delta (``{"full", "set", "unset"}``)."""

    __tablename__ = "baton_checkpoints"

    run_id: str = Field(primary_key=True, max_length=255)
    step: int = Field(primary_key=True)
    file: str = Field(default="", max_length=1024)
    line: int = 0
    function: str = Field(default="", max_length=255)
    locals_delta: str = Field(sa_column=Column(Text, nullable=False))
    waiting: str = Field(sa_column=Column(Text, nullable=False))
    at: datetime = Field(sa_column=_ts())


class TaskRow(SQLModel, table=True):
    """An activity attempt: the outbox row before publish, then its lifecycle."""

    __tablename__ = "baton_tasks"
    __table_args__ = (
        UniqueConstraint("run_id", "step", "slot", "attempt", name="uq_baton_tasks_attempt"),
        Index("ix_baton_tasks_state_due", "state", "not_before"),
        # Settled attempts by the time they settled: metrics add up only what settled since
        # their last look. Partial, so a new attempt's insert adds no entry.
        Index("ix_baton_tasks_finished", "finished_at", postgresql_where=text(FINISHED),
              sqlite_where=text(FINISHED)),
    )

    id: str = Field(primary_key=True, max_length=255)  # the Celery task id
    run_id: str = Field(index=True, max_length=255)
    step: int
    slot: int
    attempt: int
    task: str = Field(max_length=255)
    args: str = Field(sa_column=Column(Text, nullable=False))
    kwargs: str = Field(sa_column=Column(Text, nullable=False))
    options: str = Field(sa_column=Column(Text, nullable=False))
    timeout: float | None = None
    state: str = Field(max_length=16)  # scheduled|started|done|failed|cancelled (the last three set finished_at)
    result: str | None = Field(default=None, sa_column=Column(Text))  # a fan-out result not yet in the history
    worker: str | None = Field(default=None, max_length=255)
    dispatches: int = 0
    not_before: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    created_at: datetime = Field(sa_column=_ts())
    published_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    started_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    finished_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


class TimerRow(SQLModel, table=True):
    """A durable timer: ``sleep``, ``signal_timeout`` or ``attempt_timeout``."""

    __tablename__ = "baton_timers"
    __table_args__ = (Index("ix_baton_timers_due", "fired", "fire_at"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True, max_length=255)
    step: int
    slot: int
    attempt: int = 0
    kind: str = Field(max_length=32)
    fire_at: datetime = Field(sa_column=_ts())
    fired: bool = False


class SignalRow(SQLModel, table=True):
    """A signal sent to a run; consumed by the wait that took it (buffered until then)."""

    __tablename__ = "baton_signals"
    __table_args__ = (Index("ix_baton_signals_open", "run_id", "consumed_step"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(max_length=255)
    name: str = Field(max_length=255)
    payload: str = Field(sa_column=Column(Text, nullable=False))
    consumed_step: int | None = None
    at: datetime = Field(sa_column=_ts())


class WorkerRow(SQLModel, table=True):
    """A worker's heartbeat, written by its main process; stale means dead."""

    __tablename__ = "baton_workers"

    id: str = Field(primary_key=True, max_length=255)  # "hostname/pid"
    hostname: str = Field(max_length=255)
    pid: int
    started_at: datetime = Field(sa_column=_ts())
    last_beat: datetime = Field(sa_column=_ts())
    registered: str = Field(default="[]", sa_column=Column(Text, nullable=False))  # task + workflow names


class LeaseRow(SQLModel, table=True):
    """A named cluster-wide lease (the sweeper's), with an expiry."""

    __tablename__ = "baton_leases"

    name: str = Field(primary_key=True, max_length=64)
    owner: str = Field(max_length=255)
    until: datetime = Field(sa_column=_ts())


class MetaRow(SQLModel, table=True):
    """Schema version, checked at start-up."""

    __tablename__ = "baton_meta"

    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=255)
