"""Every error the ``baton`` command reports: one line on stderr, exit code 1, no traceback unless --debug."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cli.conftest import APP, Baton, fails, ok, run_cli
from tests.conftest import Cluster, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.bad_input,
              pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]


@pytest.mark.timeout(300)
def test_app_errors(cluster: Cluster, baton: Baton, tmp_path: Path) -> None:
    env = cluster.env()
    env.pop("BATON_APP", None)
    fails(run_cli(["ls"], env), "no app given", "-A", "BATON_APP")
    fails(baton("ls", app="no_such_module"), "cannot load app 'no_such_module'", "no module named 'no_such_module'")
    fails(baton("ls", app="tests.fixtures.no_such"), "no module named 'tests.fixtures.no_such'")
    fails(baton("ls", app="tests.fixtures.worker_app:nope"), "module tests.fixtures.worker_app has no attribute 'nope'")
    fails(baton("ls", app="json"), "module json defines no Baton", "baton = Baton(app)")
    (tmp_path / "broken_app.py").write_text("import no_such_dependency\n")
    (tmp_path / "raising_app.py").write_text("raise RuntimeError('bad config')\n")
    fails(run_cli(["-A", "broken_app", "ls"], env, cwd=tmp_path), "importing broken_app failed",
          "no_such_dependency")
    fails(run_cli(["-A", "raising_app", "ls"], env, cwd=tmp_path), "RuntimeError: bad config")
    # BATON_APP works like -A, and -A may name the Baton itself or the module alone.
    assert "no runs" in ok(run_cli(["ls"], {**env, "BATON_APP": APP}))
    assert "no runs" in ok(baton("ls", app="tests.fixtures.worker_app:baton"))
    assert "no runs" in ok(baton("ls", app="tests.fixtures.worker_app"))


@pytest.mark.timeout(300)
def test_run_and_input_errors(cluster: Cluster, baton: Baton) -> None:
    for command in (["show", "ghost"], ["watch", "ghost"], ["signal", "ghost", "go"], ["cancel", "ghost"],
                    ["fork", "ghost", "--at", "1"], ["resume", "ghost"]):
        fails(baton(*command), "no run with id 'ghost'")
    fails(baton("start", "no_such_workflow"), "no workflow named 'no_such_workflow'", "sequence")
    fails(baton("start", "sequence", "[1,"), "ARGS is not valid JSON", "'[1,'")
    fails(baton("start", "sequence", '["x", 1, 2, 3]'), "workflow 'sequence'")
    fails(baton("start", "sequence", "[1]", "--id", "a/b"), "workflow_id 'a/b'")
    fails(baton("ls", "--status", "sideways"), "unknown status 'sideways'")

    cluster.start_worker()
    ok(baton("start", "waits", "[1]", "--id", "w"))
    fails(baton("signal", "w", "msg", "{oops}"), "the signal payload is not valid JSON")
    fails(baton("start", "fanout", "[1]", "--id", "w"), "workflow id 'w' already belongs to a run of 'waits'")
    wait_for(lambda: cluster.baton.get("w").checkpoint() is not None, 60, "w to start")
    ok(baton("signal", "w", "msg"))  # no payload: null
    assert "w completed → [null]" in ok(baton("watch", "w", "--timeout", "60"))
    ok(baton("start", "waits", "[1]", "--id", "slow"))
    fails(baton("watch", "slow", "--timeout", "1"), "run slow still running", "baton watch slow")


@pytest.mark.timeout(120)
def test_usage_errors_exit_2_and_debug_shows_the_traceback(cluster: Cluster, baton: Baton) -> None:
    usage = baton("fork", "x")  # --at is required
    assert usage.returncode == 2 and "--at" in usage.stderr
    assert baton("frobnicate").returncode == 2
    debug = baton("--debug", "show", "ghost")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "WorkflowNotFound" in debug.stderr
    helped = ok(baton("--help", app=None))
    for command in ("demo", "start", "ls", "show", "watch", "signal", "cancel", "fork", "resume", "dashboard",
                    "flower"):
        assert re.search(rf"^\W*{command}\s", helped, re.M), command
