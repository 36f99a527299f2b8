"""A ring of sidecars, simulated: upstream reads, moved channels and per-member load.

    python benchmarks/ring_sim.py [--quick] [--seed 1] [--check] [--json PATH] [--plot PATH]

The ring is the sidecar's own: every ownership and bounded-loads decision below is a
call on `coalesce.sidecar.members.SidecarRing` (`owner`, `update`, `choose`, `acquire`,
`release`), never a copy of its logic. Nothing else of the sidecar runs: no sockets, no
event loop, only the arithmetic of who reads what and when.

The model. ``--members`` sidecars (64) named ``10.0.<i/256>.<i%256>:9042`` and
``--channels`` partitions (1,000,000; channel ``i`` is the bigint partition key ``i``,
its token the Murmur3 token of those 8 bytes). ``--requests`` reads (1,500,000) arrive
as a Poisson process of ``--rate`` reads/s (1,000,000), each for a channel drawn from a
Zipf law of exponent ``--zipf`` (1.1; channel 0 is the hottest). A read arrives at a
member chosen uniformly at random (round-robin clients), or, in the token-aware
scenario, at the channel's owner. Every upstream read takes ``--latency`` (2 ms): a
read started at ``t`` is in flight until ``t + latency``, and a read of the same
channel arriving at the same member in that window joins it. At a member that does not
own the channel, the flight is one forward to the owner instead: it travels ``--hop``
(0.1 ms, one way), joins the owner's flight for that channel or starts one, and the
answer travels ``--hop`` back; reads arriving at the forwarding member meanwhile join
the forward. With ``--hop 0`` the ring reads exactly what the ideal instance reads.

Scenarios, all on the same arrivals: ``ideal`` (one sidecar receiving everything),
``independent`` (the members with no ring: each merges only what it receives),
``ring`` (forward to the owner), ``ring bounded`` (each member asks its *own*
`SidecarRing`, built with ``--load-factor``, whether to forward or to serve the read
itself, and acquires/releases on it: that member's view of the merged reads it has in
flight through each member, as the sidecar keeps it) and ``token-aware`` (reads
arrive at their owner; bounded loads change nothing there, since a member never
forwards a channel it owns).

Reported: upstream reads against the ideal instance, overall and for the hottest
channels; the load of each member, that is the merged reads in flight through it (its
own upstream reads plus the forwards in flight to it: the sum of every member's
`SidecarRing.load(name)`), at its peak and averaged over time, the most loaded member
against the mean; the requests each member answers (the reads its clients sent it plus
the forwards it answers as owner); and the channels (and the share of requests) that
change owner when one member joins or one leaves, computed with `update()` on a second
ring, against ``1/N``. The simulation is event-driven (a heap of forward arrivals and
completions, merged with the arrival stream) and deterministic for a ``--seed``.

Results go to stdout, ``--json`` (benchmarks/out/ring_sim.json) and ``--plot``
(benchmarks/out/ring_sim.png: per-member load with and without bounded loads).
``--quick`` (24 members with 64 positions each, 20,000 channels, 60,000 reads) runs in
about a second; the full run in about 45 s. ``--check`` exits 1 if a goal fails.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import heapq
import itertools
import json
import random
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from coalesce.cql.token import murmur3_token
from coalesce.sidecar.members import DEFAULT_VNODES, SidecarRing, member_name

__all__ = ["QUICK", "Plan", "ScenarioResult", "main", "moved_channels", "simulate"]

_OUT = Path(__file__).with_name("out")

# Heap events: (time, kind, member, channel, sender). The tuple is unique for a pending
# event (one flight per member and channel), so ordering never looks past it.
_DONE = 0  # an upstream read of `channel` at `member` completes
_FORWARD_DONE = 1  # the answer to `member`'s forward of `channel` arrives back
_FORWARD_ARRIVES = 2  # `sender`'s forward of `channel` arrives at its owner `member`


@dataclass(frozen=True)
class Plan:
    """One run: the ring, the workload, the latencies."""

    members: int = 64
    channels: int = 1_000_000
    requests: int = 1_500_000
    zipf: float = 1.1
    rate: float = 1_000_000.0
    latency_ms: float = 2.0
    hop_ms: float = 0.1
    load_factor: float = 1.25
    vnodes: int = DEFAULT_VNODES
    hot: int = 10
    seed: int = 1


QUICK: dict[str, Any] = {"members": 24, "channels": 20_000, "requests": 60_000, "vnodes": 64}
"""What ``--quick`` changes: a smoke run of about a second, which the test runs. Fewer
positions per member keep its 24 rings quick to build; 24 members (rather than fewer)
keep each member's bound on its own in-flight reads as small as in the full run."""


