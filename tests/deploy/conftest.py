"""Helpers for checking the deployment files without a Docker engine or a cluster."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from coalesce.sidecar.command import configure_parser
from coalesce.sidecar.config import SidecarConfig

ROOT = Path(__file__).resolve().parents[2]

# Flags the deployment examples use before the sidecar has them; each is removed
# from here when its flag lands (the examples are then parsed in full).
def sidecar_config(args: Sequence[str], environ: Mapping[str, str] | None = None) -> SidecarConfig:
    """The `SidecarConfig` that `coalesce sidecar ARGS` would run with under `environ`.

    Fails the test on a flag the sidecar does not know and raises `ConfigError` on a
    value it would refuse.
    """
    parser = argparse.ArgumentParser(prog="coalesce sidecar", exit_on_error=False)
    configure_parser(parser)
    parsed, unknown = parser.parse_known_args(list(args))
    flags = {item.split("=", 1)[0] for item in unknown if item.startswith("--")}
    assert not flags, f"unknown sidecar flags {sorted(flags)}"
    return SidecarConfig.from_sources(parsed, environ=dict(environ or {}))


def tool(name: str) -> str:
    """The path of a validator installed next to this interpreter (the dev extra)."""
    path = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return path


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
