"""The JSON API and /metrics against real runs on real workers (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Cluster, wait_for
from tests.dashboards.support import Session, api_path, dashboard, run_path, xsrf_field

pytestmark = pytest.mark.timeout(150)

FLOWER = "http://flower.example:5555"


def _wait_waiting(run: Any, name: str) -> None:
    wait_for(lambda: any(w.get("name") == name for w in run.info()["waiting"]), 30, f"{run.id} to wait on {name}")


def test_api_mirrors_runs_steps_and_actions(cluster: Cluster) -> None:
    cluster.start_worker()
    ns = cluster.ns
    seq = ns.sequence.start(3, workflow_id="api-seq")
    par = ns.parent.start(2, workflow_id="api-parent")
    retry = ns.retries.start("api-retry-" + cluster.queue, 1, workflow_id="api-retry")
    waiting = ns.waits.start(1, workflow_id="api-wait")
    failing = ns.fails.start(workflow_id="api-fail")
    fan = ns.fanout.start(60, workflow_id="api-fan")
    loop = ns.looper.start(7, workflow_id="api-loop")  # continue_as_new after 5 steps: api-loop, api-loop@2
    assert seq.result(timeout=60) == 3
    assert fan.result(timeout=60)["n"] == 60
    assert loop.result(timeout=60) == sum(range(7))
    par.result(timeout=60)
    assert retry.result(timeout=60) == 2
    _wait_waiting(waiting, "msg")
    wait_for(lambda: failing.status() == "failed", 30, "the failing run to fail")

    with dashboard(cluster.baton, flower_url=FLOWER) as srv:
        c = Session(srv.url)
        # ---- list: counts, filters, search, paging
        everything = c.get("/api/runs?limit=100").json()
        assert everything["counts"]["running"] == 1 and everything["counts"]["failed"] >= 1
        assert everything["all"] == sum(everything["counts"].values()) == len(everything["runs"])
        done = c.get("/api/runs?status=completed&limit=100").json()
        assert {r["status"] for r in done["runs"]} == {"completed"} and done["total"] == done["counts"]["completed"]
        assert [r["id"] for r in c.get("/api/runs?workflow=waits").json()["runs"]] == ["api-wait"]
        found = c.get("/api/runs?search=api-parent").json()
        assert {r["id"] for r in found["runs"]} >= {"api-parent", "api-parent/1", "api-parent/2.0"}
        page1 = c.get("/api/runs?limit=2&offset=0").json()
        page2 = c.get("/api/runs?limit=2&offset=2").json()
        assert len(page1["runs"]) == 2 and not {r["id"] for r in page1["runs"]} & {r["id"] for r in page2["runs"]}
        assert "sequence" in everything["workflows"] and "waits" in everything["workflows"]

        # ---- one run: timeline, attempts with Flower links, position and source
        d = c.get(api_path("api-seq")).json()
        assert d["run"]["status"] == "completed" and d["run"]["result"] == 3 and d["run"]["args"] == [3]
        assert [s["step"] for s in d["steps"]] == [1, 2, 3]
        assert all(s["state"] == "done" and s["duration"] is not None for s in d["steps"])
        attempt = d["steps"][0]["slots"][0]["attempts"][0]
        assert attempt["task_id"] == "api-seq:1:0:1" and attempt["state"] == "done"
        assert attempt["flower"] == f"{FLOWER}/task/api-seq%3A1%3A0%3A1"
        assert d["source"]["lines"] and any(ln["current"] and "yield" in ln["text"] for ln in d["source"]["lines"])

        r = c.get(api_path("api-retry")).json()
        slot = r["steps"][0]["slots"][0]
        assert [a["state"] for a in slot["attempts"]] == ["failed", "done"]
        assert slot["retries"][0]["attempt"] == 2 and slot["retries"][0]["after"] == "RuntimeError"

        p = c.get(api_path("api-parent")).json()
        assert {ch["id"] for ch in p["children"]} == {"api-parent/1", "api-parent/2.0", "api-parent/2.1",
                                                       "api-parent/3"}
        assert p["steps"][0]["slots"][0]["child"] == "api-parent/1"
        child = c.get(api_path("api-parent/1")).json()
        assert child["run"]["parent_run_id"] == "api-parent"

        # a continue-as-new chain: each link keeps its own page, steps and locals
        first = c.get(api_path("api-loop")).json()
        assert first["run"]["status"] == "continued" and first["run"]["next_run_id"] == "api-loop@2"
        assert [s["locals"]["i"] for s in c.get(api_path("api-loop", "/steps")).json()["steps"]] == [0, 1, 2, 3, 4]
        second = c.get(api_path("api-loop@2")).json()
        assert second["run"]["status"] == "completed" and second["run"]["previous_run_id"] == "api-loop"
        assert [s["locals"]["i"] for s in c.get(api_path("api-loop@2", "/steps")).json()["steps"]] == [5, 6]
        first_page = c.get(run_path("api-loop")).text
        assert 'id="next-run-link" href="/runs/api-loop%402"' in first_page and 'id="fork-form"' not in first_page

        f = c.get(api_path("api-fail")).json()
        assert f["run"]["error"]["type"] == "ActivityError" and "kaput" in f["run"]["error"]["message"]
        assert f["steps"][-1]["state"] == "failed"

        # ---- steps: locals at every step, and one step with its source
        steps = c.get(api_path("api-seq", "/steps")).json()["steps"]
        assert [s["locals"]["total"] for s in steps] == [0, 1, 2]
        one = c.get(api_path("api-seq", "/steps/2")).json()
        assert one["step"] == 2 and one["locals"]["total"] == 1 and one["latest"] is False
        assert one["source"]["line"] == one["position"]["line"]
        assert c.get(api_path("api-seq", "/steps/9")).status == 404
        kinds = [e["kind"] for e in c.get(api_path("api-seq", "/history")).json()["events"]]
        assert kinds[0] == "started" and kinds[-1] == "completed"
        assert c.get(api_path("no-such-run")).status == 404

        # ---- actions through the API
        ver = c.get(api_path("api-wait", "/version")).json()
        assert ver["active"] is True
        sent = c.post(api_path("api-wait", "/signal"), body={"name": "msg", "payload": {"ok": True}})
        assert sent.status == 200, sent.text
        assert waiting.result(timeout=30) == [{"ok": True}]
        assert c.get(api_path("api-wait", "/version")).json()["version"] != ver["version"]
        bad = c.post(api_path("api-wait", "/resume"), body={})
        assert bad.status == 400 and "ended" in bad.json()["error"]
        assert c.post(api_path("api-seq", "/signal"), body={"payload": 1}).status == 400
        forked = c.post(api_path("api-seq", "/fork"), body={"at_step": 2, "new_id": "api-seq-fork"})
        assert forked.status == 200 and forked.json()["id"] == "api-seq-fork"
        assert cluster.baton.get("api-seq-fork").result(timeout=30) == 3
        assert c.get(api_path("api-seq-fork")).json()["run"]["forked_from"] == "api-seq"
        sleeper = cluster.ns.cancellable.start("api-cancel-" + cluster.queue, "sleep", workflow_id="api-cancel")
        wait_for(lambda: sleeper.info()["step"] >= 1, 30, "the cancellable run to sleep")
        assert c.post(api_path("api-cancel", "/cancel"), body={"reason": "test"}).json()["ok"] is True
        wait_for(lambda: sleeper.status() == "cancelled", 30, "the run to be cancelled")

        # ---- pages render for every kind of run
        for rid in ("api-seq", "api-parent", "api-parent/2.1", "api-retry", "api-wait", "api-fail", "api-cancel"):
            resp = c.get(run_path(rid))
            assert resp.status == 200, rid
            assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert 'href="http://flower.example:5555/task/api-seq%3A1%3A0%3A1"' in c.get(run_path("api-seq")).text
        fan_page = c.get(run_path("api-fan")).text  # a wide fan-out: 50 slots on the page, all in the API
        assert fan_page.count('class="slot" id="slot-1-') == 50 and "10 more slots" in fan_page
        assert len(c.get(api_path("api-fan")).json()["steps"][0]["slots"]) == 60

        # ---- metrics
        text = c.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    runs = {s.labels["status"]: s.value for s in families["baton_runs"].samples}
    assert runs["completed"] >= 10 and runs["continued"] == 1 and runs["failed"] >= 1 and runs["cancelled"] == 1
    started = {s.labels["task"]: s.value for s in families["baton_steps_started"].samples
               if s.name == "baton_steps_started_total"}
    failed = {s.labels["task"]: s.value for s in families["baton_steps_failed"].samples
              if s.name == "baton_steps_failed_total"}
    assert started["t.add"] >= 3 + 5 and failed["t.flaky"] == 1 and failed["t.boom"] >= 2
    hist = [s for s in families["baton_step_latency_seconds"].samples if s.labels.get("task") == "t.add"]
    count = next(s.value for s in hist if s.name.endswith("_count"))
    inf = next(s.value for s in hist if s.name.endswith("_bucket") and s.labels["le"] == "+Inf")
    assert count == inf == started["t.add"]
    buckets = [s.value for s in hist if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets), "histogram buckets must be cumulative"
    total = next(s.value for s in hist if s.name.endswith("_sum"))
    assert 0 < total < 60 * count
    assert families["baton_sweeper_recoveries"].samples[0].value == 0
    assert families["baton_workers_alive"].samples[0].value >= 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_blocked_run_shows_and_resumes_from_the_page(cluster: Cluster) -> None:
    key = "api-block-" + cluster.queue
    v1 = cluster.start_worker()
    run = cluster.ns.changing.start(key, workflow_id="api-block")
    _wait_waiting(run, "go")
    cluster.kill(v1)
    v2 = cluster.start_worker(BATON_TEST_CODE="v2")  # a code change without patched(): replay diverges
    run.signal("go", "yes")
    wait_for(lambda: run.status() == "blocked", 30, "the run to block on the changed code")
    with dashboard(cluster.baton) as srv:
        c = Session(srv.url)
        page = c.get(run_path("api-block"))
        assert 'id="resume-form"' in page.text and 'id="signal-form"' in page.text
        assert "NonDeterminismError" in page.text
        cluster.kill(v2)
        cluster.start_worker()  # the code is fixed (back to v1)
        resumed = c.post(run_path("api-block", "/resume"), form={"_xsrf": xsrf_field(page.text)})
        assert resumed.status == 302 and resumed.headers["Location"] == run_path("api-block")
        assert run.result(timeout=30) == [1, "yes"]
        done = c.get(run_path("api-block"))
        assert "resumed" in done.text and 'id="resume-form"' not in done.text
