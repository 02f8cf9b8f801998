"""``baton flower``: Flower itself, with Baton's workflow pages mounted under ``/workflows``.

Flower has no plugin API, but it is a ``tornado.web.Application``: we build it exactly as
``flower/command.py`` does (same options, env vars, config file), then add our handlers
with ``add_handlers``, which Tornado consults before Flower's catch-all 404. The handlers
derive from Flower's ``BaseHandler``, so Flower's ``--basic_auth``/``--auth`` protects them.
Activity links point at Flower's own ``/task/<id>`` pages on the same origin.
"""

from __future__ import annotations

import atexit
import logging
import signal
from typing import Any

import tornado.web
from flower.views import BaseHandler

from .handlers import Context, routes

log = logging.getLogger("baton.flower")

WORKFLOWS = "/workflows"


class FlowerHandler(BaseHandler):  # type: ignore[misc]
    """Base for the pages inside Flower: Flower's auth, but our XSRF rule and no CORS."""

    ctx: Context

    def set_default_headers(self) -> None:
        # Flower opens CORS on unauthenticated instances; workflow actions never are cross-origin.
        self.set_header("X-Content-Type-Options", "nosniff")

    def authorized(self) -> bool:
        return bool(self.current_user)  # Flower's get_current_user: basic auth (401) or OAuth cookie

    def deny(self) -> None:
        if self.application.options.auth and self.request.method in ("GET", "HEAD") and not self.is_api():
            self.redirect(self.get_login_url())
            raise tornado.web.Finish()
        raise tornado.web.HTTPError(401, "authentication required")

    def on_unauthorized(self) -> None:
        if self.application.options.basic_auth:
            self.set_header("WWW-Authenticate", 'Basic realm="flower"')

    def xsrf_exempt(self) -> bool:
        # Scripts calling the JSON API (curl --user) send neither Origin nor Sec-Fetch-Site;
        # every browser POST carries Origin, so it must carry the XSRF token too.
        return bool(self.scripted_api_call())


def build_flower(app: Any, baton: Any, argv: list[str], prog: str = "baton flower") -> Any:
    """A configured ``flower.app.Flower`` with the workflow pages added (not yet listening).

    ``argv`` takes Flower's own options (``--port=5555``, ``--address``, ``--url_prefix``,
    ``--basic_auth=user:pass``, ``--persistent=True``, ``--conf=flowerconfig.py``...), and
    ``FLOWER_*`` environment variables apply as with ``celery flower``.
    """
    from flower.app import Flower
    from flower.command import apply_env_options, apply_options, extract_settings, setup_logging
    from flower.urls import settings
    from tornado.options import options

    apply_env_options()
    apply_options(prog, list(argv))
    extract_settings()
    setup_logging()
    flower_app = Flower(capp=app, options=options, **settings)
    base = "/" + options.url_prefix.strip("/") if options.url_prefix and options.url_prefix.strip("/") else ""
    ctx = Context(baton, token=None, flower_url=base, prefix=base + WORKFLOWS, mode="flower")
    flower_app.add_handlers(r".*", routes(ctx, FlowerHandler))
    flower_app.settings["baton_ctx"] = ctx
    return flower_app


def run_flower(app: Any, baton: Any, argv: list[str]) -> None:
    """Serve Flower with a Workflows section until SIGTERM or Ctrl-C (what ``baton flower`` runs).

    Args:
        app: the Celery app (as ``celery -A app flower`` would load).
        baton: the ``sdk.Baton`` bound to that app.
        argv: Flower options, e.g. ``["--port=5555", "--basic_auth=admin:secret"]``.
    """
    from flower.command import print_banner, sigterm_handler
    from flower.urls import settings
    from tornado.options import options

    flower_app = build_flower(app, baton, argv)
    atexit.register(flower_app.stop)
    signal.signal(signal.SIGTERM, sigterm_handler)
    port = flower_app.start_http_server()
    print_banner(app, "ssl_options" in settings, port)
    prefix = flower_app.settings["baton_ctx"].prefix
    where = options.unix_socket or f"http://{options.address or '127.0.0.1'}:{port}"
    log.info("Baton workflows at %s%s/", where, prefix)
    print(f"Baton workflows at {where}{prefix}/", flush=True)
    try:
        flower_app.start()
    except (KeyboardInterrupt, SystemExit):
        pass
