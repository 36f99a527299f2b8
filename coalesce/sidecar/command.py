"""`coalesce sidecar`: run a sidecar until SIGTERM or SIGINT, then drain.

``coalesce sidecar --listen 127.0.0.1:9042 --upstream h1:9042,h2:9042
[--metrics 127.0.0.1:9100] ...`` -- every flag can also come from a
``COALESCE_SIDECAR_<NAME>`` environment variable or a TOML file (``--config``); see
`SidecarConfig.from_sources` for the precedence.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from coalesce.sidecar.config import ENV_PREFIX, SidecarConfig
from coalesce.sidecar.errors import ConfigError
from coalesce.sidecar.server import Sidecar

__all__ = ["configure_parser", "run"]

_FLAGS: list[tuple[str, str]] = [
    ("--listen", "address clients connect to (default 127.0.0.1:9042)"),
    ("--upstream", "Scylla nodes, host:port[,host:port...] (required)"),
    ("--metrics", "address of /metrics and /healthz (default 127.0.0.1:9100; 'off')"),
    ("--advertise", "address reported in system.local (default: the listen address)"),
    ("--data-center", "data center reported in system.local (default: Scylla's)"),
    ("--rack", "rack reported in system.local (default: Scylla's)"),
    ("--connections-per-node", "upstream connections per node and role (default 2)"),
    ("--max-waiters", "callers per merged read before OVERLOADED (default unlimited)"),
    ("--max-inflight", "merged reads running at once (default unlimited)"),
    ("--max-queued", "merged reads queued behind --max-inflight (default 0)"),
    ("--request-timeout", "upstream request timeout, e.g. 12s (default 12s)"),
    ("--connect-timeout", "upstream connect timeout (default 5s)"),
    ("--reconnect-delay", "first reconnection back-off (default 100ms)"),
    ("--reconnect-max-delay", "longest reconnection back-off (default 10s)"),
    ("--max-frame-size", "largest client frame body, e.g. 16MiB (default 16MiB)"),
    ("--drain-timeout", "how long SIGTERM waits for requests in flight (default 10s)"),
    ("--tls-cert", "PEM certificate for client-side TLS (with --tls-key)"),
    ("--tls-key", "PEM private key for client-side TLS"),
    ("--upstream-ca", "PEM CA bundle to verify Scylla's certificates"),
]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the sidecar's flags to `parser` and make `run` its handler.

    Flags are kept as text (None when absent) so that one parser, in `SidecarConfig`,
    validates flags, environment and TOML alike.
    """
    parser.description = (
        "A transparent CQL proxy in front of Scylla that merges identical concurrent "
        f"reads. Every flag can also be set as {ENV_PREFIX}<NAME> or in a TOML file."
    )
    parser.add_argument("--config", help="TOML file with sidecar settings")
    for flag, text in _FLAGS:
        parser.add_argument(flag, help=text)
    parser.add_argument("--upstream-tls", action="store_const", const="true",
                        help="connect to Scylla over TLS")
    parser.add_argument("--no-upstream-verify", dest="upstream_verify",
                        action="store_const", const="false",
                        help="do not verify Scylla's certificate (testing only)")
    parser.add_argument("--uvloop", action="store_const", const="true", help="run on uvloop")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT, then drain; 0 on a clean exit, 2 on bad settings."""
    try:
        config = SidecarConfig.from_sources(args, os.environ)
    except ConfigError as exc:
        print(f"coalesce sidecar: {exc}", file=sys.stderr)
        return 2
    main = _serve(config)
    if config.uvloop:
        try:
            import uvloop
        except ImportError:
            print("coalesce sidecar: --uvloop needs uvloop installed", file=sys.stderr)
            main.close()
            return 2
        return int(uvloop.run(main))
    return asyncio.run(main)


def _serve(config: SidecarConfig) -> Coroutine[Any, Any, int]:
    async def serve() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            sidecar = Sidecar(config)
            try:
                await sidecar.start()
            except (ConfigError, OSError) as exc:
                await sidecar.stop()
                print(f"coalesce sidecar: {exc}", file=sys.stderr)
                return 2
            upstream = ", ".join(f"{h}:{p}" for h, p in config.upstream)
            metrics = (f", metrics on {config.metrics[0]}:{sidecar.metrics_port}"
                       if config.metrics is not None else "")
            print(f"coalesce sidecar: listening on {sidecar.host}:{sidecar.port}, "
                  f"upstream {upstream}{metrics}", file=sys.stderr, flush=True)
            await stop.wait()
            print("coalesce sidecar: draining", file=sys.stderr, flush=True)
            drained = await sidecar.drain()
            if not drained:
                print("coalesce sidecar: drain timed out; requests were dropped",
                      file=sys.stderr)
            return 0
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    return serve()
