"""The sidecar's exception hierarchy.

Configuration problems are `ConfigError`. Everything that goes wrong between the
sidecar and Scylla is an `UpstreamError`; the client side turns each kind into the CQL
ERROR frame a driver knows how to react to (see `UpstreamError.code`).
"""

from __future__ import annotations

from coalesce.cql import ErrorCode
from coalesce.errors import CoalesceError

__all__ = [
    "ConfigError",
    "SidecarError",
    "UpstreamError",
    "UpstreamLost",
    "UpstreamRefused",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class SidecarError(CoalesceError):
    """Base class of the sidecar's own errors."""


class ConfigError(SidecarError, ValueError):
    """A configuration value (flag, environment variable or TOML key) is invalid.

    The message names the setting and the source it came from.
    """


class UpstreamError(SidecarError):
    """A request could not be answered by Scylla.

    `code` is the CQL error code the clients waiting for that request receive.
    """

    code: int = ErrorCode.SERVER_ERROR


class UpstreamUnavailable(UpstreamError):
    """No upstream node is reachable (or the chosen one is down and backing off)."""


class UpstreamLost(UpstreamError):
    """The upstream connection carrying a request closed before its response arrived."""


class UpstreamTimeout(UpstreamError):
    """Scylla did not answer a request within the configured request timeout."""


class UpstreamRefused(UpstreamError):
    """Scylla answered a connection's setup (login or ``USE``) with an ERROR.

    `body` is that ERROR frame's body, relayed to the client as is, so the client
    sees Scylla's own error (bad credentials, unknown keyspace, ...).
    """

    def __init__(self, message: str, body: bytes) -> None:
        super().__init__(message)
        self.body = body
