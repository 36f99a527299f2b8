"""Consistent-hash routing of keys to instances, with optional bounded loads.

A :class:`Router` places every node on a ``uhashring`` ring (``vnodes`` points
per unit of weight) and sends a key to the first point at or after the key's
hash. Adding a node only takes keys *to* that node; removing one only moves
that node's keys. With ``load_factor`` set, :meth:`Router.acquire` applies
"Consistent Hashing with Bounded Loads" (Mirrokni, Thorup, Zadimoghaddam,
2016) so one hot key spills past its owner instead of piling onto it.

Key hashing is defined on bytes and is stable across processes, machines and
Python's hash randomisation: a key is the MD5 of its byte form, read as a
big-endian 128-bit integer. The byte form is

* ``bytes``: the bytes themselves;
* ``str``: its UTF-8 encoding;
* ``int``: 8 bytes, big-endian, two's complement (fits -2**63 .. 2**63-1).

These are the CQL ``blob``, ``text`` and ``bigint`` serialisations, so for a
table with a single-column partition key of one of those types,
``node_for(channel_id)`` equals ``node_for(statement.routing_key)`` as the
drivers compute it. A ``str`` key and a node name hash exactly as
``uhashring``'s default ``HashRing`` does, so a plain ``uhashring`` client
with the same node names and ``vnodes`` agrees with this router on ``str``
keys.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from fractions import Fraction
from hashlib import md5
from typing import Generic, TypeVar

from uhashring import HashRing

from coalesce.errors import NoNodesError

__all__ = ["Key", "NoNodesError", "Router"]

N = TypeVar("N", bound=Hashable)

Key = str | bytes | int
"""What a router can route: see the module docstring for how each is hashed."""

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def _hash(data: str | bytes) -> int:
    # uhashring calls this for its own vnode point names (str) and for the
    # keys we hand it (already bytes); both hash as MD5 of their bytes.
    if isinstance(data, str):
        data = data.encode("utf-8")
    return int.from_bytes(md5(data, usedforsecurity=False).digest(), "big")


def _key_bytes(key: Key) -> bytes:
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode("utf-8")
    # bool is an int subclass, but routing on True/False is almost surely a bug.
    if isinstance(key, int) and not isinstance(key, bool):
        if not _INT64_MIN <= key <= _INT64_MAX:
            raise ValueError(f"int routing key {key} does not fit in 64 bits")
        return key.to_bytes(8, "big", signed=True)
    raise TypeError(f"routing key must be str, bytes or int, not {type(key).__name__}")


def _parse_load_factor(load_factor: float | None) -> Fraction | None:
    if load_factor is None:
        return None
    if not math.isfinite(load_factor) or load_factor <= 1.0:
        raise ValueError(f"load_factor must be a finite number > 1.0, got {load_factor!r}")
    # Exact decimal value of what the caller wrote, so 1.1 * 10 is 11, not
    # 11.000000000000002 (which would round the bound up by one).
    return Fraction(repr(float(load_factor)))


def _check_weight(node: object, weight: int) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise ValueError(f"weight of node {node!r} must be a positive int, got {weight!r}")
    return weight


class Router(Generic[N]):
    """Route keys to nodes on a consistent-hash ring.

    Nodes are hashable values whose ``str()`` is stable and unique among the
    router's nodes (``"10.0.0.1:9042"``, or an object with such a ``__str__``);
    the ring positions come from ``str(node)``, so equal names mean equal
    placement in every process.

    ``weights`` gives a node ``vnodes * weight`` ring points, so its share of
    keys grows in proportion (default weight 1). Weights must name nodes in
    ``nodes``.

    ``load_factor=c`` (``c > 1``) turns on bounded loads for :meth:`acquire`:
    no node is handed a request that would take its in-flight load above
    ``ceil(c * (total_load + 1) * weight / total_weight)``, which for equal
    weights is ``ceil(c * (total_load + 1) / len(router))``. Such a node always
    exists, so :meth:`acquire` never fails for want of capacity.

    Concurrency: a router is not thread-safe. Use it from one thread or one
    event loop (all methods are synchronous and never yield, so asyncio tasks
    on one loop cannot interleave inside a call); guard it with a lock to share
    it between threads.
    """

    __slots__ = (
        "_by_name",
        "_load_factor",
        "_loads",
        "_ring",
        "_total_load",
        "_total_weight",
        "_version",
        "_vnodes",
        "_weights",
    )

    def __init__(
        self,
        nodes: Iterable[N] = (),
        *,
        vnodes: int = 160,
        weights: Mapping[N, int] | None = None,
        load_factor: float | None = None,
    ) -> None:
        """Build a ring of ``nodes``.

        Raises ``ValueError`` for a duplicate node (or two nodes with the same
        ``str``), ``vnodes < 1``, a non-positive weight, a weight for a node not
        in ``nodes``, or ``load_factor <= 1.0``.
        """
        if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
            raise ValueError(f"vnodes must be a positive int, got {vnodes!r}")
        self._vnodes = vnodes
        self._load_factor = _parse_load_factor(load_factor)
        self._by_name: dict[str, N] = {}
        self._weights: dict[N, int] = {}
        self._total_weight = 0
        # In-flight load per node. A node removed while loaded keeps its entry
        # until released, but only ring members count towards _total_load.
        self._loads: dict[N, int] = {}
        self._total_load = 0
        # Bumped on every membership change so live ring walks can notice.
        self._version = 0

        given = dict(weights or {})
        node_list = list(nodes)
        members = set(node_list)
        unknown = [n for n in given if n not in members]
        if unknown:
            raise ValueError(f"weights given for nodes not in the ring: {unknown!r}")
        for node in node_list:
            self._check_new(node)
            weight = _check_weight(node, given.get(node, 1))
            self._by_name[str(node)] = node
            self._weights[node] = weight
            self._total_weight += weight
        # One ring build for all nodes rather than a re-sort per node.
        self._ring = HashRing(
            nodes={str(n): {"weight": w, "vnodes": vnodes} for n, w in self._weights.items()},
            hash_fn=_hash,
            vnodes=vnodes,
        )

    # -- membership -----------------------------------------------------------

    def _check_new(self, node: N) -> None:
        name = str(node)
        if node in self._weights:
            raise ValueError(f"node {node!r} is already in the ring")
        if name in self._by_name:
            raise ValueError(
                f"node {node!r} has the same name {name!r} as node {self._by_name[name]!r}"
            )

    def add(self, node: N, weight: int | None = None) -> None:
        """Put ``node`` on the ring with ``weight`` (default 1).

        Only keys that now hash to ``node`` move, and they all move to it.
        Raises ``ValueError`` if the node (or another node with the same
        ``str``) is already present or the weight is not a positive int. If
        the node was removed while it still had load, that unreleased load
        counts again.
        """
        self._check_new(node)
        weight = _check_weight(node, 1 if weight is None else weight)
        name = str(node)
        self._ring.add_node(name, {"weight": weight, "vnodes": self._vnodes})
        self._by_name[name] = node
        self._weights[node] = weight
        self._total_weight += weight
        self._total_load += self._loads.get(node, 0)
        self._version += 1

    def remove(self, node: N) -> None:
        """Take ``node`` off the ring; only its keys move, each to its ring successor.

        Raises ``KeyError`` naming the node if it is not on the ring. Requests
        already acquired on ``node`` stay outstanding: their load stops counting
        towards the bound of the remaining nodes, and :meth:`release` for them
        is still accepted (and needed, to balance the books if the node is
        added back).
        """
        if node not in self._weights:
            raise KeyError(f"node {node!r} is not in the ring")
        self._ring.remove_node(str(node))
        del self._by_name[str(node)]
        self._total_weight -= self._weights.pop(node)
        self._total_load -= self._loads.get(node, 0)
        self._version += 1

    @property
    def nodes(self) -> tuple[N, ...]:
        """The ring's nodes, in the order they were added."""
        return tuple(self._weights)

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, node: object) -> bool:
        return node in self._weights

    def __repr__(self) -> str:
        lf = "" if self._load_factor is None else f", load_factor={float(self._load_factor)}"
        return f"Router({list(self._weights)!r}, vnodes={self._vnodes}{lf})"

    # -- lookup ---------------------------------------------------------------

    def _require_nodes(self) -> None:
        if not self._weights:
            raise NoNodesError("cannot route a key: the router has no nodes")

    def node_for(self, key: Key) -> N:
        """Return the node owning ``key``.

        Raises ``NoNodesError`` on an empty ring, ``TypeError`` for a key that
        is not str, bytes or int, ``ValueError`` for an int outside 64 bits.
        Does not touch loads.
        """
        data = _key_bytes(key)
        self._require_nodes()
        name: str = self._ring.get_node(data)
        return self._by_name[name]

    def nodes_for(self, key: Key) -> Iterator[N]:
        """Walk the ring from ``key``'s owner onward, yielding each node once.

        The first node is :meth:`node_for` ``(key)``; the rest are the order
        in which the key would fail over if the nodes before were down. Errors
        for the key or an empty ring are raised here, not on first ``next()``.
        The walk is lazy: if nodes are added or removed before it finishes, the
        next ``next()`` raises ``RuntimeError`` (as iterating a changed dict
        does); take ``list(...)`` first to keep a snapshot.
        """
        data = _key_bytes(key)
        self._require_nodes()
        return self._walk(data)

    def _walk(self, data: bytes) -> Iterator[N]:
        version = self._version
        for conf in self._ring.range(data, unique=True):
            if self._version != version:
                raise RuntimeError("router membership changed during a ring walk")
            yield self._by_name[conf["nodename"]]
        if self._version != version:
            raise RuntimeError("router membership changed during a ring walk")

    # -- bounded loads --------------------------------------------------------

    def _has_room(self, node: N) -> bool:
        lf = self._load_factor
        if lf is None:
            return True
        # ceil(c * (total + 1) * w / W) in exact integer arithmetic.
        num = lf.numerator * (self._total_load + 1) * self._weights[node]
        den = lf.denominator * self._total_weight
        bound = -(-num // den)
        return self._loads.get(node, 0) + 1 <= bound

    def acquire(self, key: Key) -> N:
        """Pick a node for one request on ``key`` and count it as in flight there.

        Without ``load_factor`` this is :meth:`node_for` plus bookkeeping. With
        it, the result is the first node in :meth:`nodes_for` ``(key)`` whose
        load after this request stays within the bound (see the class
        docstring), so the owner is chosen whenever it has room. Every
        successful call must be paired with one :meth:`release` of the returned
        node; prefer :meth:`route`, which does that on every exit path. Raises
        as :meth:`node_for` does, leaving loads unchanged.
        """
        data = _key_bytes(key)
        self._require_nodes()
        chosen: N | None = None
        if self._load_factor is None:
            chosen = self._by_name[self._ring.get_node(data)]
        else:
            for node in self._walk(data):
                if self._has_room(node):
                    chosen = node
                    break
        # The bound always admits some member (all full would need
        # total >= c * (total + 1) > total), so the walk cannot come up empty.
        assert chosen is not None
        self._loads[chosen] = self._loads.get(chosen, 0) + 1
        self._total_load += 1
        return chosen

    def release(self, node: N) -> None:
        """Mark one request acquired on ``node`` as finished.

        Accepted for a node that has since been removed. Raises ``ValueError``
        naming the node if it has no outstanding load (a release without a
        matching :meth:`acquire`); loads never go negative.
        """
        load = self._loads.get(node, 0)
        if load <= 0:
            raise ValueError(f"release of node {node!r} without a matching acquire")
        if load == 1:
            del self._loads[node]
        else:
            self._loads[node] = load - 1
        if node in self._weights:
            self._total_load -= 1

    @contextmanager
    def route(self, key: Key) -> Iterator[N]:
        """``with router.route(key) as node:`` -- :meth:`acquire` on entry, :meth:`release` on exit.

        The release happens however the block exits: normally, by exception,
        or by task cancellation (``CancelledError`` raised at an ``await``
        inside the block). Being a plain synchronous context manager, it is
        used the same way inside coroutines.
        """
        node = self.acquire(key)
        try:
            yield node
        finally:
            self.release(node)

    def load(self, node: N) -> int:
        """In-flight requests acquired on ``node`` and not yet released (0 if none)."""
        return self._loads.get(node, 0)
