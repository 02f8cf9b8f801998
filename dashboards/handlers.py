"""Request handlers for the workflow pages, the JSON API and ``/metrics``.

Each handler is a mixin with no base class: :func:`routes` combines it with a base handler,
``tornado.web.RequestHandler`` for ``baton dashboard`` (token auth, see ``server.py``) or
Flower's ``BaseHandler`` for ``baton flower`` (Flower's basic auth or OAuth). Database work
runs in the IOLoop's executor so a slow query never stalls Flower's event loop.

Security: every handler checks auth in ``prepare``; POSTs carry Tornado's XSRF token
(forms) unless they come with a bearer token (API clients); pages send a strict
Content-Security-Policy; templates autoescape every value taken from a run.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import tornado.web
from tornado.ioloop import IOLoop

from sdk.errors import BatonError, WorkflowNotFound

from . import metrics, model

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "templates")
STATIC = os.path.join(HERE, "static")
MAX_SLOTS_SHOWN = 50  # per step on the page (a 10k fan-out stays readable); the API has them all
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class Context:
    """What every handler needs: the Baton, auth settings, where pages and Flower live."""

    def __init__(self, baton: Any, *, token: str | None, flower_url: str | None, prefix: str,
                 mode: str = "standalone") -> None:
        self.baton = baton
        self.token = token or None
        self.flower_url = flower_url.rstrip("/") if flower_url is not None else None
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.mode = mode
        self.registry = metrics.registry(baton)

    def url(self, path: str = "/", **query: Any) -> str:
        q = {k: v for k, v in query.items() if v not in (None, "")}
        return self.prefix + path + ("?" + urlencode(q) if q else "")

    def run_url(self, run_id: str, **query: Any) -> str:
        return self.url("/runs/" + model.quote_id(run_id), **query)


def fmt_time(value: datetime | None) -> str:
    value = model.utc(value)
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z" if value else ""


def fmt_dur(value: float | None) -> str:
    if value is None:
        return ""
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.2f} s"
    minutes, secs = divmod(int(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m {secs}s" if hours else f"{minutes}m {secs}s"


def pretty(value: Any) -> str:
    """JSON text for a value: on one line when short, indented otherwise."""
    compact = model.dumps(value)
    return compact if len(compact) <= 80 else model.dumps(value, indent=2)


def short(value: Any, n: int = 120) -> str:
    text = value if isinstance(value, str) else model.dumps(value)
    return text if len(text) <= n else text[: n - 1] + "…"


class ActionError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def perform(baton: Any, run_id: str, action: str, params: dict[str, Any]) -> dict[str, Any]:
    """Carry out a run action; raises ``ActionError`` with an HTTP status and a message."""
    try:
        handle = baton.get(run_id)
        if action == "signal":
            name = str(params.get("name") or "").strip()
            if not name:
                raise ActionError(400, "a signal needs a name")
            handle.signal(name, params.get("payload"))
            return {"ok": True, "id": handle.id, "message": f"signal {name!r} sent"}
        if action == "cancel":
            ok = handle.cancel(str(params.get("reason") or "cancelled from the dashboard"))
            return {"ok": ok, "id": handle.id,
                    "message": "cancellation requested" if ok else "the run had already ended"}
        if action == "resume":
            baton.resume(run_id)
            return {"ok": True, "id": handle.id, "message": "resumed"}
        if action == "fork":
            try:
                at_step = int(params.get("at_step"))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise ActionError(400, "fork needs an integer at_step") from None
            new = baton.fork(run_id, at_step=at_step, new_id=params.get("new_id") or None)
            return {"ok": True, "id": new.id, "message": f"forked at step {at_step} as {new.id}"}
    except WorkflowNotFound as exc:
        raise ActionError(404, str(exc)) from None
    except (BatonError, ValueError, TypeError) as exc:
        raise ActionError(400, str(exc)) from None
    raise ActionError(404, f"unknown action {action!r}")


class Base:
    """Shared behaviour; mixed in before a ``RequestHandler`` subclass."""

    ctx: Context

    def initialize(self, ctx: Context) -> None:
        self.ctx = ctx

    # -------------------------------------------------------------- auth
    # ``authorized()``, ``deny()``, ``on_unauthorized()`` and ``xsrf_exempt()`` come from the base handler
    # (server.TokenHandler or flower.FlowerHandler), which follows this mixin in the MRO.

    def bearer(self) -> str | None:
        header = self.request.headers.get("Authorization", "")  # type: ignore[attr-defined]
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None

    def prepare(self) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")  # type: ignore[attr-defined]
        self.set_header("Referrer-Policy", "same-origin")  # type: ignore[attr-defined]
        self.set_header("Content-Security-Policy", CSP)  # type: ignore[attr-defined]
        self.set_header("Cache-Control", "no-store")  # type: ignore[attr-defined]
        if not self.authorized():  # type: ignore[attr-defined]
            self.deny()  # type: ignore[attr-defined]

    def is_api(self) -> bool:
        path: str = self.request.path  # type: ignore[attr-defined]
        return path.startswith(self.ctx.prefix + "/api") or path == self.ctx.prefix + "/metrics"

    def scripted_api_call(self) -> bool:
        """An API request from a script: browsers add Origin (and Sec-Fetch-Site) to every POST."""
        headers = self.request.headers  # type: ignore[attr-defined]
        return self.is_api() and not any(h in headers for h in ("Origin", "Sec-Fetch-Site"))

    def check_xsrf_cookie(self) -> None:
        # ``xsrf_exempt()`` comes from the base handler: a bearer token (standalone), or a
        # non-browser API client (Flower). Everything else must carry the XSRF token.
        if self.xsrf_exempt():  # type: ignore[attr-defined]
            return
        tornado.web.RequestHandler.check_xsrf_cookie(self)  # type: ignore[arg-type]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if not hasattr(self, "_current_user"):
            self.current_user = None  # rendering must not re-run a failing auth check
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = exc.log_message if isinstance(exc, tornado.web.HTTPError) and exc.log_message else None
        message = message or self._reason  # type: ignore[attr-defined]
        if status_code == 401:
            self.on_unauthorized()  # type: ignore[attr-defined]
        if self.is_api() or self.request.method != "GET":  # type: ignore[attr-defined]
            self.set_header("Content-Type", "application/json; charset=UTF-8")  # type: ignore[attr-defined]
            self.finish(model.dumps({"error": message, "status": status_code}))  # type: ignore[attr-defined]
            return
        self.page("error.html", status_code=status_code, message=message)

    # -------------------------------------------------------------- helpers
    def get_template_path(self) -> str:
        return TEMPLATES

    def arg(self, name: str, default: str | None = None) -> str | None:
        # RequestHandler's, not Flower's (Flower HTML-escapes arguments; we escape on output).
        value = tornado.web.RequestHandler.get_argument(self, name, default)  # type: ignore[call-overload]
        return value.strip() if isinstance(value, str) else value

    def int_arg(self, name: str, default: int | None) -> int | None:
        value = self.arg(name)
        if not value:
            return default
        try:
            return int(value)
        except ValueError:
            raise tornado.web.HTTPError(400, f"{name} must be an integer") from None

    async def call(self, fn: Any, *args: Any) -> Any:
        try:
            return await IOLoop.current().run_in_executor(None, fn, *args)
        except WorkflowNotFound as exc:
            raise tornado.web.HTTPError(404, str(exc)) from None

    def send_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)  # type: ignore[attr-defined]
        self.set_header("Content-Type", "application/json; charset=UTF-8")  # type: ignore[attr-defined]
        self.finish(model.dumps(data))  # type: ignore[attr-defined]

    def flash(self, message: str, ok: bool = True) -> None:
        value = json.dumps({"m": message[:500], "ok": ok})
        self.set_signed_cookie("baton_flash", value, expires_days=None,  # type: ignore[attr-defined]
                               httponly=True, samesite="Strict", path=self.ctx.prefix or "/")

    def take_flash(self) -> dict[str, Any] | None:
        raw = self.get_signed_cookie("baton_flash", max_age_days=1)  # type: ignore[attr-defined]
        if raw is None:
            return None
        self.clear_cookie("baton_flash", path=self.ctx.prefix or "/")  # type: ignore[attr-defined]
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def page(self, template: str, **kw: Any) -> None:
        ctx = self.ctx
        namespace = dict(ctx=ctx, u=ctx.url, run_url=ctx.run_url, fmt_time=fmt_time, fmt_dur=fmt_dur,
                         pretty=pretty, short=short, ctx_quote=model.quote_id, flash=self.take_flash(),
                         statuses=model.STATUSES,
                         logout=ctx.mode == "standalone" and ctx.token is not None)
        namespace.update(kw)
        tornado.web.RequestHandler.render(self, template, **namespace)  # type: ignore[arg-type]


# ------------------------------------------------------------------ pages
class RunsPage(Base):
    async def get(self) -> None:
        status, workflow, search = self.arg("status"), self.arg("workflow"), self.arg("search")
        limit, offset = self.int_arg("limit", model.PAGE_SIZE), self.int_arg("offset", 0)
        data = await self.call(model.runs_page, self.ctx.baton, status, workflow, search, limit, offset)
        poll = self.ctx.url("/api/runs", status=data["status"], workflow=data["workflow"],
                            search=data["search"], limit=data["limit"], offset=data["offset"], only="version")
        self.page("runs.html", data=data, poll=poll, version=list_version(data))


def list_version(data: dict[str, Any]) -> str:
    rows = [(r["id"], r["status"], r["step"]) for r in data["runs"]]
    return hashlib.sha1(model.dumps([data["counts"], rows]).encode()).hexdigest()[:16]


class RunPage(Base):
    async def get(self, run_id: str) -> None:
        step = self.int_arg("step", None)
        ctx = self.ctx
        detail = await self.call(model.run_detail, ctx.baton, run_id, ctx.flower_url)
        chosen = await self.call(model.step_detail, ctx.baton, run_id, step)
        if step is not None and chosen is None:
            raise tornado.web.HTTPError(404, f"run {run_id!r} has no step {step}")
        waiting = [w.get("name", "") for w in detail["run"]["waiting"] if w.get("kind") == "signal"]
        self.page("run.html", d=detail, run=detail["run"], chosen=chosen, default_signal=(waiting or [""])[0],
                  max_slots=MAX_SLOTS_SHOWN,
                  poll=ctx.url(f"/api/runs/{model.quote_id(run_id)}/version"))


class RunAction(Base):
    async def post(self, run_id: str, action: str) -> None:
        params: dict[str, Any] = {"name": self.arg("name"), "reason": self.arg("reason"),
                                  "at_step": self.arg("at_step"), "new_id": self.arg("new_id")}
        target = run_id
        try:
            if action == "signal":
                raw = self.arg("payload") or "null"
                try:
                    params["payload"] = json.loads(raw)
                except ValueError as exc:
                    raise ActionError(400, f"the payload is not JSON: {exc}") from None
            out = await self.call(perform, self.ctx.baton, run_id, action, params)
            self.flash(out["message"])
            target = out["id"] if action == "fork" else run_id
        except ActionError as exc:
            self.flash(str(exc), ok=False)
        step = self.arg("step")
        self.redirect(self.ctx.run_url(target, step=step if action != "fork" else None))  # type: ignore[attr-defined]


# ------------------------------------------------------------------ JSON API
class ApiIndex(Base):
    def get(self) -> None:
        p = self.ctx.prefix
        self.send_json({"endpoints": [
            f"GET {p}/api/runs?status=&workflow=&search=&limit=&offset=", f"GET {p}/api/runs/<id>",
            f"GET {p}/api/runs/<id>/steps", f"GET {p}/api/runs/<id>/steps/<step>",
            f"GET {p}/api/runs/<id>/history", f"GET {p}/api/runs/<id>/version",
            f"POST {p}/api/runs/<id>/signal|cancel|resume|fork", f"GET {p}/metrics",
        ], "doc": "docs/dashboard.md"})


class ApiRuns(Base):
    async def get(self) -> None:
        data = await self.call(model.runs_page, self.ctx.baton, self.arg("status"), self.arg("workflow"),
                               self.arg("search"), self.int_arg("limit", model.PAGE_SIZE),
                               self.int_arg("offset", 0))
        data["version"] = list_version(data)
        if self.arg("only") == "version":
            data = {"version": data["version"], "active": data["counts"].get("running", 0) > 0}
        self.send_json(data)


class ApiRun(Base):
    async def get(self, run_id: str, part: str | None = None, step: str | None = None) -> None:
        baton = self.ctx.baton
        if part is None:
            data = await self.call(model.run_detail, baton, run_id, self.ctx.flower_url)
        elif part == "version":
            data = await self.call(model.version, baton, run_id)
        elif part == "history":
            data = {"events": await self.call(model.history, baton, run_id)}
        elif step is None:
            data = {"steps": await self.call(model.checkpoints, baton, run_id)}
        else:
            data = await self.call(model.step_detail, baton, run_id, int(step))
            if data is None:
                raise tornado.web.HTTPError(404, f"run {run_id!r} has no step {step}")
        self.send_json(data)


class ApiAction(Base):
    async def post(self, run_id: str, action: str) -> None:
        body = self.request.body or b"{}"  # type: ignore[attr-defined]
        try:
            params = json.loads(body)
        except ValueError:
            raise tornado.web.HTTPError(400, "the request body must be a JSON object") from None
        if not isinstance(params, dict):
            raise tornado.web.HTTPError(400, "the request body must be a JSON object")
        try:
            out = await self.call(perform, self.ctx.baton, run_id, action, params)
        except ActionError as exc:
            self.send_json({"error": str(exc), "status": exc.status}, exc.status)
            return
        self.send_json(out)


class MetricsPage(Base):
    async def get(self) -> None:
        body = await self.call(metrics.render, self.ctx.registry)
        self.set_header("Content-Type", metrics.CONTENT_TYPE)  # type: ignore[attr-defined]
        self.finish(body)  # type: ignore[attr-defined]


def routes(ctx: Context, base: type, extra: list[tuple[str, type]] | None = None) -> list[tuple[Any, ...]]:
    """URL rules for all pages under ``ctx.prefix``, each handler built on ``base``."""
    def make(mixin: type) -> type:
        return type(mixin.__name__, (mixin, base), {})

    p = ctx.prefix
    rid = r"([^/]+)"
    rules: list[tuple[str, type]] = [
        (p + r"/?", RunsPage),
        (p + rf"/runs/{rid}", RunPage),
        (p + rf"/runs/{rid}/(signal|cancel|resume|fork)", RunAction),
        (p + r"/api/?", ApiIndex),
        (p + r"/api/runs", ApiRuns),
        (p + rf"/api/runs/{rid}", ApiRun),
        (p + rf"/api/runs/{rid}/(steps|history|version)", ApiRun),
        (p + rf"/api/runs/{rid}/(steps)/(\d+)", ApiRun),
        (p + rf"/api/runs/{rid}/(signal|cancel|resume|fork)", ApiAction),
        (p + r"/metrics", MetricsPage),
        *((p + pattern, mixin) for pattern, mixin in (extra or [])),
    ]
    out: list[tuple[Any, ...]] = [(pattern, make(mixin), {"ctx": ctx}) for pattern, mixin in rules]
    out.append((p + r"/static/(.*)", tornado.web.StaticFileHandler, {"path": STATIC}))
    return out
