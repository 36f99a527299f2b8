"""The `coalesce` command: `coalesce bench herd`, `coalesce emulator`, `coalesce sidecar`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from coalesce._units import parse_address, parse_duration, positive_int

__all__ = ["main"]

def run_loop(main: Callable[[], Coroutine[Any, Any, int]], use_uvloop: bool) -> int:
    """Run `main` on the default asyncio loop, or on uvloop when asked."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            raise SystemExit("--uvloop needs uvloop: pip install 'coalesce[uvloop]'") from None
        return uvloop.run(main())
    return asyncio.run(main())


def _hosts(text: str) -> list[tuple[str, int]]:
    hosts = [parse_address(item) for item in text.split(",") if item.strip()]
    if not hosts:
        raise argparse.ArgumentTypeError("--hosts needs at least one HOST[:PORT]")
    return hosts


def _bench_herd(args: argparse.Namespace) -> int:
    from coalesce.bench import herd

    config = herd.HerdConfig(
        callers=args.callers, latency=args.latency, channels=args.channels, spread=args.spread
    )
    bar: Any = None

    def progress(mode: str, done: int, total: int) -> None:
        nonlocal bar
        if args.quiet or not sys.stderr.isatty():
            return
        from tqdm import tqdm

        if bar is None or bar.desc != mode:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, desc=mode, unit="caller", leave=False, file=sys.stderr)
        bar.update(done - bar.n)

    async def run(target: Any, reads: dict[str, Any]) -> list[Any]:
        results = await herd.run_herd(config, target, reads, progress=progress)
        if bar is not None:
            bar.close()
        return results

    async def main() -> int:
        target_name = "scylla" if args.hosts else args.target
        if target_name == "inprocess":
            target: Any = herd.HotPartition(config.latency)
            reads = {"direct": target.read, "coalesced": herd.single_flight_read(target)}
            results = await run(target, reads)
        else:
            from coalesce.bench.scylla import ScyllaTarget

            async with ScyllaTarget(
                driver=args.driver, hosts=args.hosts, channels=args.channels,
                latency=config.latency, shards=args.shards,
            ) as target:
                reads = {"direct": target.read, "coalesced": await target.coalesced(1)}
                if args.instances > 1:
                    routings = ["hash", "random"] if args.routing == "both" else [args.routing]
                    for routing in routings:
                        label = f"coalesced x{args.instances} {routing}"
                        reads[label] = await target.coalesced(args.instances, routing)
                if args.no_direct:
                    del reads["direct"]
                results = await run(target, reads)
        where = {"inprocess": "an in-process hot partition", "emulator": "the built-in emulator",
                 "scylla": "a real cluster"}[target_name]
        title = (f"{config.callers:,} concurrent reads of {config.channels} hot channel(s) "
                 f"on {where}, {config.latency * 1e3:g} ms per read")
        print(title)
        print(herd.format_table(results))
        if args.json:
            herd.write_json(results, args.json, title=title, config=vars(config))
        if args.plot:
            herd.plot(results, args.plot, title)
            print(f"plot written to {args.plot}")
        return 0

    return run_loop(main, args.uvloop)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coalesce", description="Single-flight request coalescing in front of ScyllaDB."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="thundering-herd benchmarks")
    scenarios = bench.add_subparsers(dest="scenario", required=True)
    herd = scenarios.add_parser(
        "herd", help="N concurrent reads of one hot key, with and without coalescing"
    )
    herd.add_argument("--callers", type=positive_int, default=10_000,
                      help="concurrent callers (default 10,000)")
    herd.add_argument("--latency", type=parse_duration, default=0.001,
                      help="service time of one upstream read (default 1ms)")
    herd.add_argument("--target", choices=["emulator", "inprocess"], default="emulator",
                      help="emulator: the built-in Scylla emulator through a real driver "
                           "(default); inprocess: a bare in-process hot partition")
    herd.add_argument("--driver", choices=["cassandra-driver", "acsylla"],
                      default="cassandra-driver", help="driver for the emulator or --hosts")
    herd.add_argument("--hosts", type=_hosts,
                      help="a real cluster instead of the emulator: HOST[:PORT],...")
    herd.add_argument("--channels", type=positive_int, default=1,
                      help="hot channels; caller i reads channel i %% channels (default 1)")
    herd.add_argument("--instances", type=positive_int, default=1,
                      help="coalescing instances in front of the database (default 1)")
    herd.add_argument("--routing", choices=["hash", "random", "both"], default="both",
                      help="how callers pick an instance when --instances > 1")
    herd.add_argument("--shards", type=positive_int, default=4, help="emulator shards")
    herd.add_argument("--spread", type=parse_duration, default=0.0,
                      help="arrivals spread uniformly over this long (default: all at once)")
    herd.add_argument("--no-direct", action="store_true",
                      help="skip the uncoalesced run (it takes callers x latency)")
    herd.add_argument("--json", type=Path, help="write the results as JSON here")
    herd.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    herd.add_argument("--uvloop", action="store_true", help="run on uvloop")
    herd.add_argument("--quiet", action="store_true", help="no progress bar")
    herd.set_defaults(run=_bench_herd)

    from coalesce.emulator import command as emulator_command

    emulator = commands.add_parser(
        "emulator",
        help="run the Scylla emulator (a test and benchmark tool, not a database)",
        description=emulator_command.BANNER,
    )
    emulator_command.configure_parser(emulator)
    emulator.set_defaults(run=emulator_command.run)

    from coalesce.sidecar import command as sidecar_command

    sidecar = commands.add_parser(
        "sidecar", help="run the CQL proxy that merges identical concurrent reads"
    )
    sidecar_command.configure_parser(sidecar)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
