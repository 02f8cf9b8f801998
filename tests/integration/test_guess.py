"""The one-round-trip step on PostgreSQL (``tasks.advance.guess``): a cached generator decides
before the run is locked, and the statement that locks it refuses the write unless the run is
where the generator left it and the attempt still open. Driven in-process, on a real
PostgreSQL, so that the other writer can be placed exactly between the guess and its commit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from persistence import recording as rec
from persistence import runtime as rt
from persistence.models import utcnow
from tasks import advance as adv
from tests.conftest import _pg_schema_url
from tests.fixtures.flows import build

ME = "test/1"


@pytest.fixture
def ns(broker_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("BATON_TEST_COUNTER_URL", broker_url)  # the flows' counter; the broker is in memory
    for url in _pg_schema_url():
        built = build("memory://", url, queue="guess")
        yield built
        built.baton.store.engine.dispose()


def _started(ns: Any) -> tuple[Any, str]:
    handle = ns.sequence.start(3)
    adv.advance(ns.baton.runtime, handle.run_id, publisher=ME)  # step 1 decided; the generator is cached
    return handle, rt.task_id(handle.run_id, 1, 0, 1)


def _state(ns: Any, run_id: str) -> tuple[int, list[str], str]:
    store = ns.baton.store
    row = store.get_run(run_id)
    kinds = [e.kind for e in store.events(run_id)]
    task = next(t for t in store.task_rows(run_id) if t.step == 1)
    return row.last_seq, kinds, task.state


def test_a_guess_records_and_decides_in_one_commit(ns: Any) -> None:
    handle, tid = _started(ns)
    assert adv.guess(ns.baton.runtime, tid, "t.add", True, 1, ME, None)
    last, kinds, state = _state(ns, handle.run_id)
    assert kinds[-2:] == ["activity_completed", "step_scheduled"] and state == "done"
    assert last == len(kinds)
    assert [t.step for t in ns.baton.store.task_rows(handle.run_id)] == [1, 2]


def test_a_sleep_after_an_activity_is_decided_and_its_timer_written_in_the_one_commit(ns: Any) -> None:
    handle = ns.nap_after.start(3600)
    adv.advance(ns.baton.runtime, handle.run_id, publisher=ME)
    tid = rt.task_id(handle.run_id, 1, 0, 1)
    assert adv.guess(ns.baton.runtime, tid, "t.add", True, 2, ME, None) is True  # not handed over
    last, kinds, state = _state(ns, handle.run_id)
    assert kinds[-2:] == ["activity_completed", "step_scheduled"] and state == "done" and last == len(kinds)
    timers = ns.baton.store.timer_rows(handle.run_id)
    assert [(t.step, t.kind, t.fired) for t in timers] == [(2, "sleep", False)]
    assert 3590 < (timers[0].fire_at - utcnow()).total_seconds() <= 3600
    assert handle.checkpoint().waiting_on[0]["kind"] == "timer"


def test_a_guess_on_a_run_that_moved_on_writes_nothing(ns: Any) -> None:
    handle, tid = _started(ns)
    handle.cancel("meanwhile")  # another writer appends an input: last_seq is no longer the generator's
    before = _state(ns, handle.run_id)
    assert not adv.guess(ns.baton.runtime, tid, "t.add", True, 1, ME, None)
    assert _state(ns, handle.run_id) == before, "a wrong guess wrote something"
    assert ns.baton.runtime.cache.items.get(handle.run_id) is None, "the generator that guessed was kept"

    def record(conn: Any) -> Any:  # the usual path then sees the cancel and the result in order
        return rec.record_attempt(conn, ns.baton.store, tid, True, 1, utcnow(), ME, None, 0)

    adv.advance(ns.baton.runtime, handle.run_id, before=record, publisher=ME)
    assert handle.status() == "cancelled"


def test_a_guess_for_an_attempt_settled_meanwhile_writes_nothing(ns: Any) -> None:
    handle, tid = _started(ns)
    with ns.baton.store.tx() as conn:  # another process recorded it (a redelivery raced this one)
        conn.execute(sa.text("UPDATE baton_tasks SET state = 'done' WHERE id = :i"), {"i": tid})
    before = _state(ns, handle.run_id)
    assert not adv.guess(ns.baton.runtime, tid, "t.add", True, 1, ME, None)
    assert _state(ns, handle.run_id) == before
    with ns.baton.store.tx() as conn:
        conn.execute(sa.text("UPDATE baton_tasks SET state = 'scheduled' WHERE id = :i"), {"i": tid})
    # the connection's aborted transaction was rolled back: the usual path records on it next

    def record(conn: Any) -> Any:
        return rec.record_attempt(conn, ns.baton.store, tid, True, 1, utcnow(), ME, None, 0)

    adv.advance(ns.baton.runtime, handle.run_id, before=record, publisher=ME)
    last, kinds, state = _state(ns, handle.run_id)
    assert state == "done" and kinds[-2:] == ["activity_completed", "step_scheduled"] and last == before[0] + 2


def _counting_instances(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Run ids of the generators the usual path builds from scratch (each one a full replay)."""
    built: list[str] = []
    real = adv.Instance

    def counted(defn: Any, run_id: str, *args: Any, **kw: Any) -> Any:
        built.append(run_id)
        return real(defn, run_id, *args, **kw)

    monkeypatch.setattr(adv, "Instance", counted)
    return built


