"""A coding agent in miniature: plan, fan out tool calls, fix failing tests, wait for a human, summarise.

The "model" is a deterministic fake (no network, no API keys) and the "repository" is a small tree of
Python files generated on disk, but the shape is the real one: an LLM plans, tool calls fan out over
files, a test run fails, the agent loops on the failures, a human approves, the change is committed and
CI is awaited with a durable timer. Every step is an ordinary Celery task; the workflow itself is a
generator that Baton replays, so any worker can pick it up after another one dies.

Run it:

    baton demo                                              # all of it, no servers needed
    celery -A examples.coding_agent worker                  # or by hand: start workers, then
    baton -A examples.coding_agent start coding_agent '["reject negative values"]'
    baton -A examples.coding_agent signal <id> approval '{"approved": true, "by": "me"}'

Configuration comes from the environment, so the same module runs on the embedded default and on
Redis + PostgreSQL (see docker-compose.yml): ``CELERY_BROKER_URL`` (unset: Baton's embedded broker, a
private redis-server on a Unix socket under ``$BATON_HOME`` or ``./.baton``), ``BATON_DATABASE_URL``
(unset: a SQLite file) and ``BATON_EXAMPLE_WORKSPACE`` (where repositories are generated; every worker
must see the same directory).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import Celery

from sdk import Baton, RetryPolicy, SignalTimeout, now, sleep, step, uuid4, wait_signal

app = Celery("coding_agent")  # no broker here: CELERY_BROKER_URL if set, else Baton's embedded default
# Short recovery windows suit a demo that kills a worker on purpose: a worker silent for 5 s is presumed
# dead and the tasks it had started are re-sent; a message nobody started within 10 s (one the dead worker
# had prefetched, say) is re-sent too. The defaults (10 s and 300 s) suit deployments whose queues can back
# up for minutes: a message re-sent while its first copy still waits in the queue is dropped as a
# duplicate when it runs, but costs a delivery.
baton = Baton(app, dead_after=5.0, lost_after=10.0, claim_after=0.0)

WORKSPACE_ENV = "BATON_EXAMPLE_WORKSPACE"
MODEL_LATENCY = 0.15  # seconds per fake model call
TOOL_LATENCY = 0.02  # seconds per file operation
MAX_FIX_ROUNDS = 4
VALIDATION = '    if value < 0:\n        return {"ok": False, "error": "value must be >= 0"}\n'
BUGGY_VALIDATION = VALIDATION.replace("value < 0", "value <= 0")  # the model's typical off-by-one


def workspace_root() -> Path:
    return Path(os.environ.get(WORKSPACE_ENV) or Path(tempfile.gettempdir()) / "baton-coding-agent")


def _repo(path: str) -> Path:
    root = workspace_root().resolve()
    repo = Path(path).resolve()
    if root not in repo.parents:
        raise ValueError(f"{path!r} is outside the workspace {root}")
    return repo


def _write(path: Path, text: str) -> None:
    """Write atomically, so an attempt killed halfway and run again leaves a whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- tools (each one a Celery task)


@app.task(name="coding_agent.create_repo")
def create_repo(name: str, modules: int) -> dict[str, Any]:
    """Generate a small service: ``modules`` request handlers that do not validate their input yet."""
    repo = workspace_root() / name
    files = []
    for i in range(modules):
        rel = f"service/handlers/h_{i:02d}.py"
        _write(repo / rel, (
            f'"""Handler {i:02d}: scales an order quantity by {i + 2}."""\n\n\n'
            "def handle(payload):\n"
            '    value = payload["value"]\n'
            f'    return {{"ok": True, "value": value * {i + 2}}}\n'
        ))
        files.append(rel)
    _write(repo / "README.md", f"# {name}\n\nA generated service with {modules} handlers.\n")
    return {"path": str(repo), "files": files}


@app.task(name="coding_agent.read_file")
def read_file(repo: str, rel: str) -> str:
    time.sleep(TOOL_LATENCY)
    return (_repo(repo) / rel).read_text()


@app.task(name="coding_agent.edit_file")
def edit_file(repo: str, rel: str, content: str) -> dict[str, Any]:
    time.sleep(TOOL_LATENCY)
    _write(_repo(repo) / rel, content)
    return {"file": rel, "bytes": len(content), "sha": hashlib.sha1(content.encode()).hexdigest()[:10]}


@app.task(name="coding_agent.run_tests")
def run_tests(repo: str) -> dict[str, Any]:
    """The repository's test suite: every handler must scale, accept zero and reject negatives."""
    time.sleep(0.3)
    base = _repo(repo)
    failures: list[dict[str, Any]] = []
    files = sorted(p.relative_to(base).as_posix() for p in base.glob("service/handlers/h_*.py"))
    for rel in files:
        factor = int(rel[-5:-3]) + 2
        cases = [({"value": 3}, {"ok": True, "value": 3 * factor}), ({"value": 0}, {"ok": True, "value": 0}),
                 ({"value": -2}, {"ok": False, "error": "value must be >= 0"})]
        namespace: dict[str, Any] = {}
        try:
            exec(compile((base / rel).read_text(), rel, "exec"), namespace)
            for given, expected in cases:
                got = namespace["handle"](given)
                if got != expected:
                    failures.append({"file": rel, "test": f"handle({given})", "expected": expected, "got": got})
                    break
        except Exception as exc:
            failures.append({"file": rel, "test": "import", "expected": "no error", "got": repr(exc)})
    return {"passed": len(files) - len(failures), "failed": len(failures), "failures": failures}


