"""The Dockerfile: hadolint-clean, non-root, `coalesce sidecar`, and a health check that works."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coalesce.emulator import EmulatorThread
from tests.deploy.conftest import ROOT, run_tool, sidecar_config, tool

DOCKERFILE = ROOT / "Dockerfile"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    steps = _instructions(DOCKERFILE)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def _healthcheck_argv() -> list[str]:
    (args,) = [rest for word, rest in _final_stage() if word == "HEALTHCHECK"]
    argv: list[str] = json.loads(args.split(" CMD ", 1)[1])
    return argv


def test_dockerfile_passes_hadolint() -> None:
    result = run_tool(tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_fail_a_dockerfile_with_an_unpinned_cached_pip_install(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install lz4\n")
    result = run_tool(tool("hadolint"), "--no-color", str(bad))
    assert result.returncode != 0
    assert "DL3013" in result.stdout and "DL3042" in result.stdout


def test_image_is_python_slim_and_runs_the_sidecar_as_a_non_root_user() -> None:
    steps = _final_stage()
    assert steps[0] == ("FROM", "python:3.11-slim")
    (user,) = [rest for word, rest in steps if word == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can check it
    (entrypoint,) = [rest for word, rest in steps if word == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["coalesce", "sidecar"]
    installs = " ".join(rest for word, rest in steps if word == "RUN")
    assert "--no-index" in installs  # never the unrelated "coalesce" on PyPI


def test_image_environment_is_a_valid_sidecar_configuration() -> None:
    env: dict[str, str] = {}
    for word, rest in _final_stage():
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    config = sidecar_config(["--upstream", "scylla:9042"], environ=env)
    assert config.listen == ("0.0.0.0", 9042)
    assert config.uvloop is True
    # The health check asks the default metrics address, from inside the container.
    assert config.metrics == ("127.0.0.1", 9100)
    assert "http://127.0.0.1:9100/healthz" in " ".join(_healthcheck_argv())


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    lines = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for word, rest in _instructions(DOCKERFILE):
        if word == "COPY" and not rest.startswith("--from"):
            copied.update(part.rstrip("/") for part in rest.split()[:-1])
    assert copied == allowed
    # The build needs what pyproject.toml names besides the package itself.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {"pyproject.toml", "coalesce", project["readme"], *project["license-files"]} <= copied


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _healthz_status(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    argv = [part.replace("127.0.0.1:9100", f"127.0.0.1:{port}") for part in _healthcheck_argv()]
    assert argv[0] == "python"
    return subprocess.run(
        [sys.executable, *argv[1:]], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.fixture
def sidecar_process() -> Iterator[Callable[[str], int]]:
    """Start `coalesce sidecar` processes; returns each one's metrics port."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(upstream: str) -> int:
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "coalesce", "sidecar", "--listen", "127.0.0.1:0",
             "--upstream", upstream, "--metrics", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_for_status(port: int, expected: int) -> None:
    deadline = time.monotonic() + 30
    while (status := _healthz_status(port)) != expected:
        assert time.monotonic() < deadline, f"/healthz said {status}, waited for {expected}"
        time.sleep(0.05)  # polling the endpoint's state, not waiting for time to pass


def test_healthcheck_passes_while_the_sidecar_reaches_scylla(
    emulator_thread: EmulatorThread, sidecar_process: Callable[[str], int]
) -> None:
    port = sidecar_process(f"{emulator_thread.host}:{emulator_thread.port}")
    _wait_for_status(port, 200)
    result = _healthcheck(port)
    assert result.returncode == 0, result.stderr


def test_healthcheck_fails_when_scylla_is_unreachable_or_the_sidecar_is_down(
    sidecar_process: Callable[[str], int],
) -> None:
    port = sidecar_process(f"127.0.0.1:{_free_port()}")
    _wait_for_status(port, 503)
    assert _healthcheck(port).returncode != 0
    assert _healthcheck(_free_port()).returncode != 0
