"""With a token, every page, API call, action and /metrics is refused without it (issue 5, acceptance 3)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from dashboards import server
from tests.dashboards.support import Session, api_path, dashboard, run_path, xsrf_field

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-token-for-tests"
ACTIONS = ("signal", "cancel", "resume", "fork")


def _get_paths(run_id: str) -> list[str]:
    return [
        "/", "/?status=running", run_path(run_id), run_path(run_id, "?step=1"), "/api", "/api/runs",
        "/api/runs?status=running&workflow=idle", api_path(run_id), api_path(run_id, "/steps"),
        api_path(run_id, "/steps/1"), api_path(run_id, "/history"), api_path(run_id, "/version"), "/metrics",
    ]


def _post_paths(run_id: str) -> list[str]:
    return [run_path(run_id, f"/{a}") for a in ACTIONS] + [api_path(run_id, f"/{a}") for a in ACTIONS] + ["/logout"]


def _refused(resp: Any, path: str) -> None:
    if resp.status == 302:
        assert resp.headers["Location"].startswith("/login?next="), path
    else:
        assert resp.status in (401, 403), f"{path} answered {resp.status}"
    assert "idle-" not in resp.text, f"{path} leaked run data while refusing"


def test_every_route_refused_without_token(offline_baton: Any) -> None:
    run = offline_baton.ns_idle.start("x", workflow_id="idle-auth")
    with dashboard(offline_baton, token=TOKEN) as srv:
        anon = Session(srv.url)
        for path in _get_paths(run.id):
            resp = anon.get(path)
            _refused(resp, path)
            if path.startswith(("/api", "/metrics")):
                assert resp.status == 401 and resp.json()["status"] == 401, path
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = {"Authorization": "Bearer not-the-token"}
        for path in _get_paths(run.id):
            _refused(anon.get(path, headers=wrong), path)
        for path in _post_paths(run.id):
            _refused(anon.post(path, form={"name": "go"}), path)
            _refused(anon.post(path, headers=wrong, body={"name": "go"}), path)
        assert offline_baton.store.signal_rows(run.run_id) == [], "a refused signal must not be stored"
        assert run.status() == "running"


def test_bearer_token_opens_pages_and_api(offline_baton: Any) -> None:
    run = offline_baton.ns_idle.start("x", workflow_id="idle-bearer")
    with dashboard(offline_baton, token=TOKEN) as srv:
        client = Session(srv.url)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for path in _get_paths(run.id):
            resp = client.get(path, headers=auth)
            if path.endswith("/steps/1") or path.endswith("?step=1"):
                assert resp.status == 404, path  # the run has not yielded yet: refused for a reason, not auth
            else:
                assert resp.status == 200, f"{path}: {resp.status} {resp.text[:200]}"
        # API POSTs with the bearer token need no XSRF token (a browser never sends it on its own).
        resp = client.post(api_path(run.id, "/signal"), headers=auth, body={"name": "go", "payload": {"a": 1}})
        assert resp.status == 200 and resp.json()["ok"] is True
        assert [s.name for s in offline_baton.store.signal_rows(run.run_id)] == ["go"]


def test_login_cookie_and_xsrf(offline_baton: Any) -> None:
    run = offline_baton.ns_idle.start("x", workflow_id="idle-login")
    with dashboard(offline_baton, token=TOKEN) as srv:
        browser = Session(srv.url)
        resp = browser.get(run_path(run.id))
        assert resp.status == 302
        login = browser.get(resp.headers["Location"])
        assert login.status == 200 and 'name="token"' in login.text
        field = xsrf_field(login.text)
        bad = browser.post("/login", form={"_xsrf": field, "token": "nope", "next": run_path(run.id)})
        assert bad.status == 401 and "Wrong token" in bad.text
        ok = browser.post("/login", form={"_xsrf": field, "token": TOKEN, "next": run_path(run.id)})
        assert ok.status == 302 and ok.headers["Location"] == run_path(run.id)
        page = browser.get(run_path(run.id))
        assert page.status == 200 and "idle-login" in page.text
        # The session cookie alone does not make a form POST valid: it needs the XSRF token.
        assert browser.post(run_path(run.id, "/signal"), form={"name": "go"}).status == 403
        sent = browser.post(run_path(run.id, "/signal"),
                            form={"_xsrf": xsrf_field(page.text), "name": "go", "payload": '{"k": 1}'})
        assert sent.status == 302 and sent.headers["Location"] == run_path(run.id)
        assert [s.name for s in offline_baton.store.signal_rows(run.run_id)] == ["go"]
        # Only local paths are honoured as the login target.
        evil = browser.post("/login", form={"_xsrf": field, "token": TOKEN, "next": "//evil.example/x"})
        assert evil.headers["Location"] == "/"
        out = browser.post("/logout", form={"_xsrf": field})
        assert out.status == 302
        assert browser.get(run_path(run.id)).status == 302


def test_api_post_from_a_browser_needs_xsrf_without_token(offline_baton: Any) -> None:
    run = offline_baton.ns_idle.start("x", workflow_id="idle-open")
    with dashboard(offline_baton) as srv:
        client = Session(srv.url)
        forged = client.post(api_path(run.id, "/signal"), headers={"Origin": "http://evil.example"},
                             body={"name": "go"})
        assert forged.status == 403
        scripted = client.post(api_path(run.id, "/signal"), body={"name": "go"})
        assert scripted.status == 200, scripted.text
        assert client.post(run_path(run.id, "/cancel"), form={"reason": "x"}).status == 403
        assert run.status() == "running"


def test_defaults_bind_loopback_and_read_env(monkeypatch: pytest.MonkeyPatch) -> None:
    params = inspect.signature(server.serve).parameters
    assert params["host"].default == "127.0.0.1" and params["port"].default == 8089
    monkeypatch.setenv("BATON_DASHBOARD_TOKEN", "from-env")
    monkeypatch.setenv("FLOWER_URL", "http://flower:5555")
    assert server.from_env(None, None) == ("from-env", "http://flower:5555")
    assert server.from_env("given", "http://f") == ("given", "http://f")
    monkeypatch.setenv("BATON_FLOWER_URL", "http://baton-flower:5555")  # what `baton dashboard` also reads
    assert server.from_env(None, None)[1] == "http://baton-flower:5555"
    monkeypatch.delenv("BATON_DASHBOARD_TOKEN")
    assert server.from_env(None, None)[0] is None
