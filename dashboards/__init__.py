"""Monitoring for Baton: the workflow dashboard (``baton dashboard``), its mount inside
Flower (``baton flower``), Prometheus metrics, and the Flower and Grafana configs."""

from __future__ import annotations

from typing import Any

__all__ = ["make_app", "run_flower", "serve"]


def make_app(baton: Any, token: str | None = None, flower_url: str | None = None, url_prefix: str = "") -> Any:
    """See :func:`dashboards.server.make_app`."""
    from .server import make_app as _make_app

    return _make_app(baton, token=token, flower_url=flower_url, url_prefix=url_prefix)


def serve(baton: Any, host: str = "127.0.0.1", port: int = 8089, token: str | None = None,
          flower_url: str | None = None) -> None:
    """See :func:`dashboards.server.serve`."""
    from .server import serve as _serve

    _serve(baton, host=host, port=port, token=token, flower_url=flower_url)


def run_flower(app: Any, baton: Any, argv: list[str]) -> None:
    """See :func:`dashboards.flower.run_flower`."""
    from .flower import run_flower as _run_flower

    _run_flower(app, baton, argv)