def _names(count: int, start: int = 0) -> list[str]:
    return [member_name(f"10.0.{i // 256}.{i % 256}", 9042) for i in range(start, start + count)]


def _key(channel: int) -> bytes:
    """Channel `channel`'s partition key: a CQL bigint."""
    return struct.pack(">q", channel)


# -- the workload ---------------------------------------------------------------------------


@dataclass
class Workload:
    """The arrivals every scenario replays, and what is known of each channel."""

    times: list[float]
    channels: list[int]
    random_members: list[int]
    weights: list[float]
    tokens: list[int]


def _workload(plan: Plan) -> Workload:
    rng = random.Random(plan.seed)
    weights = [(rank + 1) ** -plan.zipf for rank in range(plan.channels)]
    channels = rng.choices(range(plan.channels), cum_weights=list(itertools.accumulate(weights)),
                           k=plan.requests)
    expovariate, rate = rng.expovariate, plan.rate
    times: list[float] = []
    now = 0.0
    for _ in range(plan.requests):
        now += expovariate(rate)
        times.append(now)
    members = rng.choices(range(plan.members), k=plan.requests)
    tokens = [murmur3_token(_key(channel)) for channel in range(plan.channels)]
    return Workload(times, channels, members, weights, tokens)


def _owners(ring: SidecarRing, tokens: Sequence[int], index: dict[str, int]) -> list[int]:
    owners: list[int] = []
    owner = ring.owner
    for token in tokens:
        member = owner(token)
        assert member is not None
        owners.append(index[member.name])
    return owners


# -- one scenario ---------------------------------------------------------------------------


@dataclass
class ScenarioResult:
    """What one scenario did; per-member lists are indexed by member."""

    name: str
    upstream_reads: int
    hot_reads: list[int]
    forwards: int
    served_here: int
    reads: list[int]
    answered: list[int]
    peak_load: list[int]
    mean_load: list[float]
    seconds: float = 0.0

    def summary(self, ideal: ScenarioResult | None = None) -> dict[str, Any]:
        out = asdict(self)
        out["load_peak_max_over_mean"] = _max_over_mean(self.peak_load)
        out["load_time_avg_max_over_mean"] = _max_over_mean(self.mean_load)
        out["answered_max_over_mean"] = _max_over_mean(self.answered)
        out["reads_max_over_mean"] = _max_over_mean(self.reads)
        if ideal is not None:
            out["reads_over_ideal"] = self.upstream_reads / ideal.upstream_reads
            out["hottest_over_ideal"] = self.hot_reads[0] / ideal.hot_reads[0]
            out["hot_over_ideal"] = sum(self.hot_reads) / sum(ideal.hot_reads)
        return out


