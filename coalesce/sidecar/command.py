"""`coalesce sidecar`: run a sidecar until SIGTERM or SIGINT, then drain.

``coalesce sidecar --listen 127.0.0.1:9042 --upstream h1:9042,h2:9042
[--metrics 127.0.0.1:9100] ...`` -- the flags are generated from the settings declared
on `SidecarConfig`; every one can also come from a ``COALESCE_SIDECAR_<NAME>``
environment variable or a TOML file (``--config``); see `SidecarConfig.from_sources`
for the precedence.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any

from coalesce.sidecar.config import ENV_PREFIX, SETTINGS, SidecarConfig
from coalesce.sidecar.errors import ConfigError

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add one flag per `SidecarConfig` setting to `parser` and make `run` its handler.

    Flags are kept as given (None when absent) so that one parser per setting, in
    `SidecarConfig`, validates flags, environment and TOML alike. Boolean settings get
    ``--name`` and ``--no-name``.
    """
    parser.description = (
        "A transparent CQL proxy in front of Scylla that merges identical concurrent "
        f"reads. Every flag can also be set as {ENV_PREFIX}<NAME> (e.g. "
        f"{ENV_PREFIX}MAX_WAITERS) or as a key of a TOML file (max_waiters = 10), at top "
        "level or under [sidecar]. Precedence: flags, environment, file, defaults. "
        "Durations take s/ms/us/ns suffixes, sizes K/M/KiB/MiB."
    )
    parser.add_argument("--config", metavar="FILE",
                        help=f"TOML file with sidecar settings (or {ENV_PREFIX}CONFIG)")
    for setting in SETTINGS:
        text = f"{setting.help} (default: {setting.describe_default()})".replace("%", "%%")
        if setting.is_bool:
            parser.add_argument(setting.flag, action=argparse.BooleanOptionalAction,
                                default=None, help=text)
        else:
            parser.add_argument(setting.flag, metavar=setting.metavar, help=text)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT, then drain; 0 on a clean exit, 2 on bad settings."""
    try:
        config, origins = SidecarConfig.from_sources_traced(args, os.environ)
        _check_resolvable(config, origins)
    except ConfigError as exc:
        print(f"coalesce sidecar: {exc}", file=sys.stderr)
        return 2
    gc.set_threshold(config.gc_threshold, *gc.get_threshold()[1:])
    main = _serve(config)
    if config.uvloop:
        try:
            import uvloop
        except ImportError:
            print("coalesce sidecar: --uvloop needs uvloop: pip install 'coalesce[uvloop]'",
                  file=sys.stderr)
            main.close()
            return 2
        return int(uvloop.run(main))
    return asyncio.run(main)


def _check_resolvable(config: SidecarConfig, origins: dict[str, str]) -> None:
    """Name the setting whose host does not resolve before anything starts."""
    for name in ("listen", "metrics"):
        address = getattr(config, name)
        if address is None:
            continue
        host, port = address
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (OSError, UnicodeError):
            source = origins.get(name, "default")
            source = name if source == "default" else source
            raise ConfigError(
                f"{source}: cannot resolve host {host!r} "
                "(expected HOST[:PORT], e.g. 127.0.0.1:9042)"
            ) from None


def _serve(config: SidecarConfig) -> Coroutine[Any, Any, int]:
    from coalesce.sidecar.server import Sidecar

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
                print(f"coalesce sidecar: cannot start: {exc}", file=sys.stderr)
                return 2
            if config.gc_freeze:
                # What start() built lives as long as the process: keep the collector off it.
                gc.collect()
                gc.freeze()
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
