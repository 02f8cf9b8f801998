"""The public surface, pinned: a change here is an API change, reviewed as one."""

from __future__ import annotations

import sdk

EXPECTED = [
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


def test_all_is_pinned():
    assert sdk.__all__ == EXPECTED


def test_every_export_exists_and_nothing_public_is_left_out():
    for name in sdk.__all__:
        assert getattr(sdk, name) is not None, name
    star: dict = {}
    exec("from sdk import *", star)
    assert set(star) - {"__builtins__"} == set(EXPECTED)


def test_run_status_values_are_the_stored_strings():
    assert {s.value for s in sdk.RunStatus} == {"running", "completed", "failed", "cancelled", "blocked",
                                                 "continued"}
    assert sdk.RunStatus("blocked") is sdk.RunStatus.BLOCKED
    assert not sdk.RunStatus.BLOCKED.terminal and sdk.RunStatus.CONTINUED.terminal
