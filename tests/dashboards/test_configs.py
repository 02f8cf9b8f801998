"""The shipped Grafana dashboard and Flower config are valid and name real metrics and options."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path
from typing import Any

import pytest

from dashboards import metrics

ROOT = Path(__file__).resolve().parents[2]
DASH = ROOT / "dashboards"

FLOWER_METRICS = {"flower_events_total", "flower_task_runtime_seconds_bucket", "flower_worker_online",
                  "flower_worker_number_of_currently_executing_tasks", "flower_task_prefetch_time_seconds_bucket"}


def _baton_metric_names(offline_baton: Any) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    offline_baton.ns_idle.start("x")
    text = metrics.render(metrics.registry(offline_baton)).decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_grafana_dashboard_is_valid_json_on_known_metrics(offline_baton: Any) -> None:
    dash = json.loads((DASH / "grafana.json").read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 8
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    known = _baton_metric_names(offline_baton) | FLOWER_METRICS
    # Counters and histograms that have no samples yet in an empty store still have fixed names.
    known |= {"baton_steps_completed_total", "baton_steps_failed_total", "baton_steps_started_total",
              "baton_step_latency_seconds_bucket"}
    used: set[str] = set()
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            for name in re.findall(r"\b((?:baton|flower)_[a-z_]+)\b", t["expr"]):
                if name not in ("baton_job", "flower_job"):
                    used.add(name)
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
        x, w = p["gridPos"]["x"], p["gridPos"]["w"]
        assert x >= 0 and x + w <= 24, p["title"]
    assert used <= known, f"unknown metrics in grafana.json: {used - known}"
    assert {"baton_runs", "baton_step_latency_seconds_bucket", "baton_sweeper_recoveries_total",
            "flower_events_total"} <= used
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource"}


def test_flowerconfig_sets_only_flower_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from flower.options import default_options

    monkeypatch.setenv("FLOWER_BASIC_AUTH", "admin:pw,ops:pw2")
    monkeypatch.setenv("FLOWER_PERSISTENT", "true")
    conf = runpy.run_path(str(DASH / "flowerconfig.py"))
    public = {k: v for k, v in conf.items() if not k.startswith("_") and k not in ("os", "annotations")}
    known = {name.replace("-", "_") for name in default_options._options}  # tornado stores "tasks-columns"
    assert set(public) <= known, f"not Flower options: {set(public) - known}"
    assert public["address"] == "127.0.0.1" and public["port"] == 5555
    assert public["persistent"] is True and public["basic_auth"] == ["admin:pw", "ops:pw2"]
    assert "kwargs" in public["tasks_columns"].split(",")
    monkeypatch.delenv("FLOWER_PERSISTENT")
    assert runpy.run_path(str(DASH / "flowerconfig.py"))["persistent"] is False


def test_docs_state_the_event_flags(offline_baton: Any) -> None:
    # the doc says Baton leaves it off (a second publish per activity) unless the app sets it
    assert not offline_baton.app.conf.task_send_sent_event
    doc = (ROOT / "docs" / "dashboard.md").read_text()
    for needle in ("task_send_sent_event", "-E", "worker_send_task_events", "/api/runs", "BATON_DASHBOARD_TOKEN",
                   "celery -A", "baton flower"):
        assert needle in doc, needle
