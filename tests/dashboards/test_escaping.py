"""Nothing from a run is rendered unescaped (issue 5, acceptance 2), on real and on crafted runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, update
from tornado.escape import xhtml_escape

from persistence.store import checkpoints_t, runs
from sdk import serde
from tests.conftest import Cluster, wait_for
from tests.dashboards.support import Session, api_path, dashboard, run_path

pytestmark = pytest.mark.timeout(120)

SCRIPT = "<script>alert('xss')</script>"
IMG = "<img src=x onerror=alert(1)>"  # valid as a workflow id: no '/', '@' or ':'


def _assert_inert(html: str, where: str) -> None:
    """No markup we did not write: only our own script tag, and none of the payloads raw."""
    assert "<script>alert" not in html and "<img src=x" not in html and "<b>evil" not in html, where
    assert re.findall(r"<script\b[^>]*>", html) == [re.search(r'<script src="[^"]*baton\.js" defer>', html)
                                                    .group(0)], where  # type: ignore[union-attr]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_real_run_with_script_in_locals_and_id(cluster: Cluster) -> None:
    cluster.start_worker()
    run = cluster.ns.slow_sequence.start(2, 0.01, SCRIPT, workflow_id=IMG)
    assert run.result(timeout=30) == [0, 1]
    waiting = cluster.ns.waits.start(1, workflow_id="esc-wait")
    wait_for(lambda: waiting.info()["waiting"], 30, "the run to wait for a signal")
    waiting.signal("msg", {"html": SCRIPT})
    assert waiting.result(timeout=30) == [{"html": SCRIPT}]
    assert run.checkpoint().locals["key"] == SCRIPT  # type: ignore[union-attr]

    with dashboard(cluster.baton) as srv:
        c = Session(srv.url)
        pages = {
            "list": c.get("/"),
            "run": c.get(run_path(IMG)),
            "step 1": c.get(run_path(IMG, "?step=1")),
            "signal": c.get(run_path("esc-wait")),
            "search": c.get("/?search=" + "%3Cscript%3Ealert(1)%3C%2Fscript%3E"),
            "404": c.get(run_path(SCRIPT.replace("/", ""))),
        }
        for where, resp in pages.items():
            _assert_inert(resp.text, where)
        assert "&lt;script&gt;alert(&#x27;xss&#x27;)&lt;/script&gt;" in pages["run"].text
        assert "&lt;img src=x onerror=alert(1)&gt;" in pages["list"].text
        assert 'href="/runs/%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E"' in pages["list"].text
        assert pages["404"].status == 404
        # The JSON API carries the raw values (JSON, served as application/json with nosniff).
        api = c.get(api_path(IMG))
        assert api.headers["Content-Type"].startswith("application/json")
        assert api.headers["X-Content-Type-Options"] == "nosniff"
        assert api.json()["run"]["locals"]["key"] == SCRIPT


def test_crafted_run_every_field_escaped(offline_baton: Any, tmp_path: Path) -> None:
    """A run whose args, result, error, locals, position and source all hold markup."""
    source = tmp_path / "evil_flow.py"
    source.write_text(f"def flow():\n    x = yield '{SCRIPT}'\n    return x\n")
    run = offline_baton.ns_idle.start({"arg": SCRIPT}, workflow_id="crafted")
    store = offline_baton.store
    position = {"file": str(source), "line": 2, "function": "<b>evil</b>"}
    error = {"type": "<b>evil</b>", "message": SCRIPT, "traceback": f"Traceback\n  {IMG}\n"}
    with store.tx() as conn:
        conn.execute(update(runs).where(runs.c.run_id == run.run_id).values(
            status="failed", step=1, error=serde.dumps(error, "e"), position=serde.dumps(position, "p"),
            locals=serde.dumps({SCRIPT: IMG, "html": "<b>evil</b>"}, "l"),
            waiting=serde.dumps([{"kind": "signal", "name": SCRIPT}], "w")))
        conn.execute(insert(checkpoints_t).values(
            run_id=run.run_id, step=1, file=str(source), line=2, function="<b>evil</b>",
            locals_delta=serde.dumps({"full": True, "set": {SCRIPT: IMG}, "unset": []}, "d"),
            waiting=serde.dumps([{"kind": "signal", "name": SCRIPT}], "w"), at=run.info()["created_at"]))
    with dashboard(offline_baton) as srv:
        c = Session(srv.url)
        for path in (run_path("crafted"), run_path("crafted", "?step=1"), "/", "/?workflow=" + SCRIPT):
            resp = c.get(path)
            assert resp.status == 200, path
            _assert_inert(resp.text, path)
        page = c.get(run_path("crafted")).text
        assert "&lt;b&gt;evil&lt;/b&gt;" in page  # error type, function name
        assert xhtml_escape(f"x = yield '{SCRIPT}'") in page  # the source line, escaped
        assert 'class="hl"' in page  # ... and highlighted
