"""Every ``baton`` subcommand against real runs on real ``celery worker`` subprocesses (Redis + SQLite)."""

from __future__ import annotations

import json
import re

import pytest

from tests.cli.conftest import Baton, fails, ok
from tests.conftest import Cluster, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]


def started_id(stdout: str) -> str:
    match = re.search(r"^started (\S+)$", stdout, re.M)
    assert match, stdout
    return match.group(1)


def waiting_on_signal(cluster: Cluster, run_id: str) -> bool:
    cp = cluster.baton.get(run_id).checkpoint()
    return cp is not None and any(w.get("kind") == "signal" for w in cp.waiting_on)


@pytest.mark.timeout(240)
def test_start_watch_ls_show(cluster: Cluster, baton: Baton) -> None:
    cluster.start_worker()
    out = ok(baton("start", "sequence", "[3]", "--id", "seq-1"))
    assert started_id(out) == "seq-1"
    assert "baton watch seq-1" in out
    assert "already exists" in ok(baton("start", "sequence", "[3]", "--id", "seq-1"))

    watched = ok(baton("watch", "seq-1", "--timeout", "60", "--interval", "0.1"))
    assert "seq-1 completed → 3" in watched

    kw = started_id(ok(baton("start", "fanout", '{"n": 5}')))
    assert kw.startswith("fanout-")
    assert '"sum": 30' in ok(baton("watch", kw, "--timeout", "60"))

    listing = ok(baton("ls"))
    assert re.search(r"seq-1\s+sequence\s+completed\s+3\b", listing), listing
    assert re.search(rf"{kw}\s+fanout\s+completed", listing)
    only = ok(baton("ls", "--workflow", "sequence", "--status", "completed"))
    assert "seq-1" in only and kw not in only
    assert "no runs with status running" in ok(baton("ls", "--status", "running"))
    rows = [json.loads(line) for line in ok(baton("ls", "--json", "--limit", "1")).splitlines()]
    assert len(rows) == 1 and rows[0]["id"] == kw and rows[0]["status"] == "completed"

    shown = ok(baton("show", "seq-1"))
    assert re.search(r"status\s+completed", shown)
    assert re.search(r"position\s+tests/fixtures/flows\.py:\d+ in sequence", shown), shown
    assert "total = yield add.s(total, 1)" in shown  # the source line of the position
    assert re.search(r"^ total\s+2\s*$", shown, re.M), shown  # locals at the last yield
    assert re.search(r"result\s+3", shown)
    for kind in ("started", "step_scheduled", "activity_completed", "completed"):
        assert kind in shown
    assert "t.add → 3" in shown
    as_json = json.loads(ok(baton("show", "seq-1", "--json")))
    assert as_json["result"] == 3 and as_json["step"] == 3
    assert [e["kind"] for e in as_json["history"]][-1] == "completed"

    fan = ok(baton("show", kw, "--all"))
    assert re.search(r"activity_completed x5\s+5 x t\.square", fan), fan


@pytest.mark.timeout(240)
def test_signal_waiting_run_then_cancel(cluster: Cluster, baton: Baton) -> None:
    cluster.start_worker()
    ok(baton("start", "waits", "[2]", "--id", "sig-1"))
    wait_for(lambda: waiting_on_signal(cluster, "sig-1"), 60, "sig-1 to wait on its signal")
    shown = ok(baton("show", "sig-1"))
    assert re.search(r"status\s+running", shown)
    assert re.search(r"waiting on\s+signal 'msg'", shown), shown
    assert 'got.append((yield wait_signal("msg", timeout=timeout)))' in shown
    listing = ok(baton("ls", "--status", "running"))
    assert re.search(r"sig-1\s+waits\s+running\s+1\s+signal 'msg'", listing), listing

    assert "sent signal 'msg' to sig-1" in ok(baton("signal", "sig-1", "msg", '"first"'))
    ok(baton("signal", "sig-1", "msg", '{"n": 2}'))
    assert '["first", {"n": 2}]' in ok(baton("watch", "sig-1", "--timeout", "60"))

    ok(baton("start", "cancellable", '["c-key", "sleep"]', "--id", "can-1"))
    wait_for(lambda: (cluster.baton.get("can-1").checkpoint() or None) is not None, 60, "can-1 to reach its sleep")
    out = ok(baton("cancel", "can-1", "--reason", "changed my mind", "--wait", "--timeout", "60"))
    assert "cancel requested for can-1" in out and "can-1 cancelled" in out
    assert cluster.baton.get("can-1").status() == "cancelled"
    fails(baton("cancel", "can-1"), "run can-1 has already ended (cancelled)")
    fails(baton("watch", "can-1"), "run can-1 cancelled", "changed my mind")
    fails(baton("signal", "can-1", "msg", "1"), "can-1", "ended")


@pytest.mark.timeout(240)
def test_fork_and_resume(cluster: Cluster, baton: Baton) -> None:
    cluster.start_worker()
    ok(baton("start", "sequence", "[4]", "--id", "orig"))
    ok(baton("watch", "orig", "--timeout", "60"))
    out = ok(baton("fork", "orig", "--at", "2", "--id", "orig-b"))
    assert "forked orig at step 2 as orig-b" in out
    assert "orig-b completed → 4" in ok(baton("watch", "orig-b", "--timeout", "60"))
    shown = ok(baton("show", "orig-b"))
    assert re.search(r"forked from\s+orig at step 2", shown)
    generated = re.search(r"as (\S+)$", ok(baton("fork", "orig", "--at", "0")), re.M)
    assert generated and generated.group(1).startswith("orig-fork0-")
    fails(baton("fork", "orig", "--at", "9"), "cannot fork run 'orig' at step 9")

    ok(baton("start", "waits", "[1]", "--id", "live"))
    wait_for(lambda: waiting_on_signal(cluster, "live"), 60, "live to wait")
    assert "resumed live (running)" in ok(baton("resume", "live"))
    fails(baton("resume", "orig"), "run 'orig' has ended (completed)")


@pytest.mark.timeout(300)
def test_blocked_run_shows_why_and_resumes_after_the_fix(cluster: Cluster, baton: Baton) -> None:
    v1 = cluster.start_worker()
    ok(baton("start", "changing", '["blk"]', "--id", "blk"))
    wait_for(lambda: waiting_on_signal(cluster, "blk"), 60, "blk to wait on 'go'")
    cluster.kill(v1)
    v2 = cluster.start_worker(BATON_TEST_CODE="v2")  # a deploy that changed the workflow without patched()
    ok(baton("signal", "blk", "go", "5"))
    wait_for(lambda: cluster.baton.get("blk").status() == "blocked", 60, "blk to be blocked")
    shown = ok(baton("show", "blk"))
    assert re.search(r"status\s+blocked", shown)
    assert "NonDeterminismError" in shown
    fails(baton("watch", "blk", "--timeout", "30"), "run blk blocked", "NonDeterminismError")
    assert re.search(r"blk\s+changing\s+blocked", ok(baton("ls", "--status", "blocked")))

    cluster.kill(v2)
    cluster.start_worker()  # the fix: the original code again
    assert "resumed blk" in ok(baton("resume", "blk"))
    assert "blk completed → [1, 5]" in ok(baton("watch", "blk", "--timeout", "60"))
