"""The CQL sidecar: a transparent proxy in front of Scylla that merges identical reads.

Applications keep their driver and their code and change one contact point; identical
concurrent reads then reach Scylla once. `Sidecar` runs one in-process (an async
context manager); `coalesce sidecar` runs one from the command line.
"""

from coalesce.sidecar.config import SidecarConfig
from coalesce.sidecar.errors import (
    ConfigError,
    SidecarError,
    UpstreamError,
    UpstreamLost,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from coalesce.sidecar.server import Sidecar

__all__ = [
    "ConfigError",
    "Sidecar",
    "SidecarConfig",
    "SidecarError",
    "UpstreamError",
    "UpstreamLost",
    "UpstreamRefused",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]