@app.task(name="coding_agent.call_model")
def call_model(kind: str, request: dict[str, Any]) -> dict[str, Any]:
    """A deterministic stand-in for an LLM call (same request, same answer), with a model's latency."""
    time.sleep(MODEL_LATENCY)
    if kind == "plan":
        marker = workspace_root() / ".rate-limit" / request["repo"].replace("/", "_")
        if not marker.exists():  # the first call of each run hits a rate limit; RetryPolicy backs off
            _write(marker, "429")
            raise RuntimeError("429 Too Many Requests: rate limited, retry later")
        return {"steps": ["read every handler", "add input validation", "run the tests", "fix failures",
                          "ask for review"], "files": request["files"]}
    if kind == "edit":
        source: str = request["source"]
        if "if value" in source:
            return {"file": request["file"], "source": source, "changed": False}
        index = int(request["file"][-5:-3])
        guard = BUGGY_VALIDATION if index % 11 == 3 else VALIDATION
        patched = source.replace('    value = payload["value"]\n', '    value = payload["value"]\n' + guard)
        return {"file": request["file"], "source": patched, "changed": True}
    if kind == "fix":
        source = request["source"]
        index = int(request["file"][-5:-3])
        if index == 3 and request["round"] == 1:  # a first fix that misses the point, as models do
            return {"file": request["file"], "source": source.replace("value <= 0", "value <= -0")}
        fixed = source.replace("value <= -0", "value < 0").replace("value <= 0", "value < 0")
        return {"file": request["file"], "source": fixed}
    if kind == "summary":
        return {"text": (f"Added input validation to {request['changed']} handlers for '{request['ticket']}'. "
                         f"{request['fixes']} fix(es) over {request['rounds']} round(s) until "
                         f"{request['passed']} tests passed; approved by {request['approved_by']}.")}
    raise ValueError(f"unknown model request kind {kind!r}")


@app.task(name="coding_agent.notify")
def notify(channel: str, message: str) -> str:
    _write(workspace_root() / "notifications" / f"{channel}.txt", message + "\n")
    return f"sent to {channel}"


@app.task(name="coding_agent.commit")
def commit(repo: str, message: str) -> dict[str, Any]:
    base = _repo(repo)
    digest = hashlib.sha1()
    for path in sorted(base.glob("service/**/*.py")):
        digest.update(path.read_bytes())
    sha = digest.hexdigest()[:12]
    _write(base / ".commits" / sha, message + "\n")
    return {"sha": sha, "message": message}


@app.task(name="coding_agent.ci_status")
def ci_status(repo: str, sha: str) -> dict[str, Any]:
    ok = (_repo(repo) / ".commits" / sha).exists()
    return {"sha": sha, "state": "green" if ok else "missing"}


# ---------------------------------------------------------------- the workflow


def fix_failures(repo: str, ticket: str, report: dict[str, Any]):  # type: ignore[no-untyped-def]
    """Loop until the suite is green: one failure at a time, as an agent reads each failing test."""
    rounds = fixes = 0
    while report["failures"]:
        rounds += 1
        if rounds > MAX_FIX_ROUNDS:
            raise RuntimeError(f"tests still failing after {MAX_FIX_ROUNDS} rounds: {report['failures'][:3]}")
        for failure in report["failures"]:
            source = yield read_file.s(repo, failure["file"])
            fix = yield step(call_model.s("fix", {"ticket": ticket, "file": failure["file"], "source": source,
                                                  "failure": failure, "round": rounds}),
                             retry=RetryPolicy(max_attempts=3, initial_interval=0.5))
            yield edit_file.s(repo, failure["file"], fix["source"])
            fixes += 1
        report = yield run_tests.s(repo)
    return report, rounds, fixes


@baton.workflow
def coding_agent(ticket: str, modules: int = 60):  # type: ignore[no-untyped-def]
    started = yield now()
    workspace = yield uuid4()
    repo = yield create_repo.s(f"repo-{str(workspace)[:8]}", modules)
    plan = yield step(call_model.s("plan", {"ticket": ticket, "repo": repo["path"], "files": repo["files"]}),
                      retry=RetryPolicy(max_attempts=4, initial_interval=0.5), timeout=60)
    sources = yield [read_file.s(repo["path"], f) for f in plan["files"]]
    patches = yield [call_model.s("edit", {"ticket": ticket, "file": f, "source": src})
                     for f, src in zip(plan["files"], sources)]
    edits = yield [edit_file.s(repo["path"], p["file"], p["source"]) for p in patches if p["changed"]]
    report = yield run_tests.s(repo["path"])
    report, rounds, fixes = yield from fix_failures(repo["path"], ticket, report)

    yield notify.s("review", f"{ticket}: {len(edits)} files changed, {report['passed']} tests pass. Approve?")
    try:
        approval = yield wait_signal("approval", timeout=timedelta(hours=24))
    except SignalTimeout:
        return {"ticket": ticket, "merged": False, "reason": "no approval within 24 hours"}
    if not approval.get("approved"):
        return {"ticket": ticket, "merged": False, "reason": approval.get("comment", "rejected")}

    change = yield commit.s(repo["path"], f"{ticket}\n\nApproved-by: {approval.get('by', 'unknown')}")
    yield sleep(timedelta(seconds=1))  # CI needs a moment; a durable timer holds no worker meanwhile
    ci = yield ci_status.s(repo["path"], change["sha"])
    summary = yield call_model.s("summary", {"ticket": ticket, "changed": len(edits), "fixes": fixes,
                                             "rounds": rounds, "passed": report["passed"],
                                             "approved_by": approval.get("by", "unknown")})
    finished = yield now()
    return {
        "ticket": ticket, "merged": True, "files_changed": len(edits), "fix_rounds": rounds, "fixes": fixes,
        "tests_passed": report["passed"], "commit": change["sha"], "ci": ci["state"],
        "approved_by": approval.get("by", "unknown"), "summary": summary["text"],
        "workflow_seconds": round((finished - started).total_seconds(), 1),
    }
