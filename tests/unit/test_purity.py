"""``import sdk`` stays free of Celery and database modules (the engine imports alone)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("celery", "kombu", "billiard", "sqlmodel", "sqlalchemy", "redis", "psycopg")

PROBE = """
import json, sys
import {module}
loaded = sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r}))
print(json.dumps(loaded))
"""


@pytest.mark.parametrize("module", ["sdk", "sdk.replay", "sdk.commands, sdk.events, sdk.checkpoint, sdk.serde"])
def test_importing_the_sdk_loads_no_celery_or_database_module(module):
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module, heavy=HEAVY)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)

    assert json.loads(out.stdout) == []


def test_the_engine_modules_import_only_the_standard_library_and_sdk():
    import ast

    allowed_roots = set(sys.stdlib_module_names) | {"sdk"}
    for name in ("replay", "commands", "events", "checkpoint", "serde", "errors"):
        tree = ast.parse((ROOT / "sdk" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = ["sdk" if node.level else (node.module or "").split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed_roots, f"sdk/{name}.py imports {roots}"
