"""deploy/kubernetes/ holds example manifests: check they run what Pulse
accepts (roles, config keys and values, PULSE_* variables, probe ports,
grace periods), so they cannot drift from the code."""

from __future__ import annotations

from pathlib import Path

import pytest

from pulsed.config import parse_config
from pulsed.standalone import ROLES

yaml = pytest.importorskip("yaml", reason="PyYAML (the dev extra) reads the manifests")

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def documents() -> list[dict]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def config_text() -> str:
    (config_map,) = [d for d in documents() if d["kind"] == "ConfigMap"]
    return config_map["data"]["pulse.toml"]


def deployments() -> dict[str, dict]:
    found = {}
    for doc in documents():
        if doc["kind"] == "Deployment":
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            args = container["args"]
            found[args[args.index("--role") + 1]] = doc
    return found


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "from-secret-" + e["name"]) for e in container.get("env", [])}


def test_there_is_one_deployment_per_role_and_schedulers_are_redundant():
    found = deployments()
    assert set(found) == set(ROLES)
    assert found["scheduler"]["spec"]["replicas"] >= 2


@pytest.mark.parametrize("role", ROLES)
def test_each_role_s_config_and_variables_are_accepted(role):
    doc = deployments()[role]
    pod = doc["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:3] == ["pulsed", "--config", "/etc/pulsed/pulse.toml"]
    env = {"PULSE_DATABASE_URL": "postgresql://pulse@db/pulse", **{
        k: v for k, v in env_of(container).items() if k != "PULSE_DATABASE_URL"}}
    config = parse_config(tomllib.loads(config_text()), env=env)  # raises on anything unknown
    assert pod["terminationGracePeriodSeconds"] > config.daemon.stop_timeout
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    listen = config.api.listen if role == "api" else config.daemon.health_listen
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in ("/healthz", "/readyz")
        assert ports[get["port"]] == int(listen.rsplit(":", 1)[1])
    assert listen.startswith("0.0.0.0:"), "a kubelet probe cannot reach loopback"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["config"] == "/etc/pulsed"


def test_workers_drain_before_they_stop():
    (container,) = deployments()["worker"]["spec"]["template"]["spec"]["containers"]
    command = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert "kill -TERM 1" in command  # TERM is the drain for a lone worker


def test_the_service_points_at_the_api_port():
    (service,) = [d for d in documents() if d["kind"] == "Service"]
    assert service["spec"]["selector"] == {"app": "pulse", "role": "api"}
    assert service["spec"]["ports"][0]["targetPort"] == "http"
