"""`coalesce bench herd --target sidecar`, small: the ring's reads, and no process left.

A tiny herd (a few hundred callers, 4 channels, 3 sidecars) through real processes:
the same code path as the full benchmark in a few seconds. The emulator's read
latency (50 ms) is long enough on a loaded 2-core machine for every caller of a
herd to find its channel's read in flight, so the counts below are properties of the
ring, not of the machine's speed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coalesce.bench.herd import HerdConfig
from coalesce.bench.sidecars import (
    RING_GOAL,
    SidecarHerdConfig,
    SidecarHerdResult,
    run_sidecar_herd,
)

pytestmark = pytest.mark.timeout(60)

CHANNELS = 4
CALLERS = 600
SIDECARS = 3
SLACK = 2  # reads: a forward may reach its owner just after the owner's read ended


@pytest.fixture(scope="module")
def results() -> list[SidecarHerdResult]:
    config = SidecarHerdConfig(
        herd=HerdConfig(callers=CALLERS, latency=0.050, channels=CHANNELS),
        sidecars=SIDECARS, connections=4,
    )
    return asyncio.run(run_sidecar_herd(config))


def by_mode(results: list[SidecarHerdResult]) -> dict[str, SidecarHerdResult]:
    return {r.mode.split(" x")[0]: r for r in results}


def test_every_scenario_answers_every_caller_without_errors(
    results: list[SidecarHerdResult],
) -> None:
    assert [r.mode for r in results] == [
        "one sidecar", f"ring, token-aware x{SIDECARS}", f"ring, round-robin x{SIDECARS}",
        f"independent x{SIDECARS}"]
    for r in results:
        assert r.errors == 0, r.first_error
        assert len(r.latencies_ms) == CALLERS
        assert r.fallbacks == 0  # no owner failed


def test_one_sidecar_merges_each_channel_into_one_read(
    results: list[SidecarHerdResult],
) -> None:
    one = by_mode(results)["one sidecar"]
    assert CHANNELS <= one.upstream_reads <= CHANNELS + SLACK
    assert one.sidecars == 1 and one.ratio == 1.0


def test_a_ring_reads_at_most_the_goal_times_one_sidecar(
    results: list[SidecarHerdResult],
) -> None:
    scenarios = by_mode(results)
    one = scenarios["one sidecar"].upstream_reads
    for name in ("ring, token-aware", "ring, round-robin"):
        assert scenarios[name].upstream_reads <= RING_GOAL * one + SLACK, scenarios[name]


def test_independent_sidecars_read_more_than_the_ring(results: list[SidecarHerdResult]) -> None:
    scenarios = by_mode(results)
    independent = scenarios["independent"]
    assert independent.sidecars == SIDECARS
    for name in ("ring, token-aware", "ring, round-robin"):
        assert independent.upstream_reads > scenarios[name].upstream_reads
    # each sidecar reads each channel itself
    assert independent.upstream_reads >= SIDECARS * CHANNELS


def test_token_aware_callers_reach_the_owner_and_round_robin_ones_are_forwarded_per_flight(
    results: list[SidecarHerdResult],
) -> None:
    scenarios = by_mode(results)
    aware, spread = scenarios["ring, token-aware"], scenarios["ring, round-robin"]
    # The tokens each member advertises in system.local are the ones it owns.
    assert aware.to_owner == 0
    # Each non-owner sends a channel's read to its owner once per flight, not per caller:
    # every member saw callers of every channel, and owns about 1/K of them.
    assert CHANNELS <= spread.to_owner <= CHANNELS * (SIDECARS - 1) * 2
    assert spread.for_member == spread.to_owner
    assert spread.forwarded_share < 0.05


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize(("sig", "status", "says"), [
    (signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_mid_run_stops_every_server_it_started(
    tmp_path: Path, sig: signal.Signals, status: int, says: str,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COALESCE_SIDECAR_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "coalesce", "bench", "herd", "--target", "sidecar",
         "--sidecars", "3", "--callers", "300", "--channels", "4", "--latency", "20ms",
         "--quiet"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen: set[int] = set()
        deadline = time.monotonic() + 30
        while len(seen) < 3 and proc.poll() is None and time.monotonic() < deadline:
            seen |= _children(proc.pid)  # the emulator, then the sidecars
            time.sleep(0.02)
        assert len(seen) >= 3, "the emulator and two sidecars never started"
        proc.send_signal(sig)  # to the benchmark alone: its servers have their own sessions
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, stderr
    assert stderr.strip().endswith(f"coalesce bench herd: {says}"), stderr
    assert "Traceback" not in stderr
    assert "scenario" not in stdout  # interrupted before any table
    assert not [pid for pid in seen if _alive(pid)]
