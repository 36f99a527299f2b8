"""The `coalesce` command: `coalesce bench herd`, `coalesce emulator`, `coalesce sidecar`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

from coalesce._units import parse_address, parse_duration, positive_int

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are its usage line and one line saying what is
    wrong (and where to read more): no traceback, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _CommandError(Exception):
    """A bad argument or an unusable target: `main` prints the message, exits `status`."""

    def __init__(self, message: str, *, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def _missing_extra(commands: Any, name: str, extra: str, exc: ImportError, **kwargs: Any) -> None:
    """Register `name` as a subcommand that only says which extra it needs."""

    def run(args: argparse.Namespace) -> int:
        raise _CommandError(f"needs {exc.name or 'a package'}, which is not installed: "
                            f"pip install 'coalesce[{extra}]'")

    sub = commands.add_parser(name, add_help=False, **kwargs)
    sub.set_defaults(run=run, parser=sub, any_arguments=True)

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


def _writable(flag: str, path: Path | None) -> None:
    """Fail now, not after the benchmark, if `path` cannot be written."""
    if path is None:
        return
    folder = path.parent
    if path.is_dir():
        raise _CommandError(f"{flag} {path}: is a folder; give a file name")
    if not folder.is_dir():
        raise _CommandError(f"{flag} {path}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise _CommandError(f"{flag} {path}: folder {str(folder)!r} is not writable")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _needs(module: str, what: str, extra: str) -> None:
    if not _installed(module):
        raise _CommandError(f"{what} needs {module}: pip install 'coalesce[{extra}]'")


def _check_herd_args(args: argparse.Namespace) -> None:
    if args.sidecars is not None and args.target != "sidecar":
        raise _CommandError("--sidecars goes with --target sidecar")
    if args.target == "sidecar":
        if args.hosts:
            raise _CommandError("--target sidecar starts its own emulator; it takes no --hosts")
        if args.sidecars is not None and args.sidecars < 2:
            raise _CommandError("--sidecars needs at least 2 (the ring and its baseline "
                                "of one sidecar)")
        _needs("lz4", "--target sidecar", "bench,sidecar")
    elif args.hosts or args.target == "emulator":
        if not args.hosts:
            _needs("lz4", "the built-in emulator", "bench")
        if not _installed("cassandra"):  # coalesce.bench.scylla imports it for either driver
            raise _CommandError(
                "a driver-backed herd needs cassandra-driver or scylla-driver: "
                "pip install 'coalesce[bench,cassandra]' (or 'coalesce[bench,scylla]'), "
                "or use --target inprocess"
            )
        if args.driver == "acsylla":
            _needs("acsylla", "--driver acsylla", "acsylla")
    if args.uvloop:
        _needs("uvloop", "--uvloop", "uvloop")
    if args.plot is not None:
        _needs("matplotlib", "--plot", "plot")
    _writable("--json", args.json)
    _writable("--plot", args.plot)


def _bench_herd(args: argparse.Namespace) -> int:
    from coalesce.bench import herd

    _check_herd_args(args)

    config = herd.HerdConfig(
        callers=args.callers, latency=args.latency, channels=args.channels, spread=args.spread
    )
    bar: Any = None

    def progress(mode: str, done: int, total: int) -> None:
        nonlocal bar
        if args.quiet or not sys.stderr.isatty() or not _installed("tqdm"):
            return
        from tqdm import tqdm

        if bar is None or bar.desc != mode:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, desc=mode, unit="caller", leave=False, file=sys.stderr)
        bar.update(done - bar.n)

    def bar_close() -> None:
        if bar is not None:
            bar.close()

    async def run(target: Any, reads: dict[str, Any]) -> list[Any]:
        results = await herd.run_herd(config, target, reads, progress=progress)
        bar_close()
        return results

    async def main() -> int:
        target_name = "scylla" if args.hosts else args.target
        if target_name == "sidecar":
            return await _sidecar_herd(args, config, progress, bar_close)
        if target_name == "inprocess":
            target: Any = herd.HotPartition(config.latency)
            reads = {"direct": target.read, "coalesced": herd.single_flight_read(target)}
            results = await run(target, reads)
        else:
            from coalesce.bench.scylla import ScyllaTarget, TargetUnreachable

            async with contextlib.AsyncExitStack() as stack:
                try:
                    target = await stack.enter_async_context(ScyllaTarget(
                        driver=args.driver, hosts=args.hosts, channels=args.channels,
                        latency=config.latency, shards=args.shards,
                    ))
                except TargetUnreachable as exc:
                    hosts = ",".join(f"{h}:{p}" for h, p in args.hosts or [])
                    raise _CommandError(f"--hosts {hosts}: {exc}" if hosts else str(exc),
                                        status=1) from None
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


async def _sidecar_herd(args: argparse.Namespace, config: Any,
                        progress: Callable[[str, int, int], None],
                        bar_close: Callable[[], None]) -> int:
    """`bench herd --target sidecar`: the four scenarios through sidecar processes.

    SIGTERM, like Ctrl-C, stops the run and every process it started.
    """
    from coalesce.bench import herd, sidecars
    from coalesce.bench.processes import ServerStartError
    from coalesce.bench.wire import CqlError

    try:
        setup = sidecars.SidecarHerdConfig(
            herd=config, sidecars=args.sidecars or 3, shards=args.shards, uvloop=args.uvloop)
    except ValueError as exc:
        raise _CommandError(str(exc)) from None
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        results = await sidecars.run_sidecar_herd(setup, progress=progress)
    except asyncio.CancelledError:
        if terminated:
            raise _CommandError("terminated", status=143) from None
        raise
    except (ServerStartError, CqlError, TimeoutError, KeyError) as exc:
        raise _CommandError(str(exc).strip("'\""), status=1) from None
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        bar_close()
    title = (f"{config.callers:,} concurrent reads of {config.channels} hot channel(s) "
             f"through {setup.sidecars} sidecar processes in front of the emulator, "
             f"{config.latency * 1e3:g} ms per read")
    print(title)
    print(sidecars.format_table(results))
    print(sidecars.format_goals(results, setup.sidecars))
    if args.json:
        herd.write_json(results, args.json, title=title, config=dataclasses.asdict(setup))
    if args.plot:
        herd.plot(results, args.plot, title)
        print(f"plot written to {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="coalesce", description="Single-flight request coalescing in front of ScyllaDB."
    )
    parser.add_argument("--version", action="version", version=f"coalesce {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = commands.add_parser("bench", help="thundering-herd benchmarks")
    scenarios = bench.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    herd = scenarios.add_parser(
        "herd", help="N concurrent reads of one hot key, with and without coalescing",
        usage="%(prog)s [--callers N] [--latency DURATION] "
              "[--target {emulator,inprocess,sidecar} | --hosts HOST[:PORT],...] [options]",
    )
    herd.add_argument("--callers", type=positive_int, default=10_000,
                      help="concurrent callers (default 10,000)")
    herd.add_argument("--latency", type=parse_duration, default=0.001,
                      help="service time of one upstream read (default 1ms)")
    herd.add_argument("--target", choices=["emulator", "inprocess", "sidecar"],
                      default="emulator",
                      help="emulator: the built-in Scylla emulator through a real driver "
                           "(default); inprocess: a bare in-process hot partition; "
                           "sidecar: sidecar processes in front of an emulator process, "
                           "as one sidecar, a ring (token-aware and round-robin clients) "
                           "and independent sidecars, loaded by raw pipelined CQL "
                           "connections (--driver, --instances, --routing do not apply)")
    herd.add_argument("--sidecars", type=positive_int, metavar="K",
                      help="with --target sidecar: sidecar processes of the ring and of "
                           "the independent run (default 3)")
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
    herd.add_argument("--uvloop", action="store_true",
                      help="run on uvloop (with --target sidecar, the sidecars too)")
    herd.add_argument("--quiet", action="store_true", help="no progress bar")
    herd.set_defaults(run=_bench_herd, parser=herd)

    emulator_help = "run the Scylla emulator (a test and benchmark tool, not a database)"
    try:
        from coalesce.emulator import command as emulator_command
    except ImportError as exc:  # the emulator extra (LZ4) is not installed
        _missing_extra(commands, "emulator", "emulator", exc, help=emulator_help)
    else:
        emulator = commands.add_parser(
            "emulator", help=emulator_help, description=emulator_command.BANNER,
            usage="%(prog)s [--listen HOST:PORT] [--shards N] [--read-latency DURATION] "
                  "[options]",
        )
        emulator_command.configure_parser(emulator)
        emulator.set_defaults(run=emulator_command.run, parser=emulator)

    sidecar_help = "run the CQL proxy that merges identical concurrent reads"
    try:
        from coalesce.sidecar import command as sidecar_command
    except ImportError as exc:  # the sidecar extra (LZ4) is not installed
        _missing_extra(commands, "sidecar", "sidecar", exc, help=sidecar_help)
    else:
        sidecar = commands.add_parser(
            "sidecar", help=sidecar_help,
            usage="%(prog)s --upstream HOST[:PORT],... [--listen HOST[:PORT]] [--config FILE] "
                  "[options]",
        )
        sidecar_command.configure_parser(sidecar)
        sidecar.set_defaults(parser=sidecar)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("coalesce")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``coalesce`` subcommand; returns its exit status.

    Bad arguments print the subcommand's usage and one line, exit 2; Ctrl-C prints one
    line and exits 130. Neither prints a traceback.
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "any_arguments", False):
        # reported by the subcommand they were given to, with its usage
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    prog = getattr(args, "parser", parser).prog
    try:
        return int(args.run(args))
    except _CommandError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
