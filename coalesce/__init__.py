"""coalesce: single-flight request coalescing for asyncio, in front of ScyllaDB.

`SingleFlight` is the in-flight table; `coalesced` puts it on an async function.
The Scylla sessions live in `coalesce.scylla`, the router in `coalesce.router`, the
CQL proxy in `coalesce.sidecar`, and the test-only Scylla emulator in
`coalesce.emulator`.
"""

from coalesce.decorator import Coalesced, coalesced
from coalesce.errors import (
    CoalesceError,
    LoopMismatchError,
    NoNodesError,
    Overloaded,
    ReentrantCallError,
)
from coalesce.flight import SingleFlight
from coalesce.keys import CallKey

__all__ = [
    "CallKey",
    "CoalesceError",
    "Coalesced",
    "LoopMismatchError",
    "NoNodesError",
    "Overloaded",
    "ReentrantCallError",
    "SingleFlight",
    "coalesced",
]
