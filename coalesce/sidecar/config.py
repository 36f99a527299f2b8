"""`SidecarConfig`: every setting of the sidecar, each declared once, and where it comes from.

One frozen dataclass holds the settings. Each field carries, in its metadata, a `Setting`:
its help text, how to read it from text or TOML, how to show it, and its limits. From
that one declaration come the command-line flag (``--name-with-dashes``), the
environment variable (``COALESCE_SIDECAR_NAME``), the TOML key (``name``), the help
text with its default, and the validation -- they cannot drift apart.

`SidecarConfig.from_sources` fills the dataclass from command-line flags, then
``COALESCE_SIDECAR_*`` environment variables, then a TOML file, then the defaults -- the
first source that names a setting wins. Every value is validated here, and a bad one
raises `ConfigError` naming the setting and the source it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from coalesce import _units
from coalesce.sidecar.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "SETTINGS",
    "Address",
    "Setting",
    "SidecarConfig",
    "parse_address",
]

ENV_PREFIX = "COALESCE_SIDECAR_"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

Address = tuple[str, int]

_KIB = 1024
_MIB = 1024 * 1024
_SIZES = {"": 1, "b": 1, "k": _KIB, "kib": _KIB, "m": _MIB, "mib": _MIB,
          "g": 1024 * _MIB, "gib": 1024 * _MIB}
_OFF = ("", "off", "none", "no")


def parse_address(text: str, *, default_port: int = 9042) -> Address:
    """``"host:port"``, ``"host"`` or ``"[v6]:port"`` as ``(host, port)``.

    Raises `ValueError` on an empty host or a port outside 0..65535.
    """
    return _units.parse_address(text, default_port=default_port)


# -- kinds of value: how each is read, checked and shown -------------------------------


@dataclass(frozen=True, slots=True)
class _Kind:
    """One kind of value: read from a flag, variable or TOML value; checked; shown."""

    parse: Callable[[Any], Any]
    show: Callable[[Any], str]
    metavar: str
    check: Callable[[Any], str | None]  # what is wrong with a value, or None


def _text_of(raw: Any, what: str) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"expected {what} as a string, got {raw!r}")
    return raw.strip()


def _is_off(raw: Any) -> bool:
    return isinstance(raw, str) and raw.strip().lower() in _OFF


def _parse_addresses(raw: Any) -> tuple[Address, ...]:
    what = '"host:port,host:port" or a list of "host:port"'
    if isinstance(raw, str):
        items = raw.split(",")
    elif isinstance(raw, list | tuple):
        items = [_text_of(item, "each node") for item in raw]
    else:
        raise ValueError(f"expected {what}, got {raw!r}")
    out = tuple(parse_address(item) for item in items if item.strip())
    if not out:
        raise ValueError("empty list: at least one Scylla node is required")
    return out


def _check_address(value: Any) -> str | None:
    if (not isinstance(value, tuple) or len(value) != 2 or not isinstance(value[0], str)
            or not isinstance(value[1], int) or not 0 <= value[1] <= 65535):
        return f"expected (host, port), got {value!r}"
    return None


def _check_addresses(value: Any) -> str | None:
    if not isinstance(value, tuple) or not value:
        return f"expected a non-empty tuple of (host, port), got {value!r}"
    return next((bad for bad in map(_check_address, value) if bad), None)


def _show_address(value: Address) -> str:
    host, port = value
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_int(raw: Any) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        try:
            return int(raw.strip().replace("_", ""))
        except ValueError:
            pass
    raise ValueError(f"expected an integer, got {raw!r}")


def _check_int(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return f"expected an integer, got {value!r}"
    return None


def _parse_seconds(raw: Any) -> float:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, str):
        return _units.parse_duration(raw)
    raise ValueError(f"expected a duration such as 10s or 250ms, got {raw!r}")


def _check_seconds(value: Any) -> str | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return f"expected seconds as a number, got {value!r}"
    if not math.isfinite(value):
        return f"expected a finite duration, got {value!r}"
    return None


def _show_seconds(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) < 1:
        return f"{value * 1e3:g}ms"
    return f"{value:g}s"


def _parse_size(raw: Any) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    match = re.fullmatch(r"\s*([0-9]+)\s*([a-zA-Z]*)\s*", raw) if isinstance(raw, str) else None
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZES:
        raise ValueError(f"invalid size {raw!r}: use bytes or a K/M/KiB/MiB suffix")
    return int(match.group(1)) * _SIZES[unit]


def _show_size(value: int) -> str:
    for unit, scale in (("GiB", 1024 * _MIB), ("MiB", _MIB), ("KiB", _KIB)):
        if value >= scale and value % scale == 0:
            return f"{value // scale}{unit}"
    return f"{value}B"


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _check_bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {value!r}"


def _parse_text(raw: Any) -> str:
    text = _text_of(raw, "text")
    if not text:
        raise ValueError("expected a non-empty string")
    return text


def _check_text(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return f"expected a non-empty string, got {value!r}"
    return None


def _parse_file(raw: Any) -> Path:
    return Path(_parse_text(raw))


def _check_file(value: Any) -> str | None:
    if not isinstance(value, Path):
        return f"expected a path, got {value!r}"
    if not value.exists():
        return f"no such file: {str(value)!r}"
    if not value.is_file():
        return f"not a regular file: {str(value)!r}"
    if not os.access(value, os.R_OK):
        return f"cannot read {str(value)!r}: permission denied"
    return None


def _optional(kind: _Kind, off: str) -> _Kind:
    """`kind`, or None written as `off` (or ``off``, ``none``, ``no``, an empty string)."""
    return _Kind(
        parse=lambda raw: None if _is_off(raw) or raw == off else kind.parse(raw),
        show=lambda value: off if value is None else kind.show(value),
        metavar=kind.metavar,
        check=lambda value: None if value is None else kind.check(value),
    )


def _choice(*options: str) -> _Kind:
    def parse(raw: Any) -> str:
        text = _text_of(raw, "one of " + "/".join(options)).lower()
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {raw!r}")
        return text

    def check(value: Any) -> str | None:
        return None if value in options else f"expected one of {', '.join(options)}, got {value!r}"

    return _Kind(parse, str, "{" + ",".join(options) + "}", check)


_ADDRESSES = _Kind(_parse_addresses, lambda v: ",".join(map(_show_address, v)),
                   "HOST[:PORT],...", _check_addresses)
_LISTEN = _Kind(lambda raw: parse_address(_text_of(raw, '"host:port"')), _show_address,
                "HOST[:PORT]", _check_address)
_METRICS = _optional(
    _Kind(lambda raw: parse_address(_text_of(raw, '"host:port"'), default_port=9100),
          _show_address, "HOST[:PORT]", _check_address),
    "off",
)
def _parse_advertise(raw: Any) -> str:
    text = _parse_text(raw)
    parse_address(text, default_port=0)  # raises on a bad port
    return text


def _check_advertise(value: Any) -> str | None:
    problem = _check_text(value)
    if problem is not None:
        return problem
    try:
        parse_address(value, default_port=0)
    except ValueError as exc:
        return str(exc)
    return None


# Kept as written (a host may be a name, or a placeholder a deployment fills in); the
# host and the port are read from it by `advertised_address` and `advertised_port`.
_ADVERTISE = _optional(_Kind(_parse_advertise, str, "HOST[:PORT]", _check_advertise),
                       "the listen address")
def _parse_float(raw: Any) -> float:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, str):
        try:
            return float(raw.strip())
        except ValueError:
            pass
    raise ValueError(f"expected a number, got {raw!r}")


def _check_float(value: Any) -> str | None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return f"expected a finite number, got {value!r}"
    return None


MEMBERSHIP_SCHEMES: Final = ("dns", "etcd")


def _parse_membership(raw: Any) -> str:
    text = _parse_text(raw)
    problem = _check_membership(text)
    if problem is not None:
        raise ValueError(problem)
    return text


def _check_membership(value: Any) -> str | None:
    problem = _check_text(value)
    if problem is not None:
        return problem
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in MEMBERSHIP_SCHEMES or not rest.split("/")[0]:
        return f"expected dns://NAME[:PORT] or etcd://HOST:PORT[/PREFIX], got {value!r}"
    return None


_INT = _Kind(_parse_int, lambda v: f"{v:_}" if v >= 10_000 else str(v), "N", _check_int)
_SECONDS = _Kind(_parse_seconds, _show_seconds, "DURATION", _check_seconds)
_SIZE = _Kind(_parse_size, _show_size, "SIZE", _check_int)
_BOOL = _Kind(_parse_bool, lambda v: "on" if v else "off", "", _check_bool)
_TEXT = _optional(_Kind(_parse_text, str, "TEXT", _check_text), "")
_FILE = _optional(_Kind(_parse_file, str, "FILE", _check_file), "none")
_FLOAT = _Kind(_parse_float, lambda v: f"{v:g}", "X", _check_float)
_PEERS = _optional(_ADDRESSES, "none")
_MEMBERSHIP = _optional(_Kind(_parse_membership, str, "URL", _check_membership), "none")


# -- one setting -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting as declared on `SidecarConfig`: its sources, help, limits and checks.

    `flag`, `env` and `key` are derived from `name`. `low`/`high` are inclusive bounds,
    `above` an exclusive lower bound; None is allowed only for settings declared with
    a None default or an "off" form.
    """

    name: str
    help: str
    kind: _Kind
    default: Any = dataclasses.MISSING
    low: float | None = None
    high: float | None = None
    above: float | None = None
    default_text: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def key(self) -> str:
        return self.name

    @property
    def metavar(self) -> str:
        return self.kind.metavar

    @property
    def is_bool(self) -> bool:
        return self.kind is _BOOL

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def parse(self, raw: Any) -> Any:
        """A value from a flag, variable (text) or TOML (any type); raises `ValueError`."""
        value = self.kind.parse(raw)
        problem = self.check(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    def check(self, value: Any) -> str | None:
        """What is wrong with `value` for this setting, or None if nothing is."""
        problem = self.kind.check(value)
        if problem is not None or value is None:
            return problem
        show = self.kind.show
        if self.low is not None and self.high is not None:
            if not self.low <= value <= self.high:
                return f"must be {show(self.low)}..{show(self.high)}, got {show(value)}"
        elif self.low is not None and value < self.low:
            return f"must be >= {show(self.low)}, got {show(value)}"
        if self.above is not None and value <= self.above:
            return f"must be > {show(self.above)}, got {show(value)}"
        return None

    def describe_limits(self) -> str:
        """The allowed range, as help text shows it (``"1..64"``, ``">= 64KiB"``), or ""."""
        show = self.kind.show
        if self.low is not None and self.high is not None:
            return f"{show(self.low)}..{show(self.high)}"
        if self.low is not None:
            return f">= {show(self.low)}"
        if self.above is not None:
            return f"> {show(self.above)}"
        return ""

    def describe_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        if self.required:
            return "required"
        return self.kind.show(self.default)


_SPEC = "coalesce.sidecar.setting"


def _spec(kind: _Kind, help: str, **limits: Any) -> dict[str, Any]:
    """Field metadata declaring one setting (made into a `Setting` in `SETTINGS`)."""
    return {_SPEC: {"help": help, "kind": kind, **limits}}


_POSITIVE = {"above": 0.0}


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """The sidecar's settings; `SETTINGS` lists them with their flags and help.

    Only `upstream` is required. Port 0 in `listen` or `metrics` picks a free port
    (the `Sidecar` reports the one it got); ``metrics=None`` serves no HTTP endpoint.
    `advertise` is ``"host[:port]"``, reported in ``system.local`` (`advertised_address`);
    with a port, that port is reported instead of the listening one (`advertised_port`).
    `data_center` and `rack` left as None are taken from the upstream node's own
    ``system.local``, so keyspaces replicated by data center keep resolving to the
    sidecar in token-aware drivers. Construction validates every value and raises
    `ConfigError` naming the setting.
    """

    upstream: tuple[Address, ...] = field(
        metadata=_spec(_ADDRESSES, "Scylla nodes to forward to"))
    listen: Address = field(
        default=("127.0.0.1", 9042), metadata=_spec(_LISTEN, "address clients connect to"))
    metrics: Address | None = field(
        default=("127.0.0.1", 9100),
        metadata=_spec(_METRICS, "address of /metrics and /healthz ('off': none)"))
    advertise: str | None = field(
        default=None,
        metadata=_spec(_ADVERTISE, "address reported in system.local; with a port, that port"))
    data_center: str | None = field(
        default=None,
        metadata=_spec(_TEXT, "data center reported in system.local", default_text="Scylla's"))
    rack: str | None = field(
        default=None,
        metadata=_spec(_TEXT, "rack reported in system.local", default_text="Scylla's"))
    connections_per_node: int = field(
        default=2,
        metadata=_spec(_INT, "upstream connections per node and role", low=1, high=64))
    max_waiters: int | None = field(
        default=None,
        metadata=_spec(_optional(_INT, "unlimited"),
                       "callers per merged read before OVERLOADED", low=1))
    max_inflight: int | None = field(
        default=None,
        metadata=_spec(_optional(_INT, "unlimited"), "merged reads running at once", low=1))
    max_queued: int = field(
        default=0, metadata=_spec(_INT, "merged reads queued behind --max-inflight", low=0))
    request_timeout: float = field(
        default=12.0, metadata=_spec(_SECONDS, "upstream request timeout", **_POSITIVE))
    connect_timeout: float = field(
        default=5.0, metadata=_spec(_SECONDS, "upstream connect timeout", **_POSITIVE))
    reconnect_delay: float = field(
        default=0.1, metadata=_spec(_SECONDS, "first reconnection back-off", **_POSITIVE))
    reconnect_max_delay: float = field(
        default=10.0, metadata=_spec(_SECONDS, "longest reconnection back-off", **_POSITIVE))
    max_frame_size: int = field(
        default=16 * _MIB, metadata=_spec(_SIZE, "largest client frame body", low=_KIB))
    drain_timeout: float = field(
        default=10.0,
        metadata=_spec(_SECONDS, "how long SIGTERM waits for requests in flight", **_POSITIVE))
    handshake_timeout: float = field(
        default=10.0,
        metadata=_spec(_SECONDS, "a client must finish STARTUP and authentication within this",
                       **_POSITIVE))
    idle_timeout: float | None = field(
        default=300.0,
        metadata=_spec(_optional(_SECONDS, "off"),
                       "close a client connection that sends nothing for this long "
                       "('off': never)", **_POSITIVE))
    max_connections: int | None = field(
        default=None,
        metadata=_spec(_optional(_INT, "from the open-file limit"),
                       "client connections at once", low=1))
    max_client_requests: int = field(
        default=2048,
        metadata=_spec(_INT, "unanswered requests per client before the sidecar stops "
                             "reading from it", low=1))
    max_client_buffer: int = field(
        default=4 * _MIB,
        metadata=_spec(_SIZE, "unsent answer bytes per client before the sidecar stops "
                              "reading from it", low=64 * _KIB))
    heartbeat_interval: float = field(
        default=5.0,
        metadata=_spec(_SECONDS, "idle upstream connections are probed with OPTIONS this often",
                       **_POSITIVE))
    heartbeat_timeout: float = field(
        default=5.0,
        metadata=_spec(_SECONDS, "an upstream connection not answering a probe within this "
                                 "is closed", **_POSITIVE))
    max_pools: int = field(
        default=64, metadata=_spec(_INT, "most (role, keyspace) upstream pools kept", low=1))
    pool_idle_timeout: float = field(
        default=60.0,
        metadata=_spec(_SECONDS, "a pool no client uses is closed after this", **_POSITIVE))
    max_logins: int = field(
        default=64,
        metadata=_spec(_INT, "client logins being verified upstream at once", low=1))
    prepared_cache: int = field(
        default=100_000,
        metadata=_spec(_INT, "prepared statements remembered for re-preparing", low=1))
    prepared_cache_bytes: int = field(
        default=64 * _MIB,
        metadata=_spec(_SIZE, "bytes of prepared statements remembered", low=64 * _KIB))
    tls_cert: Path | None = field(
        default=None,
        metadata=_spec(_FILE, "PEM certificate for client-side TLS (with --tls-key)"))
    tls_key: Path | None = field(
        default=None, metadata=_spec(_FILE, "PEM private key for client-side TLS"))
    upstream_tls: bool = field(
        default=False, metadata=_spec(_BOOL, "connect to Scylla over TLS"))
    upstream_ca: Path | None = field(
        default=None, metadata=_spec(_FILE, "PEM CA bundle to verify Scylla's certificates"))
    upstream_verify: bool = field(
        default=True,
        metadata=_spec(_BOOL, "verify Scylla's certificate (--no-upstream-verify: testing "
                              "only)"))
    peers: tuple[Address, ...] | None = field(
        default=None,
        metadata=_spec(_PEERS, "advertised addresses of every sidecar of the ring, this one "
                               "among them"))
    membership: str | None = field(
        default=None,
        metadata=_spec(_MEMBERSHIP, "ring members from dns://NAME[:PORT] or "
                                    "etcd://HOST:PORT[/PREFIX]"))
    lease_ttl: float = field(
        default=3.0,
        metadata=_spec(_SECONDS, "etcd membership: a member that stops renewing its lease "
                                 "leaves the ring after this", low=1.0))
    membership_interval: float = field(
        default=1.0,
        metadata=_spec(_SECONDS, "dns membership: how often the name is resolved again",
                       **_POSITIVE))
    vnodes: int = field(
        default=256,
        metadata=_spec(_INT, "ring positions (tokens) per sidecar; the same on every member",
                       low=1, high=4096))
    load_factor: float | None = field(
        default=None,
        metadata=_spec(_optional(_FLOAT, "off"),
                       "bounded loads: serve a read here rather than send it to an owner "
                       "past this times the mean load", above=1.0))
    peer_timeout: float = field(
        default=1.0,
        metadata=_spec(_SECONDS, "connecting to a ring member: past this, reads are served "
                                 "here", **_POSITIVE))
    uvloop: bool = field(default=False, metadata=_spec(_BOOL, "run on uvloop"))
    gc_freeze: bool = field(
        default=True,
        metadata=_spec(_BOOL, "after start, move every live object out of the cyclic "
                              "collector's reach (gc.freeze)"))
    gc_threshold: int = field(
        default=50_000,
        metadata=_spec(_INT, "generation-0 threshold of the cyclic collector", low=100))
    log_level: str = field(
        default="info", metadata=_spec(_choice(*LOG_LEVELS), "least severe level logged"))
    log_format: str = field(
        default="text",
        metadata=_spec(_choice(*LOG_FORMATS), "text lines, or json: one object per line"))

    def __post_init__(self) -> None:
        for setting in SETTINGS:
            problem = setting.check(getattr(self, setting.name))
            if problem is not None:
                raise ConfigError(f"{setting.name}: {problem}")
        if self.reconnect_max_delay < self.reconnect_delay:
            raise ConfigError("reconnect_max_delay must be >= reconnect_delay")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: give both or neither")
        if self.peers is not None and self.membership is not None:
            raise ConfigError("peers and membership are two ways to name the ring: give one")

    def backoff(self, failures: int) -> float:
        """Seconds to wait after `failures` consecutive failures (>= 1): doubling from
        ``reconnect_delay`` up to ``reconnect_max_delay``."""
        doubled: float = self.reconnect_delay * 2 ** min(failures - 1, 30)
        return min(self.reconnect_max_delay, doubled)

    @property
    def advertised_address(self) -> str:
        """The host the sidecar reports as its own in ``system.local`` (never a wildcard)."""
        if self.advertise is not None:
            return parse_address(self.advertise, default_port=0)[0]
        host = self.listen[0]
        if host in ("0.0.0.0", "", "::"):
            return "127.0.0.1"
        return "127.0.0.1" if host == "localhost" else host

    @property
    def advertised_port(self) -> int | None:
        """The port reported in ``system.local``; None: the port the sidecar listens on."""
        if self.advertise is None:
            return None
        return parse_address(self.advertise, default_port=0)[1] or None

    @classmethod
    def from_sources(
        cls,
        args: argparse.Namespace | None = None,
        environ: Mapping[str, str] | None = None,
        toml_path: Path | str | None = None,
    ) -> SidecarConfig:
        """Settings from flags > ``COALESCE_SIDECAR_*`` variables > TOML > defaults.

        `args` attributes that are None (flags not given) fall through to the next
        source. The TOML file (`toml_path`, else ``args.config``, else
        ``COALESCE_SIDECAR_CONFIG``) may hold the settings at top level or in a
        ``[sidecar]`` table. Unknown TOML keys and unknown ``COALESCE_SIDECAR_*``
        variables are errors. Raises `ConfigError` naming the setting and its source.
        """
        return cls.from_sources_traced(args, environ, toml_path)[0]

    @classmethod
    def from_sources_traced(
        cls,
        args: argparse.Namespace | None = None,
        environ: Mapping[str, str] | None = None,
        toml_path: Path | str | None = None,
    ) -> tuple[SidecarConfig, dict[str, str]]:
        """`from_sources`, and where each setting came from (``"--listen"``,
        ``"COALESCE_SIDECAR_LISTEN"``, ``"sidecar.toml: listen"`` or ``"default"``), for
        messages about a value that parsed but then did not work."""
        environ = environ or {}
        config_source = "--config"
        if toml_path is None and args is not None:
            toml_path = getattr(args, "config", None)
        if toml_path is None and ENV_PREFIX + "CONFIG" in environ:
            toml_path, config_source = environ[ENV_PREFIX + "CONFIG"], ENV_PREFIX + "CONFIG"
        table = _read_toml(Path(toml_path), config_source) if toml_path is not None else {}
        unknown = sorted(set(table) - _BY_NAME.keys())
        if unknown:
            raise ConfigError(f"{toml_path}: unknown setting(s) {', '.join(unknown)}")
        stray = sorted(
            name for name in environ
            if name.startswith(ENV_PREFIX) and name[len(ENV_PREFIX):].lower() not in _BY_NAME
            and name != ENV_PREFIX + "CONFIG"
        )
        if stray:
            raise ConfigError(f"{stray[0]}: no such setting (see coalesce sidecar --help)")

        values: dict[str, Any] = {}
        origins: dict[str, str] = {}
        for setting in SETTINGS:
            name = setting.name
            if args is not None and getattr(args, name, None) is not None:
                raw, source = getattr(args, name), setting.flag
            elif setting.env in environ:
                raw, source = environ[setting.env], setting.env
            elif name in table:
                raw, source = table[name], f"{toml_path}: {name}"
            else:
                origins[name] = "default"
                continue
            try:
                values[name] = setting.parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{source}: {exc}") from None
            origins[name] = source
        if "upstream" not in values:
            raise ConfigError(
                "no upstream: give --upstream host:port[,host:port...] "
                f"or {ENV_PREFIX}UPSTREAM"
            )
        return cls(**values), origins


def _read_toml(path: Path, source: str) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise ConfigError(f"{source} {path}: cannot read: {reason}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); TOML files are UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    section = data.get("sidecar", data)
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [sidecar] must be a table")
    return section


def _settings() -> tuple[Setting, ...]:
    out = []
    for f in dataclasses.fields(SidecarConfig):
        spec = f.metadata[_SPEC]
        out.append(Setting(name=f.name, default=f.default, **spec))
    return tuple(out)


SETTINGS: tuple[Setting, ...] = _settings()
"""Every setting, in declaration order."""

_BY_NAME = {setting.name: setting for setting in SETTINGS}
