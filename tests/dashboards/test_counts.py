"""The runs list counts each status only up to a cap (its page polls the counts every 3 s), and
pages by whether an older row exists, not by the total."""

from __future__ import annotations

from typing import Any

import pytest

from dashboards import model
from tests.dashboards.support import Session, dashboard

pytestmark = pytest.mark.timeout(60)


def test_counts_past_the_cap_are_shown_as_lower_bounds_and_paging_still_reaches_the_end(
        offline_baton: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model, "COUNT_CAP", 3)
    for i in range(5):
        offline_baton.ns_idle.start(str(i), workflow_id=f"cap-{i}")
    assert offline_baton.store.count_runs() == {"running": 5}  # uncapped for the store's own callers
    assert offline_baton.store.count_runs(cap=3) == {"running": 4}  # counted up to cap + 1, no further

    data = model.runs_page(offline_baton, limit=2)
    assert data["counts"]["running"] == 3 and data["capped"] == ["running"] and data["total_capped"]
    assert data["counts"]["completed"] == 0 and data["all"] == 3
    seen, offset = [], 0
    while True:  # "older" pages until there is none: every run is reached although the total says 3
        page = model.runs_page(offline_baton, status="running", limit=2, offset=offset)
        seen += [r["id"] for r in page["runs"]]
        if not page["more"]:
            break
        offset += 2
    assert sorted(seen) == [f"cap-{i}" for i in range(5)]

    with dashboard(offline_baton) as srv:
        s = Session(srv.url)
        html = s.get("/?limit=2").text
        api = s.get("/api/runs?status=completed").json()
    assert "running <b>3+</b>" in html and "all <b>3+</b>" in html and 'id="next"' in html
    assert "3+ runs" in html
    assert api["capped"] == ["running"] and not api["total_capped"] and api["total"] == 0 and not api["more"]