def _max_over_mean(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean else 0.0


def _run(name: str, plan: Plan, work: Workload, arrivals: Sequence[int], members: int,
         owners: Sequence[int] | None = None, rings: Sequence[SidecarRing] | None = None,
         names: Sequence[str] = ()) -> ScenarioResult:
    """Replay the arrivals at `members` members.

    Without `owners` every member merges on its own (ideal: one member; independent).
    With `owners`, a member forwards a channel it does not own to its owner; with
    `rings` as well (one `SidecarRing` per member, bounded loads on), the member's own
    ring decides: ``choose`` at the start of each flight, ``acquire`` for the member the
    flight goes through, ``release`` when it ends.
    """
    started = time.perf_counter()
    latency, hop, hot = plan.latency_ms / 1e3, plan.hop_ms / 1e3, plan.hot
    upstream: list[dict[int, float]] = [{} for _ in range(members)]  # channel -> end
    forwarding: list[dict[int, int]] = [{} for _ in range(members)]  # channel -> owner
    heap: list[tuple[float, int, int, int, int]] = []
    push, pop = heapq.heappush, heapq.heappop
    load, peak = [0] * members, [0] * members
    area, since = [0.0] * members, [0.0] * members
    reads, answered, hot_reads = [0] * members, [0] * members, [0] * hot
    forwards = served_here = 0
    tokens = work.tokens

    def charge(member: int, delta: int, now: float) -> None:
        area[member] += load[member] * (now - since[member])
        since[member] = now
        value = load[member] = load[member] + delta
        if value > peak[member]:
            peak[member] = value

    def start(member: int, channel: int, now: float) -> float:
        """An upstream read of `channel` at `member`; returns when it completes."""
        end = upstream[member][channel] = now + latency
        charge(member, 1, now)
        if rings is not None:
            rings[member].acquire(names[member])
        reads[member] += 1
        if channel < hot:
            hot_reads[channel] += 1
        push(heap, (end, _DONE, member, channel, member))
        return end

    def forward_arrives(owner: int, channel: int, sender: int, now: float) -> None:
        answered[owner] += 1
        end = upstream[owner].get(channel)
        if end is None:
            end = start(owner, channel, now)
        push(heap, (end + hop, _FORWARD_DONE, sender, channel, owner))

    def handle(event: tuple[float, int, int, int, int]) -> None:
        now, kind, member, channel, other = event
        if kind == _DONE:
            del upstream[member][channel]
            charge(member, -1, now)
            if rings is not None:
                rings[member].release(names[member])
        elif kind == _FORWARD_DONE:
            del forwarding[member][channel]
            charge(other, -1, now)
            if rings is not None:
                rings[member].release(names[other])
        else:
            forward_arrives(member, channel, other, now)

    for now, member, channel in zip(work.times, arrivals, work.channels, strict=True):
        while heap and heap[0][0] <= now:
            handle(pop(heap))
        answered[member] += 1
        if channel in upstream[member] or channel in forwarding[member]:
            continue  # joins this member's flight
        if owners is None:
            start(member, channel, now)
            continue
        owner = owners[channel]
        if rings is not None:
            chosen = rings[member].choose(tokens[channel])
            if chosen is None:
                served_here += owner != member
                owner = member
            elif chosen.name != names[owner]:
                raise AssertionError(f"{names[member]} sends {channel} to {chosen.name}, "
                                     f"the shared ring to {names[owner]}")
        if owner == member:
            start(member, channel, now)
            continue
        forwarding[member][channel] = owner
        charge(owner, 1, now)
        if rings is not None:
            rings[member].acquire(names[owner])
        forwards += 1
        if hop:
            push(heap, (now + hop, _FORWARD_ARRIVES, owner, channel, member))
        else:
            forward_arrives(owner, channel, member, now)
    end = work.times[-1]
    while heap:
        end = heap[0][0]
        handle(pop(heap))
    for member in range(members):
        charge(member, 0, end)
    if rings is not None:
        leaked = [ring.me for ring in rings if any(ring.load(n) for n in names)]
        assert not leaked, f"loads left after the run: {leaked}"
    return ScenarioResult(
        name, sum(reads), hot_reads, forwards, served_here, reads, answered, peak,
        [a / end for a in area], round(time.perf_counter() - started, 2))


# -- membership changes ---------------------------------------------------------------------


def moved_channels(plan: Plan, names: list[str], tokens: Sequence[int],
                   weights: Sequence[float], owners: Sequence[int]) -> dict[str, Any]:
    """Channels (and requests) changing owner when one member joins, and when one leaves.

    Each change is made with `update()` on a second ring built from the same names;
    `owners` are the channels' owners on the original ring (indexes into `names`).
    """
    total_weight = sum(weights)
    leaver = names[random.Random(plan.seed).randrange(len(names))]
    joiner = _names(1, start=len(names))[0]
    out: dict[str, Any] = {"members": len(names), "one_over_n": 1 / len(names)}
    for change, after_names, changed, expected in (
        ("join", [*names, joiner], joiner, 1 / (len(names) + 1)),
        ("leave", [n for n in names if n != leaver], leaver, 1 / len(names)),
    ):
        ring = SidecarRing(names[0], names, vnodes=plan.vnodes)
        added, removed = ring.update(after_names)
        assert [m.name for m in added + removed] == [changed], (added, removed)
        moved = 0
        moved_weight = 0.0
        only_changed = True
        for channel, token in enumerate(tokens):
            member = ring.owner(token)
            assert member is not None
            before = names[owners[channel]]
            if member.name != before:
                moved += 1
                moved_weight += weights[channel]
                only_changed &= changed in (member.name, before)
        out[change] = {
            "member": changed,
            "moved_channels": moved,
            "moved_fraction": moved / len(tokens),
            "moved_request_share": moved_weight / total_weight,
            "expected_fraction": expected,
            "only_the_changed_member": only_changed,
        }
    return out


# -- the run --------------------------------------------------------------------------------


def simulate(plan: Plan) -> dict[str, Any]:
    """Every scenario on the same arrivals, the membership changes, and the goals."""
    started = time.perf_counter()
    work = _workload(plan)
    names = _names(plan.members)
    index = {name: i for i, name in enumerate(names)}
    shared = SidecarRing(names[0], names, vnodes=plan.vnodes)
    owners = _owners(shared, work.tokens, index)
    token_aware = [owners[channel] for channel in work.channels]
    rings = [SidecarRing(name, names, vnodes=plan.vnodes, load_factor=plan.load_factor)
             for name in names]
    setup = time.perf_counter() - started

    ideal = _run("ideal", plan, work, [0] * plan.requests, 1)
    scenarios = [
        ideal,
        _run("independent", plan, work, work.random_members, plan.members),
        _run("ring", plan, work, work.random_members, plan.members, owners),
        _run("ring bounded", plan, work, work.random_members, plan.members, owners, rings,
             names),
        _run("token-aware", plan, work, token_aware, plan.members, owners),
    ]
    summaries = {s.name: s.summary(ideal) for s in scenarios}
    moved = moved_channels(plan, names, work.tokens, work.weights, owners)
    ring, bounded = summaries["ring"], summaries["ring bounded"]
    n = plan.members
    goals = [
        _goal("ring reads / ideal reads", ring["reads_over_ideal"], "<= 1.2",
              ring["reads_over_ideal"] <= 1.2),
        _goal("ring bounded reads / ideal reads", bounded["reads_over_ideal"], "<= 1.2",
              bounded["reads_over_ideal"] <= 1.2),
        _goal("token-aware reads / ideal reads", summaries["token-aware"]["reads_over_ideal"],
              "<= 1.2", summaries["token-aware"]["reads_over_ideal"] <= 1.2),
        _goal("independent hottest channel / ideal", summaries["independent"]
              ["hottest_over_ideal"], f"about K = {n}", None),
        _goal("moved on join x N", moved["join"]["moved_fraction"] * n, "0.5 .. 2",
              0.5 / n <= moved["join"]["moved_fraction"] <= 2 / n),
        _goal("moved on leave x N", moved["leave"]["moved_fraction"] * n, "0.5 .. 2",
              0.5 / n <= moved["leave"]["moved_fraction"] <= 2 / n),
        _goal("bounded / plain: peak load max/mean", bounded["load_peak_max_over_mean"]
              / ring["load_peak_max_over_mean"], "< 1", None),
        _goal("bounded / plain: avg load max/mean", bounded["load_time_avg_max_over_mean"]
              / ring["load_time_avg_max_over_mean"], "< 1", None),
        _goal("bounded: extra reads / ideal reads",
              (bounded["upstream_reads"] - ring["upstream_reads"]) / ideal.upstream_reads,
              "small", None),
    ]
    return {
        "plan": asdict(plan),
        "setup_seconds": round(setup, 2),
        "seconds": round(time.perf_counter() - started, 2),
        "scenarios": summaries,
        "moved": moved,
        "goals": goals,
    }


def _goal(name: str, value: float, goal: str, ok: bool | None) -> dict[str, Any]:
    verdict = "-" if ok is None else ("PASS" if ok else "FAIL")
    return {"name": name, "value": value, "goal": goal, "verdict": verdict}


# -- output ---------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> str:
    plan = Plan(**results["plan"])
    lines = [
        f"{plan.members} sidecars, {plan.channels:,} channels (Zipf s={plan.zipf}), "
        f"{plan.requests:,} reads at {plan.rate:,.0f}/s (Poisson), read latency "
        f"{plan.latency_ms} ms, hop {plan.hop_ms} ms, vnodes {plan.vnodes}, "
        f"load_factor {plan.load_factor}, seed {plan.seed}",
        "",
        f"{'scenario':<13} {'upstream':>9} {'x ideal':>8} {'hottest':>8} "
        f"{f'top {plan.hot}':>7} {'forwards':>9} {'served':>7} {'load avg':>9} "
        f"{'load peak':>10} {'answered':>9} {'reads':>6}",
        f"{'':<13} {'reads':>9} {'':>8} {'x ideal':>8} {'x ideal':>7} {'':>9} "
        f"{'here':>7} {'max/mean':>9} {'max/mean':>10} {'max/mean':>9} {'max/mn':>6}",
    ]
    for name, s in results["scenarios"].items():
        multi = name != "ideal"
        lines.append(
            f"{name:<13} {s['upstream_reads']:>9,} {s['reads_over_ideal']:>7.3f}x "
            f"{s['hottest_over_ideal']:>7.2f}x {s['hot_over_ideal']:>6.2f}x "
            f"{s['forwards']:>9,} {s['served_here']:>7,} "
            + (f"{s['load_time_avg_max_over_mean']:>9.2f} "
               f"{s['load_peak_max_over_mean']:>10.2f} {s['answered_max_over_mean']:>9.2f} "
               f"{s['reads_max_over_mean']:>6.2f}" if multi else f"{'-':>9} {'-':>10} "
               f"{'-':>9} {'-':>6}"))
    lines += [
        "load: merged reads in flight through a member (its own upstream reads plus the "
        "forwards in flight to it);",
        "served here: reads a non-owner served itself because its ring's bound said so; "
        "answered: client reads + forwards answered",
        "",
    ]
    moved = results["moved"]
    lines.append(f"{'membership change':<22} {'channels moved':>15} {'fraction':>9} "
                 f"{'expected':>9} {'1/N':>8} {'request share':>14}  only that member")
    for change in ("join", "leave"):
        m = moved[change]
        lines.append(
            f"{change + ' ' + m['member']:<22} {m['moved_channels']:>15,} "
            f"{m['moved_fraction']:>9.4f} {m['expected_fraction']:>9.4f} "
            f"{moved['one_over_n']:>8.4f} {m['moved_request_share']:>14.4f}  "
            f"{m['only_the_changed_member']}")
    lines += ["", f"{'ratio':<40} {'value':>9}  {'goal':<14} verdict"]
    for g in results["goals"]:
        lines.append(f"{g['name']:<40} {g['value']:>9.3f}  {g['goal']:<14} {g['verdict']}")
    lines.append(f"({results['seconds']:.1f} s, of which setup {results['setup_seconds']:.1f} s)")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Per-member load, peak load and requests answered, with and without bounded loads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["scenarios"]
    ring, bounded, aware = s["ring"], s["ring bounded"], s["token-aware"]
    order = sorted(range(len(ring["mean_load"])), key=lambda i: -ring["mean_load"][i])
    x = range(1, len(order) + 1)
    fig, panels = plt.subplots(1, 3, figsize=(15, 4.4))
    for panel, key, title in zip(panels, ("mean_load", "peak_load", "answered"), (
            "merged reads in flight, time-averaged", "merged reads in flight, peak",
            "requests answered (clients + forwards)"), strict=True):
        for scenario, label, style in ((ring, "ring", "-"),
                                       (bounded, f"ring, load_factor "
                                        f"{results['plan']['load_factor']}", "-"),
                                       (aware, "token-aware clients", ":")):
            values = [scenario[key][i] for i in order]
            mean = sum(values) / len(values)
            panel.plot(x, values, style, label=f"{label} (max/mean {max(values) / mean:.2f})")
        if key == "answered":
            panel.set_yscale("log")  # token-aware clients pile onto the hot channels' owners
        panel.set_xlabel("member (by its time-averaged load on the plain ring)")
        panel.set_title(title)
        panel.legend(fontsize=8)
    plan = results["plan"]
    fig.suptitle(f"{plan['members']} sidecars, {plan['channels']:,} channels, Zipf "
                 f"s={plan['zipf']}, {plan['requests']:,} reads: upstream reads x ideal: ring "
                 f"{ring['reads_over_ideal']:.3f}, bounded {bounded['reads_over_ideal']:.3f}, "
                 f"independent {s['independent']['reads_over_ideal']:.2f}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    return None


def main(argv: list[str] | None = None) -> int:
    defaults = Plan()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, kind, help_ in (
        ("--members", int, "sidecars"),
        ("--channels", int, "partitions"),
        ("--requests", int, "reads"),
        ("--zipf", float, "Zipf exponent of channel popularity"),
        ("--rate", float, "reads per second, a Poisson process"),
        ("--latency-ms", float, "one upstream read, ms"),
        ("--hop-ms", float, "from one sidecar to another, one way, ms"),
        ("--load-factor", float, "the bounded-loads scenario's load_factor"),
        ("--vnodes", int, "ring positions per member"),
        ("--seed", int, "seed of the arrivals and of the member that leaves"),
    ):
        name = flag[2:].replace("-", "_")
        default = getattr(defaults, name)
        if isinstance(default, float) and default.is_integer():
            default = int(default)
        quick = f", --quick {QUICK[name]:,}" if name in QUICK else ""
        parser.add_argument(flag, type=kind, default=None,
                            help=f"{help_} (default {default:,}{quick})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run of about a second: " + ", ".join(
                            f"{k} {v:,}" for k, v in QUICK.items()))
    parser.add_argument("--json", type=Path, default=_OUT / "ring_sim.json",
                        help="write results here (default benchmarks/out/ring_sim.json)")
    parser.add_argument("--plot", type=Path, default=_OUT / "ring_sim.png",
                        help="write the plot here (default benchmarks/out/ring_sim.png)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    parser.add_argument("--check", action="store_true", help="exit 1 if a goal fails")
    args = parser.parse_args(argv)

    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    overrides.update({name: value for name, value in vars(args).items()
                      if name in Plan.__dataclass_fields__ and value is not None})
    plan = replace(defaults, **overrides)
    results = simulate(plan)
    print(report(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _commit(), "quick": args.quick, **results}, indent=2) + "\n")
    if not args.no_plot:
        plot(results, args.plot)
    failed = any(g["verdict"] == "FAIL" for g in results["goals"])
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
