"""`SidecarConfig`: every setting of the sidecar, and where each one comes from.

One frozen dataclass holds the settings. `SidecarConfig.from_sources` fills it from
command-line flags, then ``COALESCE_SIDECAR_*`` environment variables, then a TOML file,
then the defaults -- the first source that names a setting wins. Every value is
validated once, here, and a bad one raises `ConfigError` naming the setting and the
source it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coalesce import _units
from coalesce.sidecar.errors import ConfigError

__all__ = ["ENV_PREFIX", "Address", "SidecarConfig", "parse_address"]

ENV_PREFIX = "COALESCE_SIDECAR_"

Address = tuple[str, int]

_SIZES = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2}


def parse_address(text: str, *, default_port: int = 9042) -> Address:
    """``"host:port"``, ``"host"`` or ``"[v6]:port"`` as ``(host, port)``.

    Raises `ValueError` on an empty host or a port outside 0..65535.
    """
    return _units.parse_address(text, default_port=default_port)


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """The sidecar's settings (see `configure_parser` in `coalesce.sidecar.command`).

    Only `upstream` is required. Port 0 in `listen` or `metrics` picks a free port
    (the `Sidecar` reports the one it got); ``metrics=None`` serves no HTTP endpoint.
    `data_center` and `rack` left as None are taken from the upstream node's own
    ``system.local``, so keyspaces replicated by data center keep resolving to the
    sidecar in token-aware drivers.
    """

    upstream: tuple[Address, ...]
    listen: Address = ("127.0.0.1", 9042)
    metrics: Address | None = ("127.0.0.1", 9100)
    advertise: str | None = None
    data_center: str | None = None
    rack: str | None = None
    connections_per_node: int = 2
    max_waiters: int | None = None
    max_inflight: int | None = None
    max_queued: int = 0
    request_timeout: float = 12.0
    connect_timeout: float = 5.0
    reconnect_delay: float = 0.1
    reconnect_max_delay: float = 10.0
    max_frame_size: int = 16 * 1024 * 1024
    drain_timeout: float = 10.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    upstream_tls: bool = False
    upstream_ca: Path | None = None
    upstream_verify: bool = True
    uvloop: bool = False
    handshake_timeout: float = 10.0
    idle_timeout: float | None = 300.0
    max_connections: int | None = None
    max_client_requests: int = 2048
    max_client_buffer: int = 4 * 1024 * 1024
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 5.0
    max_pools: int = 64
    pool_idle_timeout: float = 60.0
    max_logins: int = 64
    prepared_cache: int = 100_000
    prepared_cache_bytes: int = 64 * 1024 * 1024
    gc_freeze: bool = True
    gc_threshold: int = 50_000

    def __post_init__(self) -> None:
        if not self.upstream:
            raise ConfigError("upstream: at least one Scylla node is required")
        if not 1 <= self.connections_per_node <= 64:
            raise ConfigError(
                f"connections_per_node must be 1..64, got {self.connections_per_node}"
            )
        for name in ("max_waiters", "max_inflight"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or unset, got {value}")
        if self.max_queued < 0:
            raise ConfigError(f"max_queued must be >= 0, got {self.max_queued}")
        for name in ("request_timeout", "connect_timeout", "reconnect_delay",
                     "reconnect_max_delay", "drain_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.reconnect_max_delay < self.reconnect_delay:
            raise ConfigError("reconnect_max_delay must be >= reconnect_delay")
        if self.max_frame_size < 1024:
            raise ConfigError(f"max_frame_size must be >= 1 KiB, got {self.max_frame_size}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: give both or neither")

    @property
    def advertised_address(self) -> str:
        """The address the sidecar reports as its own in ``system.local``."""
        if self.advertise is not None:
            return self.advertise
        host = self.listen[0]
        if host in ("0.0.0.0", "", "::"):
            return "127.0.0.1"
        return "127.0.0.1" if host == "localhost" else host

    @classmethod
    def from_sources(
        cls,
        args: argparse.Namespace | None = None,
        environ: Mapping[str, str] | None = None,
        toml_path: Path | str | None = None,
    ) -> SidecarConfig:
        """Settings from flags > ``COALESCE_SIDECAR_*`` variables > TOML > defaults.

        `args` attributes that are None (flags not given) fall through to the next
        source. The TOML file may hold the settings at top level or in a
        ``[sidecar]`` table; unknown keys are errors. Raises `ConfigError`.
        """
        environ = environ or {}
        if toml_path is None and args is not None:
            toml_path = getattr(args, "config", None)
        if toml_path is None:
            toml_path = environ.get(ENV_PREFIX + "CONFIG")
        table = _read_toml(Path(toml_path)) if toml_path is not None else {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(f"{toml_path}: unknown setting(s) {', '.join(unknown)}")

        values: dict[str, Any] = {}
        for name in known:
            raw: Any = None
            source = ""
            if args is not None and getattr(args, name, None) is not None:
                raw, source = getattr(args, name), f"--{name.replace('_', '-')}"
            elif ENV_PREFIX + name.upper() in environ:
                raw, source = environ[ENV_PREFIX + name.upper()], ENV_PREFIX + name.upper()
            elif name in table:
                raw, source = table[name], f"{toml_path}: {name}"
            else:
                continue
            try:
                values[name] = _PARSERS[name](raw)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{source}: {exc}") from None
        if "upstream" not in values:
            raise ConfigError(
                "no upstream: give --upstream host:port[,host:port...] "
                f"or {ENV_PREFIX}UPSTREAM"
            )
        return cls(**values)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    section = data.get("sidecar", data)
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [sidecar] must be a table")
    return section


def _addresses(raw: Any) -> tuple[Address, ...]:
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    out = tuple(parse_address(str(item)) for item in items if str(item).strip())
    if not out:
        raise ValueError("empty upstream list")
    return out


def _address(raw: Any) -> Address:
    return parse_address(str(raw))


def _optional_address(raw: Any) -> Address | None:
    if isinstance(raw, str) and raw.strip().lower() in ("", "off", "none", "no"):
        return None
    return parse_address(str(raw), default_port=9100)


def _text(raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"expected a non-empty string, got {raw!r}")
    return raw.strip()


def _int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise TypeError(f"expected an integer, got {raw!r}")
    if isinstance(raw, int):
        return raw
    try:
        return int(str(raw).replace("_", ""))
    except ValueError:
        raise ValueError(f"expected an integer, got {raw!r}") from None


def _optional_int(raw: Any) -> int | None:
    if isinstance(raw, str) and raw.strip().lower() in ("", "none", "off", "unlimited"):
        return None
    return _int(raw)


def _seconds(raw: Any) -> float:
    if isinstance(raw, bool):
        raise TypeError(f"expected a duration, got {raw!r}")
    if isinstance(raw, int | float):
        return float(raw)
    return _units.parse_duration(str(raw))


def _size(raw: Any) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    match = re.fullmatch(r"\s*([0-9]+)\s*([a-zA-Z]*)\s*", str(raw))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZES:
        raise ValueError(f"invalid size {raw!r}: use bytes or a K/M/KiB/MiB suffix")
    return int(match.group(1)) * _SIZES[unit]


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _path(raw: Any) -> Path:
    return Path(_text(raw))


def _optional_text(raw: Any) -> str | None:
    return _text(raw)


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "upstream": _addresses,
    "listen": _address,
    "metrics": _optional_address,
    "advertise": _optional_text,
    "data_center": _optional_text,
    "rack": _optional_text,
    "connections_per_node": _int,
    "max_waiters": _optional_int,
    "max_inflight": _optional_int,
    "max_queued": _int,
    "request_timeout": _seconds,
    "connect_timeout": _seconds,
    "reconnect_delay": _seconds,
    "reconnect_max_delay": _seconds,
    "max_frame_size": _size,
    "drain_timeout": _seconds,
    "tls_cert": _path,
    "tls_key": _path,
    "upstream_tls": _bool,
    "upstream_ca": _path,
    "upstream_verify": _bool,
    "uvloop": _bool,
    "handshake_timeout": _seconds,
    "idle_timeout": lambda raw: None if str(raw).lower() in ("off", "none") else _seconds(raw),
    "max_connections": _optional_int,
    "max_client_requests": _int,
    "max_client_buffer": _size,
    "heartbeat_interval": _seconds,
    "heartbeat_timeout": _seconds,
    "max_pools": _int,
    "pool_idle_timeout": _seconds,
    "max_logins": _int,
    "prepared_cache": _int,
    "prepared_cache_bytes": _size,
    "gc_freeze": _bool,
    "gc_threshold": _int,
}
