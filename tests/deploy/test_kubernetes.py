"""Kubernetes examples: valid resources, and the sidecar configured as each one needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import ROOT, sidecar_config

MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
K8S_VERSION = "1.30"  # native sidecar containers (restartPolicy: Always) need >= 1.29


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _by_kind(path: Path) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in _documents(path)}


def _validate(doc: dict[str, Any]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_there_are_both_examples() -> None:
    assert [p.name for p in MANIFESTS] == ["sidecar-in-pod.yaml", "sidecar-ring.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_are_valid_kubernetes_resources(path: Path) -> None:
    for doc in _documents(path):
        _validate(doc)


def test_the_validator_does_reject_an_unknown_field() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    doc = _by_kind(ROOT / "deploy" / "kubernetes" / "sidecar-ring.yaml")["Service"]
    broken = {**doc, "spec": {**doc["spec"], "clusterIPs_typo": "None"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)


def _probes_reach_healthz(container: dict[str, Any], metrics_port: int) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == metrics_port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # A restart cannot fix an unreachable Scylla: liveness only asks that the process serves.
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert container["securityContext"]["runAsNonRoot"] is True


def test_sidecar_in_the_application_pod_listens_on_loopback_for_the_app() -> None:
    pod = _by_kind(ROOT / "deploy" / "kubernetes" / "sidecar-in-pod.yaml")["Deployment"]
    spec = pod["spec"]["template"]["spec"]
    (sidecar,) = spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: up before the app
    env = {e["name"]: e["value"] for e in sidecar.get("env", [])}
    config = sidecar_config(sidecar["args"], environ=env)
    assert config.listen == ("127.0.0.1", 9042)
    assert config.metrics == ("0.0.0.0", 9100)
    assert config.drain_timeout < spec["terminationGracePeriodSeconds"]
    _probes_reach_healthz(sidecar, 9100)
    (app,) = spec["containers"]
    app_env = {e["name"]: e["value"] for e in app["env"]}
    assert (app_env["CQL_HOST"], int(app_env["CQL_PORT"])) == config.listen


def test_ring_of_sidecars_is_a_deployment_behind_a_headless_service() -> None:
    resources = _by_kind(ROOT / "deploy" / "kubernetes" / "sidecar-ring.yaml")
    service, deployment = resources["Service"], resources["Deployment"]
    assert service["spec"]["clusterIP"] == "None"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert resources["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= (
        labels.items()
    )
    spec = deployment["spec"]["template"]["spec"]
    (sidecar,) = spec["containers"]
    args = sidecar["args"]
    membership = args[args.index("--membership") + 1]
    assert membership == f"dns://{service['metadata']['name']}:9042"
    env = {e["name"]: e["value"] for e in sidecar["env"] if "value" in e}
    config = sidecar_config(args, environ=env)
    assert config.listen == ("0.0.0.0", 9042)
    assert config.metrics == ("0.0.0.0", 9100)
    assert config.advertise == "$(POD_IP)"
    assert config.drain_timeout < spec["terminationGracePeriodSeconds"]
    _probes_reach_healthz(sidecar, 9100)
