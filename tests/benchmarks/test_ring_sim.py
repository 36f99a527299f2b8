"""benchmarks/ring_sim.py at the size of ``--quick``: the properties its full run reports.

The simulation runs in-process through its core function, `simulate`, on the ring code
the sidecar uses (`coalesce.sidecar.members.SidecarRing`); a few seconds in all.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ring_sim.py"


def _load() -> ModuleType:
    # benchmarks/ is a folder of scripts, not a package: load the file by its path.
    spec = importlib.util.spec_from_file_location("_bench_ring_sim", _SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


ring_sim = _load()
_TINY = {"members": 8, "channels": 5_000, "requests": 20_000, "vnodes": 64}


@pytest.fixture(scope="module")
def quick() -> dict[str, Any]:
    result: dict[str, Any] = ring_sim.simulate(ring_sim.Plan(**ring_sim.QUICK))
    return result


def test_the_ring_reads_within_1_2x_of_one_ideal_instance(quick: dict[str, Any]) -> None:
    scenarios = quick["scenarios"]
    assert scenarios["ring"]["reads_over_ideal"] <= 1.2
    assert scenarios["token-aware"]["reads_over_ideal"] <= 1.2
    assert scenarios["ring bounded"]["reads_over_ideal"] <= 1.2
    # Forwards happen (most reads arrive at a non-owner), one per flight, not per read.
    ring = scenarios["ring"]
    assert 0 < ring["forwards"] < ring_sim.QUICK["requests"]


def test_independent_sidecars_read_a_hot_channel_about_k_times(quick: dict[str, Any]) -> None:
    k = ring_sim.QUICK["members"]
    independent, ring = quick["scenarios"]["independent"], quick["scenarios"]["ring"]
    assert independent["hottest_over_ideal"] >= 0.5 * k
    assert independent["hot_over_ideal"] >= 0.25 * k
    assert ring["hottest_over_ideal"] <= 1.2
    assert independent["upstream_reads"] >= 1.5 * ring["upstream_reads"]


def test_one_member_joining_or_leaving_moves_about_1_over_n(quick: dict[str, Any]) -> None:
    n = ring_sim.QUICK["members"]
    for change in ("join", "leave"):
        moved = quick["moved"][change]
        assert 0.5 / n <= moved["moved_fraction"] <= 2 / n, (change, moved)
        assert moved["only_the_changed_member"], change


def test_bounded_loads_lower_the_most_loaded_member_at_a_cost(quick: dict[str, Any]) -> None:
    ring, bounded = quick["scenarios"]["ring"], quick["scenarios"]["ring bounded"]
    assert bounded["load_peak_max_over_mean"] < ring["load_peak_max_over_mean"]
    assert bounded["load_time_avg_max_over_mean"] < ring["load_time_avg_max_over_mean"]
    assert bounded["served_here"] > 0
    assert bounded["upstream_reads"] > ring["upstream_reads"]


def test_token_aware_clients_pile_requests_onto_the_hot_channels_owners(
        quick: dict[str, Any]) -> None:
    scenarios = quick["scenarios"]
    assert scenarios["token-aware"]["forwards"] == 0
    assert (scenarios["token-aware"]["answered_max_over_mean"]
            > 2 * scenarios["ring"]["answered_max_over_mean"])


def test_with_no_hop_the_ring_reads_exactly_what_one_instance_reads() -> None:
    result = ring_sim.simulate(replace(ring_sim.Plan(**_TINY), hop_ms=0.0))
    scenarios = result["scenarios"]
    assert scenarios["ring"]["upstream_reads"] == scenarios["ideal"]["upstream_reads"]
    assert scenarios["ring"]["hot_reads"] == scenarios["ideal"]["hot_reads"]


def test_one_seed_gives_one_result() -> None:
    def run(seed: int) -> dict[str, Any]:
        scenarios = ring_sim.simulate(ring_sim.Plan(**_TINY, seed=seed))["scenarios"]
        return {name: {k: v for k, v in s.items() if k != "seconds"}
                for name, s in scenarios.items()}

    assert run(3) == run(3)
    assert run(3) != run(4)
