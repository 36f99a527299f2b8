"""`coalesce sidecar`: run a sidecar until SIGTERM or SIGINT, then drain.

``coalesce sidecar --listen 127.0.0.1:9042 --upstream h1:9042,h2:9042
[--metrics 127.0.0.1:9100] ...`` -- the flags are generated from the settings declared
on `SidecarConfig`; every one can also come from a ``COALESCE_SIDECAR_<NAME>``
environment variable or a TOML file (``--config``); see `SidecarConfig.from_sources`
for the precedence.

Bad settings are one plain line on stderr. Once the settings are read, everything else
(listening, draining, errors) is logged to stderr as text or JSON lines
(``--log-format``), through `RepeatLimiter`, so a storm of one message (say, accept()
failing with "Too many open files") writes a few lines and a count, not megabytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import IO, Any

from coalesce.sidecar.config import ENV_PREFIX, SETTINGS, SidecarConfig
from coalesce.sidecar.errors import ConfigError

__all__ = ["JsonFormatter", "RepeatLimiter", "configure_parser", "log_handler", "run"]

_log = logging.getLogger("coalesce.sidecar")


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
        limits = setting.describe_limits()
        text = f"{setting.help} (default: {setting.describe_default()}"
        text = (text + (f"; {limits})" if limits else ")")).replace("%", "%%")
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
    handler = log_handler(config.log_format)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(config.log_level.upper())
    try:
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
    finally:
        for limiter in handler.filters:
            if isinstance(limiter, RepeatLimiter):
                limiter.flush()
        root.removeHandler(handler)


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
    from coalesce.sidecar.server import Sidecar, tune_gc

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
                _log.error("cannot start: %s", exc)
                return 2
            tune_gc(config)  # after start: what start() built lives as long as the process
            upstream = ", ".join(f"{h}:{p}" for h, p in config.upstream)
            metrics = (f", metrics on {config.metrics[0]}:{sidecar.metrics_port}"
                       if config.metrics is not None else "")
            _log.info("listening on %s:%s, upstream %s%s",
                      sidecar.host, sidecar.port, upstream, metrics)
            await stop.wait()
            _log.info("draining")
            drained = await sidecar.drain()
            if not drained:
                _log.warning("drain timed out; requests were dropped")
            return 0
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    return serve()


# -- logging ------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, plus ``exception`` (the formatted traceback) and ``stack`` when present.
    Newlines inside values are escaped, so one record is always one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class RepeatLimiter(logging.Filter):
    """Let through at most `burst` records per (logger, message template) per `interval`.

    The template is the record's unformatted message, so ``log.warning("accept failed:
    %s", exc)`` is one key whatever `exc` says. Records past the burst are dropped and
    counted; the count is logged (at the dropped records' level, by their logger) when
    the key's next window opens, or by `flush` -- so a storm costs `burst` lines and a
    count per interval. At most `max_keys` keys are tracked (the oldest is reported and
    forgotten first). Thread-safe.
    """

    def __init__(
        self,
        burst: int = 10,
        interval: float = 60.0,
        *,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [window start, records let through, records dropped, level]
        self._windows: OrderedDict[tuple[str, str], list[Any]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "repeats_suppressed", None) is not None:
            return True  # our own count: at most one per key and window
        key = (record.name, str(record.msg))
        now = self._clock()
        reports: list[tuple[tuple[str, str], int, int]] = []
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.interval:
                if window is not None and window[2]:
                    reports.append((key, window[2], window[3]))
                self._windows[key] = [now, 1, 0, record.levelno]
                self._windows.move_to_end(key)
                while len(self._windows) > self.max_keys:
                    old, (_, _, dropped, level) = self._windows.popitem(last=False)
                    if dropped:
                        reports.append((old, dropped, level))
                allow = True
            elif window[1] < self.burst:
                window[1] += 1
                allow = True
            else:
                window[2] += 1
                allow = False
        for old_key, dropped, level in reports:
            self._report(old_key, dropped, level)
        return allow

    def flush(self) -> None:
        """Log the count of every key with records dropped in its current window."""
        with self._lock:
            reports = [(key, w[2], w[3]) for key, w in self._windows.items() if w[2]]
            for window in self._windows.values():
                window[2] = 0
        for key, dropped, level in reports:
            self._report(key, dropped, level)

    def _report(self, key: tuple[str, str], dropped: int, level: int) -> None:
        name, template = key
        logging.getLogger(name).log(
            level, "%d more records like this were suppressed (at most %d per %gs): %s",
            dropped, self.burst, self.interval, template,
            extra={"repeats_suppressed": dropped},
        )


def log_handler(fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """A stderr (or `stream`) handler writing `fmt` (``text`` or ``json``) lines,
    with a `RepeatLimiter` in front."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatLimiter())
    return handler
