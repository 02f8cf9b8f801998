"""The module ``celery -A tests.chaos.chaos_app worker`` loads in chaos and bad-input workers.

URLs and Baton's recovery knobs come from the environment, so each test tunes its workers:
``BATON_TEST_DEAD_AFTER``, ``BATON_TEST_LOST_AFTER``, ``BATON_TEST_SWEEP_INTERVAL``,
``BATON_TEST_CLAIM_AFTER`` (seconds),
``BATON_TEST_EAGER_STEPS`` (Baton's ``eager_steps``), ``BATON_TEST_RELEASE_AFTER`` (seconds: how
long a kept eager step runs before the ones behind it are published, ``tasks.eager.RELEASE_AFTER``),
``BATON_TEST_OMIT`` (comma-separated workflow names this worker does not have).
"""

from __future__ import annotations

import os

from tests.chaos.flows_chaos import build


def knobs() -> dict[str, float]:
    """Baton keyword arguments read from the environment."""
    out: dict[str, float] = {}
    for env, kw in (("BATON_TEST_DEAD_AFTER", "dead_after"), ("BATON_TEST_LOST_AFTER", "lost_after"),
                    ("BATON_TEST_SWEEP_INTERVAL", "sweep_interval"), ("BATON_TEST_CLAIM_AFTER", "claim_after")):
        if os.environ.get(env):
            out[kw] = float(os.environ[env])
    if os.environ.get("BATON_TEST_EAGER_STEPS"):
        out["eager_steps"] = int(os.environ["BATON_TEST_EAGER_STEPS"])
    return out


if os.environ.get("BATON_TEST_RELEASE_AFTER"):
    from tasks import eager

    eager.RELEASE_AFTER = float(os.environ["BATON_TEST_RELEASE_AFTER"])

ns = build(os.environ["BATON_TEST_BROKER"], os.environ["BATON_DATABASE_URL"],
           queue=os.environ.get("BATON_TEST_QUEUE", "celery"),
           counter_url=os.environ.get("BATON_TEST_COUNTER_URL"),
           omit=[n for n in os.environ.get("BATON_TEST_OMIT", "").split(",") if n], **knobs())
app = ns.app
baton = ns.baton
