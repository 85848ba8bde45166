"""The README, Procfile and docker-compose.yml agree with the code."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from app.config import Config

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
    assert set(env) <= known
