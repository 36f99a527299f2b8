"""The Node.js cassandra-driver against the emulator, with and without Scylla's keys.

Runs tests/node/check.js under `node`; skipped unless `node` is on PATH and
the npm package is installed (`npm ci --prefix tests/node`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from coalesce.emulator import EmulatorThread

pytestmark = pytest.mark.timeout(90)

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
NODE = shutil.which("node")

if NODE is None:
    pytest.skip("node is not installed", allow_module_level=True)
if not (NODE_DIR / "node_modules" / "cassandra-driver").is_dir():
    pytest.skip(
        "the npm package is not installed: npm ci --prefix tests/node", allow_module_level=True
    )


@pytest.mark.parametrize("shard_aware", [False, True], ids=["plain", "shard-aware"])
def test_node_driver_writes_and_reads_back_ignoring_scyllas_keys(shard_aware: bool) -> None:
    assert NODE is not None
    with EmulatorThread(read_latency=0.0, per_row=0.0, shard_aware=shard_aware) as emu:
        done = subprocess.run(
            [NODE, str(NODE_DIR / "check.js"), emu.host, str(emu.port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["rows"] == [f"v{k}" for k in range(20)]
        assert report["protocolVersion"] == 4
        # Not shard-aware: its requests land on whatever shard its connection has.
        assert emu.wrong_shard_requests > 0
        assert emu.statements["select"] >= 20
