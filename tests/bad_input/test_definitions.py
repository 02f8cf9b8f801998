"""Bad definitions: refused when the module is imported, naming the function and the fix."""

from __future__ import annotations

from typing import Any

import pytest

from sdk import DefinitionError, WorkflowNotFound
from tests.bad_input.conftest import one_line_error
from tests.chaos.flows_chaos import NS

pytestmark = pytest.mark.bad_input


def test_non_generator_function_is_refused(offline: NS) -> None:
    def plain(x: int) -> int:
        return x

    with pytest.raises(DefinitionError) as err:
        offline.baton.workflow(plain)
    assert "plain" in str(err.value) and "generator" in str(err.value)
    assert "yield task.s(...)" in str(err.value), "the message should show how to write a step"
    assert "plain" not in offline.baton.workflows


def test_async_functions_are_refused(offline: NS) -> None:
    async def coroutine() -> None:
        return None

    async def async_gen():  # type: ignore[no-untyped-def]
        yield 1

    for fn in (coroutine, async_gen):
        with pytest.raises(DefinitionError, match=fn.__name__):
            offline.baton.workflow(fn)


def test_duplicate_workflow_name_is_refused(offline: NS) -> None:
    def seq():  # type: ignore[no-untyped-def]
        yield offline.add.s(1, 2)

    with pytest.raises(DefinitionError) as err:
        offline.baton.workflow(seq)
    assert "'seq' is already registered" in str(err.value) and "name=" in str(err.value)
    assert offline.baton.workflows["seq"] is offline.seq, "the original registration was replaced"


def test_unknown_workflow_name_names_the_registered_ones(offline: NS) -> None:
    with pytest.raises(WorkflowNotFound) as err:
        offline.baton.definition("no_such_flow")
    text = str(err.value)
    assert "'no_such_flow'" in text and "seq" in text and "import the module" in text


def test_unknown_workflow_at_start_on_the_cli(cli: Any, offline: NS) -> None:
    line = one_line_error(*cli("start", "no_such_flow", "[1]"), "no_such_flow", "registered")
    assert "seq" in line
    assert offline.baton.store.count_runs() == {}, "a run was stored for an unknown workflow"
