"""The exception hierarchy of `coalesce`: everything it raises on its own account."""

from __future__ import annotations

__all__ = [
    "CoalesceError",
    "LoopMismatchError",
    "NoNodesError",
    "Overloaded",
    "ReentrantCallError",
]


class CoalesceError(Exception):
    """Base class of the errors raised by `coalesce` itself (never by your function)."""


class Overloaded(CoalesceError):
    """A bound of a `SingleFlight` group was reached and the caller was shed.

    Raised at once, before any upstream work is started for this caller, when a key
    already has ``max_waiters`` callers, or when ``max_inflight`` upstream calls are
    running and the bounded queue (``max_queued``) is full. The sidecar turns it into
    the CQL ``Overloaded`` error.
    """


class LoopMismatchError(CoalesceError, RuntimeError):
    """A group with calls in flight on one event loop was used from another loop."""


class NoNodesError(CoalesceError, LookupError):
    """A key was routed on a `Router` that has no nodes."""


class ReentrantCallError(CoalesceError, RuntimeError):
    """A call awaited its own key from inside itself, and would have waited forever."""
