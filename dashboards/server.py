"""``baton dashboard``: the workflow pages as a standalone Tornado app.

Binds 127.0.0.1 by default. With a token (``--token`` or ``BATON_DASHBOARD_TOKEN``) every
page, API call and ``/metrics`` needs it, as ``Authorization: Bearer <token>`` or as the
session cookie the login form sets. Actions are POSTs protected by Tornado's XSRF cookie.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import threading
from typing import Any

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from .handlers import Base, Context, routes

log = logging.getLogger("baton.dashboard")

TOKEN_ENV = "BATON_DASHBOARD_TOKEN"
FLOWER_ENVS = ("BATON_FLOWER_URL", "FLOWER_URL")
SESSION_COOKIE = "baton_session"


def _session_value(token: str) -> str:
    return hashlib.sha256(b"baton-dashboard-session\0" + token.encode()).hexdigest()


class TokenHandler(tornado.web.RequestHandler):
    """Base for standalone pages: a bearer token, or the signed session cookie from /login."""

    ctx: Context

    def authorized(self) -> bool:
        token = self.ctx.token
        if token is None:
            return True
        given = self.bearer()  # type: ignore[attr-defined]
        if given is not None:
            return hmac.compare_digest(given.encode(), token.encode())
        cookie = self.get_signed_cookie(SESSION_COOKIE, max_age_days=7)
        return cookie is not None and hmac.compare_digest(cookie, _session_value(token).encode())

    def deny(self) -> None:
        if self.request.method in ("GET", "HEAD") and not self.is_api():  # type: ignore[attr-defined]
            target = self.request.uri or "/"
            self.redirect(self.ctx.url("/login", next=target))
            raise tornado.web.Finish()
        raise tornado.web.HTTPError(401, "authentication required: send Authorization: Bearer <token>")

    def on_unauthorized(self) -> None:
        self.set_header("WWW-Authenticate", 'Bearer realm="baton"')

    def xsrf_exempt(self) -> bool:
        # A browser never attaches a bearer token by itself, so such a request cannot be forged
        # cross-site (``prepare`` still rejects a wrong one); nor does it omit Origin on a POST.
        return self.bearer() is not None or bool(self.scripted_api_call())  # type: ignore[attr-defined]


class LoginPage(Base):
    """The token form; the only page served without auth (it shows no run data)."""

    def authorized(self) -> bool:
        return True

    def get(self) -> None:
        self.page("login.html", next=self._next(), failed=False)

    def post(self) -> None:
        token = self.ctx.token
        given = self.arg("token") or ""
        if token is not None and not hmac.compare_digest(given.encode(), token.encode()):
            self.set_status(401)  # type: ignore[attr-defined]
            self.page("login.html", next=self._next(), failed=True)
            return
        if token is not None:
            self.set_signed_cookie(SESSION_COOKIE, _session_value(token), expires_days=7,  # type: ignore[attr-defined]
                                   httponly=True, samesite="Strict", path=self.ctx.prefix or "/")
        self.redirect(self._next())  # type: ignore[attr-defined]

    def _next(self) -> str:
        target = self.arg("next") or ""
        home = self.ctx.url("/")
        # Only a local path: no scheme, no host, no protocol-relative "//evil".
        if not target.startswith((self.ctx.prefix or "") + "/") or target.startswith("//") or "\\" in target:
            return home
        return target


class LogoutPage(Base):
    def post(self) -> None:
        self.clear_cookie(SESSION_COOKIE, path=self.ctx.prefix or "/")  # type: ignore[attr-defined]
        self.redirect(self.ctx.url("/login"))  # type: ignore[attr-defined]


def make_app(baton: Any, token: str | None = None, flower_url: str | None = None,
             url_prefix: str = "") -> tornado.web.Application:
    """The dashboard as a Tornado application (not yet listening).

    Args:
        baton: the ``sdk.Baton`` whose store is shown.
        token: require this bearer token (or the login cookie) on every page and call.
        flower_url: Flower's base URL; each activity attempt links to ``<flower_url>/task/<task id>``.
        url_prefix: serve under this path (behind a reverse proxy), e.g. ``"/baton"``.
    """
    ctx = Context(baton, token=token, flower_url=flower_url, prefix=url_prefix)
    secret = hashlib.sha256(b"baton-dashboard-cookie\0" + token.encode()).hexdigest() if token else \
        os.urandom(32).hex()
    rules = routes(ctx, TokenHandler, extra=[(r"/login", LoginPage), (r"/logout", LogoutPage)])
    return tornado.web.Application(
        rules, xsrf_cookies=True, cookie_secret=secret,
        xsrf_cookie_kwargs={"httponly": False, "samesite": "Strict", "path": ctx.prefix or "/"},
        template_path=os.path.join(os.path.dirname(__file__), "templates"), autoescape="xhtml_escape",
        baton_ctx=ctx,
    )


class Background:
    """The app serving from a thread with its own event loop (tests, embedding in scripts)."""

    def __init__(self, app: tornado.web.Application, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.port = 0
        self._sockets = bind_sockets(port, address=host)
        self.port = self._sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self._run, name="baton-dashboard", daemon=True)
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the dashboard thread did not start")

    @property
    def url(self) -> str:
        prefix = self.app.settings["baton_ctx"].prefix
        return f"http://{self.host}:{self.port}{prefix}"

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            server = HTTPServer(self.app, xheaders=False)
            server.add_sockets(self._sockets)
            self._ready.set()
            await self._stop.wait()
            server.stop()
            await server.close_all_connections()

        asyncio.run(main())

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)


def from_env(token: str | None, flower_url: str | None) -> tuple[str | None, str | None]:
    """The token and Flower URL given, else ``$BATON_DASHBOARD_TOKEN`` and ``$BATON_FLOWER_URL``/``$FLOWER_URL``."""
    flower_url = flower_url or next((os.environ[k] for k in FLOWER_ENVS if os.environ.get(k)), None)
    return token or os.environ.get(TOKEN_ENV) or None, flower_url


def serve(baton: Any, host: str = "127.0.0.1", port: int = 8089, token: str | None = None,
          flower_url: str | None = None) -> None:
    """Run ``baton dashboard`` in the foreground until interrupted.

    ``token`` defaults to ``$BATON_DASHBOARD_TOKEN``, ``flower_url`` to ``$BATON_FLOWER_URL`` or ``$FLOWER_URL``.
    """
    token, flower_url = from_env(token, flower_url)
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("baton dashboard: serving on %s without a token; anyone who can reach it can read run data "
                    "and cancel runs. Pass --token or set %s.", host, TOKEN_ENV)
    app = make_app(baton, token=token, flower_url=flower_url)

    async def main() -> None:
        server = HTTPServer(app)
        server.add_sockets(bind_sockets(port, address=host))
        shown = f"[{host}]" if ":" in host else host
        print(f"Baton dashboard on http://{shown}:{port}/" + (" (token required)" if token else ""), flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
