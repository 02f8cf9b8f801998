"""The workflow dashboard in headless Chromium, serving real runs from real workers (issue 5, acceptance 1-3)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from dashboards.model import quote_id
from tests.conftest import Cluster, wait_for
from tests.dashboards.support import dashboard

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

FLOWER = "http://127.0.0.1:5555"
XSS = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"


def _ids(page: Page) -> list[str]:
    return [str(r.get_attribute("data-id")) for r in page.locator("#runs tr.run").all()]


def _statuses(page: Page) -> set[str]:
    return {str(r.get_attribute("data-status")) for r in page.locator("#runs tr.run").all()}


def _local(page: Page, name: str) -> str:
    return page.locator(f'#locals tr[data-name="{name}"] pre').inner_text()


def _live_status(page: Page, run: Any, status: str) -> None:
    """The run reaches ``status`` in the store, then the open page shows it without being reloaded by us."""
    wait_for(lambda: run.status() == status, 45, f"run {run.id} to be {status} in the store")
    try:
        expect(page.locator("#run-status")).to_have_text(status, timeout=15_000)
    except AssertionError as exc:
        state = page.evaluate("""async () => { const l = document.getElementById('live');
          const polled = l ? await (await fetch(l.dataset.poll)).text() : null;
          const el = document.activeElement;
          return {shown: l && l.dataset.version, polled: polled,
                  note_hidden: document.getElementById('refresh-note').hidden,
                  focus: el && (el.tagName + '#' + el.id)}; }""")
        raise AssertionError(f"the page did not refresh itself to {status!r}: {state}") from exc


def _watch_for_script(page: Page) -> list[str]:
    fired: list[str] = []
    page.on("dialog", lambda d: (fired.append(d.message), d.dismiss()))
    return fired


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_list_filters_timeline_past_locals_and_fork(cluster: Cluster, browser: Any,
                                                    shot: Callable[[Any, str], Any]) -> None:
    cluster.start_worker()
    ns = cluster.ns
    seq = ns.sequence.start(3, workflow_id="br-seq")
    failed = ns.fails.start(workflow_id="br-fail")
    waiting = ns.waits.start(1, workflow_id="br-wait")
    xss = ns.slow_sequence.start(2, 0.01, XSS, workflow_id="br-xss")
    parent = ns.parent.start(1, workflow_id="br-parent")
    retry = ns.retries.start("br-retry-" + cluster.queue, 1, workflow_id="br-retry")
    sleeper = ns.sleeper.start(0.2, workflow_id="br-sleep")
    for run in (seq, xss, parent, retry, sleeper):
        run.result(timeout=60)
    wait_for(lambda: failed.status() == "failed", 30, "br-fail to fail")
    wait_for(lambda: waiting.info()["waiting"], 30, "br-wait to wait")

    with dashboard(cluster.baton, flower_url=FLOWER) as srv:
        page = browser.new_page()
        fired = _watch_for_script(page)
        page.goto(srv.url + "/")
        expect(page.locator("h1")).to_have_text("Runs")
        expect(page.locator('#counts a[data-status="running"] b')).to_have_text("1")
        assert int(page.locator('#counts a[data-status="failed"] b').inner_text()) == 2  # br-fail, br-parent/3
        assert {"br-seq", "br-fail", "br-wait", "br-xss", "br-parent", "br-parent/1"} <= set(_ids(page))
        shot(page, "runs-list")

        # ---- filters: status, workflow, search, paging
        page.select_option("#f-status", "failed")
        page.click("#f-apply")
        page.wait_for_url("**status=failed**")
        assert _statuses(page) == {"failed"} and set(_ids(page)) == {"br-fail", "br-parent/3"}
        shot(page, "filter-failed")
        page.select_option("#f-status", "")
        page.select_option("#f-workflow", "waits")
        page.click("#f-apply")
        page.wait_for_url("**workflow=waits**")
        assert _ids(page) == ["br-wait"]
        page.select_option("#f-workflow", "")
        page.fill("#f-search", "br-parent")
        page.click("#f-apply")
        page.wait_for_url("**search=br-parent**")
        assert set(_ids(page)) == {"br-parent", "br-parent/1", "br-parent/2", "br-parent/3"}
        page.goto(srv.url + "/?limit=3")
        first_page = _ids(page)
        assert len(first_page) == 3
        page.click("#next")
        page.wait_for_url("**offset=3**")
        second_page = _ids(page)
        assert second_page and not set(first_page) & set(second_page)
        expect(page.locator("#prev")).to_be_visible()

        # ---- run page: timeline, Flower links, current position with source, locals
        page.goto(srv.url + "/?search=br-seq")
        page.click('#runs a.run-link:text-is("br-seq")')
        page.wait_for_url("**/runs/br-seq")
        expect(page.locator("#run-status")).to_have_text("completed")
        expect(page.locator("#run-result")).to_have_text("3")
        steps = page.locator("#timeline tr.step")
        expect(steps).to_have_count(3)
        assert [s.get_attribute("data-step") for s in steps.all()] == ["1", "2", "3"]
        assert all("st-done" in str(s.get_attribute("class")) for s in steps.all())
        links = [a.get_attribute("href") for a in page.locator("#timeline a.flower-link").all()]
        assert links == [f"{FLOWER}/task/{quote_id(f'br-seq:{n}:0:1')}" for n in (1, 2, 3)]
        assert page.locator("#timeline svg.bar rect").count() == 3
        expect(page.locator("#chosen-step")).to_have_attribute("data-step", "3")
        highlighted = page.locator("#source .hl")
        expect(highlighted).to_have_count(1)
        assert "yield add.s(total, 1)" in highlighted.inner_text()
        assert _local(page, "total") == "2" and _local(page, "n") == "3"
        shot(page, "run-timeline")

        # ---- pick a past step: the select, then a timeline link
        page.select_option("#step-select", "1")
        page.click("#step-show")
        expect(page.locator("#chosen-step")).to_have_attribute("data-step", "1")
        assert _local(page, "total") == "0"
        assert "chosen" in str(page.locator("#step-1").get_attribute("class"))
        shot(page, "past-step-1")
        page.click("#step-2 a.pick")
        expect(page.locator("#chosen-step")).to_have_attribute("data-step", "2")
        assert _local(page, "total") == "1"

        # ---- fork at this step (2): a new run replays steps 1-2 and finishes; the page refreshes itself
        expect(page.locator("#fork-step")).to_have_value("2")
        page.click("#fork-send")
        page.wait_for_url("**/runs/br-seq-fork2-*")
        expect(page.locator("#flash")).to_contain_text("forked at step 2")
        expect(page.locator("#run-links")).to_contain_text("forked from br-seq at step 2")
        _live_status(page, cluster.baton.get(page.url.rsplit("/", 1)[1]), "completed")
        expect(page.locator("#run-result")).to_have_text("3")
        shot(page, "forked-run")

        # ---- retries, timers, children and parent links
        page.goto(srv.url + "/runs/br-retry")
        attempts = page.locator("#slot-1-0 li.attempt")
        expect(attempts).to_have_count(2)
        assert [a.get_attribute("class") for a in attempts.all()] == ["attempt a-failed", "attempt a-done"]
        expect(page.locator("#slot-1-0 .retry")).to_contain_text("after RuntimeError")
        page.goto(srv.url + "/runs/br-sleep")
        expect(page.locator("#timers tbody tr")).to_have_count(1)
        expect(page.locator("#timers .timer-state")).to_have_text("fired")
        expect(page.locator("#step-2")).to_contain_text("timer:sleep")
        page.goto(srv.url + "/runs/br-parent")
        expect(page.locator("#children a.child-link")).to_have_count(3)
        page.click('#timeline a.child-link:text-is("br-parent/1")')
        page.wait_for_url("**/runs/br-parent%2F1")
        expect(page.locator("#run-id")).to_contain_text("br-parent/1")
        page.click("#parent-link")
        page.wait_for_url("**/runs/br-parent")
        shot(page, "parent-run")

        # ---- acceptance 2: <script> in locals is shown as text and never runs
        page.goto(srv.url + "/runs/br-xss")
        expect(page.locator("#run-status")).to_have_text("completed")
        shown = json.dumps(XSS)  # values are shown as JSON text
        assert _local(page, "key") == shown
        assert shown in page.locator("#run-args").inner_text()
        page.select_option("#step-select", "1")
        page.click("#step-show")
        assert _local(page, "key") == shown
        page.goto(srv.url + "/?search=br-xss")
        assert page.evaluate("window.__pwned") is None and fired == []
        shot(page, "script-in-locals")
        page.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_signal_form_resumes_waiting_run_and_cancel_works(cluster: Cluster, browser: Any,
                                                          shot: Callable[[Any, str], Any]) -> None:
    cluster.start_worker()
    key = "br-cancel-" + cluster.queue
    waiting = cluster.ns.waits.start(1, workflow_id="br-signal")
    sleeping = cluster.ns.cancellable.start(key, "sleep", workflow_id="br-cancel")
    wait_for(lambda: waiting.info()["waiting"], 30, "br-signal to wait for its signal")
    wait_for(lambda: sleeping.info()["waiting"], 30, "br-cancel to sleep")

    with dashboard(cluster.baton) as srv:
        page = browser.new_page()
        page.goto(srv.url + "/runs/br-signal")
        expect(page.locator("#run-status")).to_have_text("running")
        expect(page.locator("#run-waiting")).to_contain_text("signal msg")
        expect(page.locator("#timeline tr.step.current")).to_have_count(1)
        expect(page.locator("#signal-name")).to_have_value("msg")  # prefilled from what the run waits on
        page.fill("#signal-payload", '{"approved": true, "by": "<b>reviewer</b>"}')
        shot(page, "signal-form")
        page.click("#signal-send")
        page.wait_for_url("**/runs/br-signal")
        expect(page.locator("#flash")).to_have_text("signal 'msg' sent")
        _live_status(page, waiting, "completed")
        expect(page.locator("#run-result")).to_contain_text('"approved": true')
        expect(page.locator("#run-result")).to_contain_text("<b>reviewer</b>")
        expect(page.locator("#signals tbody")).to_contain_text("msg")
        assert waiting.result(timeout=5) == [{"approved": True, "by": "<b>reviewer</b>"}]
        shot(page, "signal-completed")

        page.goto(srv.url + "/runs/br-cancel")
        expect(page.locator("#run-status")).to_have_text("running")
        page.fill("#cancel-reason", "not needed any more")
        page.click("#cancel-send")
        page.wait_for_url("**/runs/br-cancel")
        expect(page.locator("#flash")).to_have_text("cancellation requested")
        _live_status(page, sleeping, "cancelled")
        expect(page.locator("#run-error")).to_contain_text("not needed any more")
        expect(page.locator("#step-1 .badge")).to_have_text("cancelled")  # the sleep it was thrown into
        expect(page.locator("#timers .timer-state")).to_have_text("disarmed")
        shot(page, "cancelled")
        # The workflow's cleanup step ran before the run ended as cancelled.
        assert sleeping.status() == "cancelled"
        assert [t.task for t in cluster.baton.store.task_rows(sleeping.run_id)] == ["t.count"]
        page.close()


def test_token_required_in_the_browser(offline_baton: Any, browser: Any, shot: Callable[[Any, str], Any]) -> None:
    run = offline_baton.ns_idle.start(XSS, workflow_id="br-token")
    with dashboard(offline_baton, token="browser-token") as srv:
        page = browser.new_page()
        fired = _watch_for_script(page)
        for path in ("/", "/runs/br-token", "/runs/br-token?step=1"):
            page.goto(srv.url + path)
            expect(page.locator("#login-form")).to_be_visible()
            expect(page.locator("#run-id")).to_have_count(0)
            assert "__pwned" not in page.content()  # the run's arguments are not shown
        api = page.goto(srv.url + "/api/runs")
        assert api is not None and api.status == 401
        metrics = page.goto(srv.url + "/metrics")
        assert metrics is not None and metrics.status == 401
        page.goto(srv.url + "/runs/br-token")
        page.fill('input[name="token"]', "wrong")
        page.click("#login-form button")
        expect(page.locator("#login-failed")).to_be_visible()
        shot(page, "login-refused")
        page.fill('input[name="token"]', "browser-token")
        page.click("#login-form button")
        page.wait_for_url("**/runs/br-token")
        expect(page.locator("#run-id")).to_contain_text("br-token")
        assert json.dumps(XSS) in page.locator("#run-args").inner_text()
        assert page.evaluate("window.__pwned") is None and fired == []
        shot(page, "logged-in")
        assert run.status() == "running"
        page.close()
