"""docker-compose.yml: valid against the Compose specification, and wired as described."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.deploy.conftest import ROOT, run_tool, sidecar_config, tool

COMPOSE = ROOT / "docker-compose.yml"


def _services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def _check(path: Path) -> tuple[int, str]:
    result = run_tool(
        tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)
    )
    return result.returncode, result.stdout + result.stderr


def test_compose_file_follows_the_compose_specification() -> None:
    code, output = _check(COMPOSE)
    assert code == 0, output


def test_the_compose_check_does_reject_an_invalid_file(tmp_path: Path) -> None:
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  app:\n    image: x\n    depends_on:\n"
                   "      db:\n        condition: when_it_feels_like_it\n")
    code, _ = _check(bad)
    assert code != 0


def test_scylla_runs_small_and_the_sidecar_starts_once_it_is_healthy() -> None:
    services = _services()
    scylla = services["scylla"]
    assert scylla["image"].startswith("scylladb/scylla")
    command = scylla["command"]
    for flag, value in (("--smp", "1"), ("--memory", "1G"), ("--overprovisioned", "1")):
        assert command[command.index(flag) + 1] == value
    assert "healthcheck" in scylla
    assert services["sidecar"]["depends_on"]["scylla"]["condition"] == "service_healthy"


def test_sidecar_reaches_scylla_and_serves_metrics_beyond_its_container() -> None:
    sidecar = _services()["sidecar"]
    assert sidecar["build"] == "."
    config = sidecar_config(sidecar["command"])
    assert config.upstream == (("scylla", 9042),)
    assert config.listen == ("0.0.0.0", 9042)
    assert config.metrics == ("0.0.0.0", 9100)
    assert "127.0.0.1:9100:9100" in sidecar["ports"]


def test_application_uses_its_own_driver_against_the_sidecar() -> None:
    app = _services()["app"]
    assert app["environment"]["CQL_HOST"] == "sidecar"
    assert app["depends_on"]["sidecar"]["condition"] == "service_healthy"
    (mount,) = app["volumes"]
    source = mount.split(":")[0]
    assert (ROOT / source).is_file()
    assert "scylla-driver" in " ".join(app["command"])
