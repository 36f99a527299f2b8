"""coalesce: single-flight request coalescing for asyncio, in front of ScyllaDB.

`SingleFlight` is the in-flight table; `coalesced` puts it on an async function.
The Scylla sessions live in `coalesce.scylla`, the CQL proxy in `coalesce.sidecar`.
"""

from coalesce.decorator import Coalesced, coalesced
from coalesce.errors import CoalesceError, LoopMismatchError, Overloaded
from coalesce.flight import SingleFlight
from coalesce.keys import CallKey

__all__ = [
    "CallKey",
    "CoalesceError",
    "Coalesced",
    "LoopMismatchError",
    "Overloaded",
    "SingleFlight",
    "coalesced",
]
