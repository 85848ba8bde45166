"""The README, Procfile and docker-compose.yml agree with the code."""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import celeryconfig
from app.config import Config
from tasks.stream import LEASE_PREFIX

ROOT = Path(__file__).resolve().parent.parent


def _procfile() -> dict[str, list[str]]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, command = line.split(":", 1)
            entries[name] = shlex.split(command)
    return entries


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _normalise(command: list[str]) -> list[str]:
    # Settings may be spelled with env defaults in compose (${X:-default}) and $X in Procfile.
    return [part.split("=")[0] if "${" in part else part for part in command]


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name, _, _ in Config.documented() if f"`{name}`" not in readme]
    assert missing == []


def test_readme_opens_with_the_two_commands():
    head = (ROOT / "README.md").read_text()[:1200]
    assert "make run" in head
    assert "make test" in head


@pytest.mark.parametrize(
    ("proc", "service"),
    [
        ("web", "api"),
        ("consumer", "stream-consumer"),
        ("worker", "worker"),
        ("channels", "channels-worker"),
        ("beat", "beat"),
        ("flower", "flower"),
    ],
)
def test_compose_service_runs_the_same_command_as_make_run(proc, service):
    compose_cmd = _compose()["services"][service]["command"]
    assert _normalise(compose_cmd) == _normalise(_procfile()[proc])


def test_compose_services_wait_for_healthy_stores_and_migrations():
    services = _compose()["services"]
    for name in ("api", "stream-consumer", "worker", "beat", "flower"):
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["flask", "--app", "wsgi", "db", "upgrade"]
    assert "--appendonly" in services["redis"]["command"]


def test_compose_app_settings_name_real_settings():
    env = _compose()["services"]["api"]["environment"]
    known = {name for name, _, _ in Config.documented()}
    # and the process settings gunicorn.conf.py reads (BIND_HOST, WEB_CONCURRENCY, ...)
    known |= set(re.findall(r"environ\.get\([\"'](\w+)", (ROOT / "gunicorn.conf.py").read_text()))
    assert set(env) <= known


def _top_level_names(module: str) -> set[str]:
    tree = ast.parse((ROOT / f"{module.replace('.', '/')}.py").read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
    return names


def _option(command: list[str], *names: str) -> str | None:
    for i, part in enumerate(command):
        for name in names:
            if part == name and i + 1 < len(command):
                return command[i + 1]
            if part.startswith(name + "="):
                return part.split("=", 1)[1]
    return None


def _copied_by_dockerfile() -> set[str]:
    copied: set[str] = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied |= set(line.split()[1:-1])
    return copied


def test_every_compose_command_points_at_a_module_and_entry_point_that_exist(app):
    queues = {q.name for q in celeryconfig.task_queues}
    copied = _copied_by_dockerfile()
    for name, service in _compose()["services"].items():
        command = service.get("command")
        if not command or name in ("postgres", "redis"):
            continue
        program = command[0]
        if program == "gunicorn":
            module, attr = command[-1].split(":")
            config = _option(command, "-c")
            assert (ROOT / config).is_file(), name
            assert config in copied, name
        elif program == "celery":
            module, attr = _option(command, "-A").rsplit(".", 1)
            assert command[command.index(_option(command, "-A")) + 1] in (
                "worker", "beat", "flower"
            ), name  # fmt: skip
            for queue in (_option(command, "-Q") or "").split(","):
                assert not queue or queue in queues, (name, queue)
        elif program == "flask":
            module, attr = _option(command, "--app"), "app"
            group, sub = command[-2:]
            assert sub in app.cli.commands[group].commands, name  # type: ignore[attr-defined]
        else:
            raise AssertionError(f"{name}: unknown program {program}")
        assert attr in _top_level_names(module), name
        assert f"{module}.py" in copied, name


def test_compose_workers_scale_and_flower_sits_behind_basic_auth():
    services = _compose()["services"]
    for name in ("worker", "channels-worker", "stream-consumer"):
        assert "container_name" not in services[name]
        assert "ports" not in services[name]  # `--scale worker=N` needs no port of its own
    assert any(part.startswith("--basic-auth=") for part in services["flower"]["command"])
    for name, service in services.items():
        if name != "migrate":  # a one-shot step: `service_completed_successfully` covers it
            assert service["healthcheck"]["test"], name
    consumer_check = services["stream-consumer"]["healthcheck"]["test"][-1]
    assert f"{LEASE_PREFIX}*" in consumer_check
    for name in ("worker", "channels-worker"):
        # The ping must name the node the command starts, or a healthy worker looks dead.
        node = _option(services[name]["command"], "-n").split("@")[0]
        assert f"-d {node}@$$HOSTNAME" in services[name]["healthcheck"]["test"][1], name
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendfsync") + 1] == "everysec"
    assert services["redis"]["volumes"]


def test_compose_consumer_healthcheck_passes_only_while_a_consumer_holds_its_lease(rdb, redis_url):
    check = _compose()["services"]["stream-consumer"]["healthcheck"]["test"]
    assert check[:2] == ["CMD", "python"]
    # The image's python has the project's packages; here that is this interpreter.
    command = [sys.executable, *check[2:]]
    env = {**os.environ, "REDIS_URL": redis_url}
    assert subprocess.run(command, env=env, timeout=60).returncode == 1
    rdb.set(f"{LEASE_PREFIX}consumer-1", "token", px=15_000)
    assert subprocess.run(command, env=env, timeout=60).returncode == 0
