"""docker-compose.yml, Dockerfile and .env.example, checked as files (no Docker needed): pinned
images, a TCP health check, healthy-PostgreSQL dependencies, the GPU reservation, the right
driver in each URL, shared artifacts, read-only data, loopback-only ports, secrets from .env."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from fer_search.cli import run
from fer_search.config import load_config

ROOT = Path(__file__).resolve().parent.parent
# ${VAR}, ${VAR:-default}, ${VAR:?message} and friends; "$${VAR}" is an escaped, literal "${VAR}".
VARIABLE = re.compile(r"(?<!\$)\$\{(\w+)(?::?[-?+][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def interpolate(value: str, env: dict[str, str]) -> str:
    """What docker compose makes of a value, given .env (defaults and messages aside)."""
    return VARIABLE.sub(lambda m: env[m.group(1)], value).replace("$$", "$")


def mounts(service: dict[str, Any], env: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Container path -> (source, options) of a service's short-syntax volumes."""
    out = {}
    for spec in service.get("volumes", []):
        source, target, *options = interpolate(spec, env).split(":")
        out[target] = (source, ",".join(options))
    return out


def fleet_config(worker: dict[str, Any], env: dict[str, str]) -> tuple[Path, str]:
    """(the host file, its path in the container) of the worker's --config."""
    config = next(a.split("=", 1)[1] for a in worker["command"] if a.startswith("--config="))
    return ROOT / mounts(worker, env)[config][0], config


def image_is_pinned(image: str) -> bool:
    """A version tag (not latest) or a digest."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and any(c.isdigit() for c in tag)


def test_every_image_is_pinned(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" not in service:
            assert image_is_pinned(service["image"]), f"{name}: {service['image']} is not pinned"
    dockerfile = (ROOT / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert bases and all(image_is_pinned(b) for b in bases), bases


def test_dockerfile_installs_the_package_with_the_postgres_extra() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"pip install\s+[\"']?\.\[postgres\]", dockerfile)


def test_postgres_health_check_goes_over_tcp(services: dict[str, Any]) -> None:
    test = services["postgres"]["healthcheck"]["test"]
    command = test[-1] if isinstance(test, list) else test
    assert "pg_isready" in command
    assert re.search(r"-h\s+127\.0\.0\.1", command)  # the init phase's server answers on the socket only


def test_workers_and_dashboard_wait_for_a_healthy_postgres(services: dict[str, Any]) -> None:
    for name in ("worker", "dashboard"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy", name


def test_workers_reserve_the_gpu(services: dict[str, Any]) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_each_url_names_the_driver_its_image_has(services: dict[str, Any]) -> None:
    storage = services["worker"]["environment"]["FER_SEARCH_STORAGE"]
    assert storage.startswith("postgresql+psycopg://")  # the postgres extra is psycopg 3
    assert "@postgres:5432/" in storage
    # The dashboard image ships psycopg2 only and takes the URL as its argument, not from the environment.
    assert services["dashboard"]["command"][0].startswith("postgresql+psycopg2://")
    assert "@postgres:5432/" in services["dashboard"]["command"][0]


def test_worker_command_is_one_fer_search_run_accepts(services: dict[str, Any], env_example: dict[str, str]) -> None:
    command = [interpolate(a, env_example) for a in services["worker"]["command"]]
    assert command[0] == "run"
    run.make_context("run", command[1:])  # raises on an unknown flag or a bad value


def test_artifacts_live_on_a_volume_that_workers_and_dashboard_share(
    compose: dict[str, Any], services: dict[str, Any], env_example: dict[str, str]
) -> None:
    worker, dashboard = services["worker"], services["dashboard"]
    artifacts = str(load_config(fleet_config(worker, env_example)[0]).study.artifacts)
    volume, _ = mounts(worker, env_example)[artifacts]
    assert volume in compose["volumes"]  # a named volume, not a folder inside one container
    assert f"--artifact-dir={artifacts}" in dashboard["command"]
    assert mounts(dashboard, env_example)[artifacts][0] == volume


def test_data_and_fleet_config_are_mounted_read_only(services: dict[str, Any], env_example: dict[str, str]) -> None:
    worker = services["worker"]
    host_file, container_file = fleet_config(worker, env_example)
    worker_mounts = mounts(worker, env_example)
    assert worker_mounts[str(load_config(host_file).data.path)][1] == "ro"
    assert worker_mounts[container_file][1] == "ro"


def test_published_ports_are_loopback_only(services: dict[str, Any]) -> None:
    ports = [(name, p) for name, s in services.items() for p in s.get("ports", [])]
    assert ports
    for name, port in ports:
        assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port}"


def test_secrets_come_from_the_environment_never_a_command_line(services: dict[str, Any]) -> None:
    for key, value in services["postgres"]["environment"].items():
        assert VARIABLE.fullmatch(value), f"postgres {key} is a literal"
    commands = [" ".join(s.get("command", [])) for s in services.values()]
    assert not any("PASSWORD" in command for command in commands), commands
    for name in ("worker", "dashboard"):
        assert services[name]["environment"]["PGPASSWORD"] == "${POSTGRES_PASSWORD}"  # libpq reads it
    urls = [services["worker"]["environment"]["FER_SEARCH_STORAGE"], services["dashboard"]["command"][0]]
    for url in urls:
        assert "://${POSTGRES_USER}@" in url, url  # no password in the URL


def test_the_worker_takes_its_storage_from_the_environment(
    services: dict[str, Any], env_example: dict[str, str]
) -> None:
    worker = services["worker"]
    command = [interpolate(a, env_example) for a in worker["command"]]
    storage = interpolate(worker["environment"]["FER_SEARCH_STORAGE"], env_example)
    assert run.make_context("run", command[1:]).params["storage"] is None  # no --storage: the variable gives it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_SEARCH_STORAGE", storage)
        assert run.make_context("run", command[1:]).params["storage"] == storage


def test_env_example_defines_every_variable_the_compose_file_uses(env_example: dict[str, str]) -> None:
    used = set(VARIABLE.findall((ROOT / "docker-compose.yml").read_text()))
    assert used and used <= set(env_example), f"missing from .env.example: {sorted(used - set(env_example))}"


def test_real_env_file_is_kept_out_of_git_and_the_image() -> None:
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_postgres_keeps_its_data_on_a_named_volume(compose: dict[str, Any], services: dict[str, Any]) -> None:
    volume, _ = mounts(services["postgres"], {})["/var/lib/postgresql/data"]
    assert volume in compose["volumes"]  # named, so `docker compose down` keeps the studies


def test_the_dashboard_is_optunas_own_image(services: dict[str, Any]) -> None:
    assert services["dashboard"]["image"].startswith("ghcr.io/optuna/optuna-dashboard:")


def test_workers_can_be_scaled(services: dict[str, Any]) -> None:
    """`--scale worker=N` needs a service with no fixed container name and no published port."""
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["stop_signal"] == "SIGINT"  # fer-search's Ctrl-C: the running trial is queued again