def _record(ns: Any, tid: str, after: int) -> Any:
    def record(conn: Any) -> Any:
        return rec.record_attempt(conn, ns.baton.store, tid, True, 1, utcnow(), ME, None, after)
    return record


def test_a_decision_that_is_not_plain_is_handed_to_the_usual_path(ns: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    handle = ns.sequence.start(1)
    adv.advance(ns.baton.runtime, handle.run_id, publisher=ME)
    tid = rt.task_id(handle.run_id, 1, 0, 1)
    before = _state(ns, handle.run_id)
    got = adv.guess(ns.baton.runtime, tid, "t.add", True, 1, ME, None)  # the run would end: not plain
    assert isinstance(got, adv.Guessed) and not got and got.decision.status.value == "completed"
    assert _state(ns, handle.run_id) == before, "a guess that is not plain wrote something"
    built = _counting_instances(monkeypatch)
    adv.advance(ns.baton.runtime, handle.run_id, before=_record(ns, tid, got.seq), publisher=ME, guessed=got)
    assert handle.status() == "completed" and handle.result(timeout=5) == 1
    assert built == [], "the usual path replayed the history instead of committing the generator's decision"
    events = ns.baton.store.events(handle.run_id)
    outcome = next(e for e in events if e.kind == "activity_completed")
    assert outcome.at == got.event.at and [e.kind for e in events][-1] == "completed"


def test_a_handed_over_decision_is_dropped_if_the_run_moved_on(ns: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    handle = ns.sequence.start(1)
    adv.advance(ns.baton.runtime, handle.run_id, publisher=ME)
    tid = rt.task_id(handle.run_id, 1, 0, 1)
    got = adv.guess(ns.baton.runtime, tid, "t.add", True, 1, ME, None)
    assert isinstance(got, adv.Guessed)
    handle.cancel("meanwhile")  # between the guess and the usual path: the generator's decision is stale
    built = _counting_instances(monkeypatch)
    adv.advance(ns.baton.runtime, handle.run_id, before=_record(ns, tid, got.seq), publisher=ME, guessed=got)
    assert handle.status() == "cancelled", "the stale decision (completed) was committed over the cancel"
    assert built == [handle.run_id], "the usual path should have replayed into a new generator"


def _at_signal_wait(ns: Any) -> tuple[Any, str, Any]:
    """A run whose next decision, after its first activity, is to wait for signal "go"."""
    handle = ns.changing.start("guess-signal")
    adv.advance(ns.baton.runtime, handle.run_id, publisher=ME)
    tid = rt.task_id(handle.run_id, 1, 0, 1)
    got = adv.guess(ns.baton.runtime, tid, "t.count", True, 1, ME, None)
    assert isinstance(got, adv.Guessed) and got.empty_inbox, "a signal wait is decided as if no signal came"
    return handle, tid, got


def test_a_signal_wait_decided_before_the_lock_is_committed_if_no_signal_came(
        ns: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    handle, tid, got = _at_signal_wait(ns)
    built = _counting_instances(monkeypatch)
    adv.advance(ns.baton.runtime, handle.run_id, before=_record(ns, tid, got.seq), publisher=ME, guessed=got)
    assert built == [], "the usual path replayed the history instead of committing the generator's decision"
    assert [w["kind"] for w in handle.info()["waiting"]] == ["signal"]
    handle.signal("go", 7)
    adv.advance(ns.baton.runtime, handle.run_id, publisher=ME)
    assert handle.status() == "completed"


def test_a_signal_wait_decided_before_the_lock_is_dropped_if_a_signal_came(
        ns: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    handle, tid, got = _at_signal_wait(ns)
    handle.signal("go", 7)  # between the guess and the usual path: the wait is already answered
    built = _counting_instances(monkeypatch)
    adv.advance(ns.baton.runtime, handle.run_id, before=_record(ns, tid, got.seq), publisher=ME, guessed=got)
    assert built == [handle.run_id], "the usual path should have replayed and read the inbox"
    assert handle.status() == "completed", "the signal that came first was not delivered"
