"""docker-compose.yml (no Docker engine runs in CI): every pneumoscreen service
runs a real command with options that parse, configured by environment only."""

from __future__ import annotations

import re
from pathlib import Path

import click
import yaml

from worker.cli import cli
from worker.settings import Settings

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.yml"


def _services():
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _resolve(args: list[str]) -> click.Command:
    """Find the command ``pneumoscreen ARGS`` names and parse its options, without running it."""
    command, path, rest = cli, ["pneumoscreen"], list(args)
    while isinstance(command, click.Group):
        assert rest and rest[0] in command.commands, f"{args}: no command {rest[:1]} under {' '.join(path)}"
        path.append(rest[0])
        command, rest = command.commands[rest[0]], rest[1:]
    command.make_context(" ".join(path), rest)  # raises on an unknown option or bad value
    return command


def test_expected_services_are_present():
    assert {"redis", "postgres", "listener", "preprocess-worker", "inference-worker", "beat", "api"} <= set(_services())


def test_every_pneumoscreen_service_runs_a_real_command():
    commands = {name: s["command"] for name, s in _services().items() if s.get("command", [""])[0] == "pneumoscreen"}
    assert {"listener", "preprocess-worker", "inference-worker", "beat", "migrate", "api"} <= set(commands)
    for name, command in commands.items():
        assert callable(_resolve(command[1:]).callback), name


def test_services_are_configured_by_environment_only():
    for name, service in _services().items():
        if service.get("command", [""])[0] != "pneumoscreen":
            continue
        env = service["environment"]
        assert env["PNEUMOSCREEN_BROKER_URL"].startswith("redis://"), name
        assert env["PNEUMOSCREEN_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert "${POSTGRES_PASSWORD" in env["PNEUMOSCREEN_DATABASE_URL"], f"{name}: secret must come from the environment"


def test_inference_worker_reserves_a_gpu_and_consumes_inference():
    service = _services()["inference-worker"]
    [device] = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "inference" in service["command"][service["command"].index("--queues") + 1].split(",")


def test_listener_open_to_the_network_requires_an_allow_list():
    env = _services()["listener"]["environment"]
    assert env["PNEUMOSCREEN_HOST"] == "0.0.0.0"
    assert "PNEUMOSCREEN_ALLOWED_AES" in env and ":?" in env["PNEUMOSCREEN_ALLOWED_AES"]


def test_api_token_and_report_destination_come_from_the_environment():
    services = _services()
    assert ":?" in services["api"]["environment"]["PNEUMOSCREEN_API_TOKEN"]
    assert services["api"]["ports"] == ["127.0.0.1:8080:8080"]
    # the preprocess workers (maintenance queue) send the reports, from the spool beside them
    assert "maintenance" in services["preprocess-worker"]["command"][3].split(",")
    assert "PNEUMOSCREEN_RESULTS_DESTINATION" in services["preprocess-worker"]["environment"]


def test_the_compose_file_repeats_no_default_of_the_settings():
    """A value the compose file gives only when the shell has none must differ from the application's
    default: the defaults live in one place (the settings)."""
    fallbacks = re.findall(r"\$\{PNEUMOSCREEN_([A-Z_]+):-([^}]*)\}", COMPOSE.read_text())
    for name, fallback in fallbacks:
        default = Settings.model_fields[name.lower()].default
        assert str(default) != fallback, f"PNEUMOSCREEN_{name}: the compose file repeats the default {fallback!r}"
