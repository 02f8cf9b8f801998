"""Helpers shared by the dashboard tests (HTTP without redirects, with cookies) and the browser tests."""

from __future__ import annotations

import http.cookiejar
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from dashboards.model import quote_id
from dashboards.server import Background, make_app


@dataclass
class Response:
    status: int
    headers: Any
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Session:
    """A client that keeps cookies and never follows redirects (so refusals are visible)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPCookieProcessor(self.jar))

    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                form: dict[str, Any] | None = None, body: Any = None) -> Response:
        data: bytes | None = None
        hdrs = dict(headers or {})
        if form is not None:
            data = urlencode(form).encode()
            hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
        elif body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        elif method == "POST":
            data = b""
        req = urllib.request.Request(self.base + path, data=data, headers=hdrs, method=method)
        try:
            with self.opener.open(req, timeout=20) as resp:
                return Response(resp.status, resp.headers, resp.read().decode())
        except urllib.error.HTTPError as exc:
            return Response(exc.code, exc.headers, exc.read().decode())

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Response:
        return self.request("POST", path, **kw)

    def xsrf(self) -> str:
        for cookie in self.jar:
            if cookie.name == "_xsrf" and cookie.value:
                return cookie.value
        raise AssertionError("no _xsrf cookie yet: GET a page first")


def xsrf_field(html: str) -> str:
    match = re.search(r'name="_xsrf" value="([^"]+)"', html)
    assert match, "the page has no XSRF form field"
    return match.group(1)


@contextmanager
def dashboard(baton: Any, **kw: Any) -> Iterator[Background]:
    server = Background(make_app(baton, **kw))
    try:
        yield server
    finally:
        server.stop()


def run_path(run_id: str, suffix: str = "") -> str:
    return f"/runs/{quote_id(run_id)}{suffix}"


def api_path(run_id: str, suffix: str = "") -> str:
    return f"/api/runs/{quote_id(run_id)}{suffix}"
