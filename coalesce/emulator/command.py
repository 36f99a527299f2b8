"""`coalesce emulator`: run the emulator from the command line.

    coalesce emulator --listen 127.0.0.1:9042 [--shards N] [--read-latency 1ms]
                      [--write-latency 1ms] [--per-row 2us]
                      [--metrics 127.0.0.1:9100] [--auth]
                      [--shard-aware [--shard-aware-port PORT|none]]
                      [--cross-shard-latency 0]

`--shard-aware` makes the node look like Scylla to Scylla's drivers
(sharding keys in SUPPORTED, a shard-aware port; see
`coalesce.emulator.shard_awareness`); the port is printed at start-up and
drivers learn it from SUPPORTED, so the default, any free port, is enough.

Durations accept `s`, `ms`, `us` (or `µs`) and `ns` suffixes (`1ms`,
`250us`, `0.5s`; a bare number is seconds). Bad values are reported by
argparse with a one-line message. The process serves until Ctrl-C or
SIGTERM, then closes every connection and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import signal
import socket
import sys

from coalesce import _units
from coalesce._units import parse_duration, positive_int
from coalesce.emulator.emulator import Emulator, EmulatorConfig

__all__ = [
    "BANNER",
    "config_from_args",
    "configure_parser",
    "parse_address",
    "parse_duration",
    "parse_port_or_none",
    "run",
]

BANNER = (
    "coalesce emulator: a TEST AND BENCHMARK stand-in for ScyllaDB -- not a database.\n"
    "Data lives in memory only and is lost on exit; one node, no replication."
)

def parse_address(text: str) -> tuple[str, int]:
    """`"127.0.0.1:9042"` -> ("127.0.0.1", 9042); `[::1]:9042` for IPv6."""
    return _units.parse_address(text, default_port=None)


def parse_port_or_none(text: str) -> int | None:
    """`"19042"` -> 19042, `"0"` -> 0 (any free port), `"none"` -> None (no port)."""
    if text.strip().lower() == "none":
        return None
    try:
        port = int(text)
    except ValueError:
        raise _units.BadValue(f"not a port: {text!r} (a number, 0, or none)") from None
    if not 0 <= port <= 65535:
        raise _units.BadValue(f"port out of range: {port}")
    return port
def _ip_address(text: str) -> tuple[str, int]:
    """`parse_address`, with a host name resolved to the IP the emulator binds and
    reports in ``system.local`` (an inet column: it needs an IP literal)."""
    host, port = parse_address(text)
    if host == "localhost":
        return host, port
    try:
        ipaddress.ip_address(host)
        return host, port
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise _units.BadValue(f"cannot resolve host {host!r} in {text!r}") from None
    return str(infos[0][4][0]), port


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the emulator's options to `parser` (a subcommand parser)."""
    parser.description = BANNER
    parser.add_argument(
        "--listen",
        type=_ip_address,
        default=("127.0.0.1", 9042),
        metavar="HOST:PORT",
        help="address to serve CQL on (default 127.0.0.1:9042)",
    )
    parser.add_argument(
        "--shards", type=positive_int, default=4, help="emulated shards (default 4)"
    )
    parser.add_argument(
        "--read-latency",
        type=parse_duration,
        default=0.001,
        metavar="DURATION",
        help="service time of one read on its shard (default 1ms)",
    )
    parser.add_argument(
        "--write-latency",
        type=parse_duration,
        default=None,
        metavar="DURATION",
        help="service time of one write (default: same as --read-latency)",
    )
    parser.add_argument(
        "--per-row",
        type=parse_duration,
        default=2e-6,
        metavar="DURATION",
        help="extra service time per row read (default 2us)",
    )
    parser.add_argument(
        "--metrics",
        type=_ip_address,
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP on this address",
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        help="require PasswordAuthenticator login (superuser cassandra/cassandra)",
    )
    parser.add_argument(
        "--shard-aware",
        action="store_true",
        help="look like Scylla to shard-aware drivers (scylla-driver, acsylla): advertise "
        "SCYLLA_SHARD, SCYLLA_NR_SHARDS, ... in SUPPORTED and listen on a shard-aware port "
        "where a connection from client port P belongs to shard P %% shards",
    )
    parser.add_argument(
        "--shard-aware-port",
        type=parse_port_or_none,
        default=0,
        metavar="PORT",
        help="the shard-aware port with --shard-aware (default 0: any free port, printed at "
        "start-up and advertised in SUPPORTED; none: advertise sharding without it)",
    )
    parser.add_argument(
        "--cross-shard-latency",
        type=parse_duration,
        default=0.0,
        metavar="DURATION",
        help="extra time a request pays when its partitions live on another shard than its "
        "connection's (default 0: off; timers round to 1 ms, so a shorter hop costs 1 ms)",
    )


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """Map parsed flags onto an `EmulatorConfig`; ValueError for contradictory flags."""
    if args.shard_aware_port != 0 and not args.shard_aware:
        raise ValueError("--shard-aware-port needs --shard-aware")
    host, port = args.listen
    return EmulatorConfig(
        host=host,
        port=port,
        shards=args.shards,
        read_latency=args.read_latency,
        write_latency=args.write_latency,
        per_row=args.per_row,
        auth=args.auth,
        metrics=args.metrics,
        shard_aware=args.shard_aware,
        shard_aware_port=args.shard_aware_port,
        cross_shard_latency=args.cross_shard_latency,
    )


async def _serve(config: EmulatorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with Emulator.from_config(config) as emulator:
        print(BANNER, flush=True)
        print(
            f"listening on {emulator.host}:{emulator.port} with {config.shards} shards"
            + (
                f", shard-aware port {emulator.shard_aware_port}"
                if emulator.shard_aware_port is not None
                else ""
            )
            + (
                f", metrics on {config.metrics[0]}:{emulator.metrics_port}"
                if config.metrics
                else ""
            )
            + (", auth on (cassandra/cassandra)" if config.auth else ""),
            flush=True,
        )
        await stop.wait()
        print("stopping", flush=True)


def run(args: argparse.Namespace) -> int:
    """Run until interrupted; returns the process exit status."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"coalesce emulator: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config))
    except OSError as exc:
        print(f"coalesce emulator: cannot listen: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (`python -m coalesce.emulator.command`)."""
    parser = argparse.ArgumentParser(prog="coalesce emulator")
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
