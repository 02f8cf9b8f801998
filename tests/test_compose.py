"""docker-compose.yml and its Dockerfile, checked without a Docker engine.

Structure (services, health checks, ``depends_on`` conditions, keys the compose spec knows), and that
every command names a module, a celery subcommand or a baton subcommand that exists in this checkout.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

REQUIRED = {"redis", "postgres", "worker1", "worker2", "flower", "dashboard"}
# Service keys of the compose specification (https://github.com/compose-spec/compose-spec), so that a
# misspelt key ("healtcheck") fails here rather than being ignored by an old docker-compose.
SERVICE_KEYS = {
    "build", "command", "container_name", "depends_on", "entrypoint", "env_file", "environment", "expose",
    "healthcheck", "image", "labels", "networks", "ports", "profiles", "restart", "stop_grace_period",
    "stop_signal", "user", "volumes", "working_dir", "init", "logging", "deploy", "ulimits", "tmpfs",
}
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
RESTART = {"no", "always", "on-failure", "unless-stopped"}
DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def argv(value: Any) -> list[str]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else shlex.split(str(value))


def test_top_level_keys(compose: dict[str, Any]) -> None:
    allowed = {"services", "volumes", "networks", "configs", "secrets", "name"}
    extra = {k for k in compose if not k.startswith("x-")} - allowed
    assert not extra, f"unknown top-level keys {extra}"


def test_the_stack_has_its_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= REQUIRED, f"missing services: {REQUIRED - set(services)}"


def test_service_keys_are_known(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        unknown = set(svc) - SERVICE_KEYS
        assert not unknown, f"service {name}: unknown keys {unknown}"
        assert "image" in svc or "build" in svc, f"service {name} has neither image nor build"
        if "restart" in svc:
            assert str(svc["restart"]) in RESTART, f"service {name}: restart {svc['restart']!r}"


def test_every_long_running_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name in REQUIRED:
        check = services[name].get("healthcheck")
        assert isinstance(check, dict), f"service {name} has no healthcheck"
        assert set(check) <= HEALTHCHECK_KEYS, f"service {name}: unknown healthcheck keys {set(check)}"
        test = check["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) >= 2, (name, test)
        for key in ("interval", "timeout", "start_period"):
            if key in check:
                assert DURATION.match(str(check[key])), f"service {name}: {key}={check[key]!r}"
        assert isinstance(check.get("retries", 3), int)


def test_depends_on_waits_for_health(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"service {name}: depends_on must use the long form with conditions"
        for dep, spec in deps.items():
            assert dep in services, f"service {name} depends on unknown service {dep}"
            assert spec["condition"] in CONDITIONS, f"service {name}: condition {spec['condition']!r}"
            if "healthcheck" in services[dep]:
                assert spec["condition"] == "service_healthy", f"{name} should wait for {dep} to be healthy"
    for worker in ("worker1", "worker2"):
        deps = services[worker]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["postgres"]["condition"] == "service_healthy"
    assert services["flower"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["dashboard"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_baton_services_point_at_redis_and_postgres(services: dict[str, dict[str, Any]]) -> None:
    for name in ("worker1", "worker2", "flower", "dashboard"):
        env = services[name]["environment"]
        assert env["CELERY_BROKER_URL"].startswith("redis://redis:6379/"), name
        assert env["BATON_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert "@postgres:5432/" in env["BATON_DATABASE_URL"], name
    pg = services["postgres"]["environment"]
    url = services["worker1"]["environment"]["BATON_DATABASE_URL"]
    assert url == (f"postgresql+psycopg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/"
                   f"{pg['POSTGRES_DB']}")
    # Workers share the directory the example generates repositories in.
    for name in ("worker1", "worker2"):
        assert any(str(v).endswith(":" + services[name]["environment"]["BATON_EXAMPLE_WORKSPACE"])
                   for v in services[name]["volumes"])


def test_published_ports_bind_localhost(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"service {name} publishes {port} beyond localhost"


def _app_module(args: list[str]) -> str:
    assert "-A" in args, args
    return args[args.index("-A") + 1].split(":")[0]


def test_commands_reference_real_modules_and_subcommands(services: dict[str, dict[str, Any]]) -> None:
    from sdk.cli import cli

    baton_commands = {c.name or (c.callback.__name__ if c.callback else "") for c in cli.registered_commands}
    checked = 0
    for name, svc in services.items():
        args = argv(svc.get("entrypoint")) + argv(svc.get("command"))
        if not args or args[0] not in ("celery", "baton"):
            continue
        module = _app_module(args)
        assert importlib.util.find_spec(module) is not None, f"service {name}: no module {module}"
        rest = args[args.index("-A") + 2:]
        if args[0] == "celery":
            assert rest[0] in {"worker", "inspect", "beat", "flower"}, (name, rest)
        else:
            sub = rest[0] if rest and not svc.get("entrypoint") else argv(svc.get("command"))[0]
            assert sub in baton_commands, f"service {name}: `baton {sub}` is not a command of sdk/cli.py"
        checked += 1
    assert checked >= 5
    for name in ("worker1", "worker2"):
        check = " ".join(services[name]["healthcheck"]["test"][1:])
        assert f"-A {_app_module(argv(services[name]['command']))} inspect ping" in check


def test_dockerfile_copies_what_exists_and_installs_baton(services: dict[str, dict[str, Any]]) -> None:
    assert all(svc.get("build", ".") == "." for svc in services.values() if "build" in svc)
    text = DOCKERFILE.read_text()
    assert text.lstrip().startswith("#") or text.lstrip().startswith("FROM")
    copies = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    copied = {src for sources in copies for src in sources}
    for package in ("sdk", "tasks", "persistence", "dashboards", "examples"):
        assert package in copied, f"the image lacks {package}/"
    assert re.search(r"^RUN pip install (-e )?\.", text, re.M)
    assert "PYTHONPATH=/app" in text
