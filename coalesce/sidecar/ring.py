"""The real cluster's token ring: which upstream node owns a partition.

A token belongs to the node with the smallest token >= it, wrapping around, as in
Cassandra's Murmur3 ring. The sidecar learns each node's tokens from its
``system.local`` and sends a request with a known partition to its owner.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Iterable

from coalesce.cql.token import murmur3_token as token_of

__all__ = ["Ring", "token_of"]


class Ring:
    """Tokens of the upstream cluster and the node owning each.

    Nodes are any hashable handle. Single event loop.
    """

    __slots__ = ("_by_node", "_owners", "_tokens")

    def __init__(self) -> None:
        self._by_node: dict[Hashable, tuple[int, ...]] = {}
        self._tokens: list[int] = []
        self._owners: list[Hashable] = []

    def __len__(self) -> int:
        return len(self._tokens)

    def set_tokens(self, node: Hashable, tokens: Iterable[int]) -> None:
        """Replace what `node` owns (an empty iterable removes it)."""
        owned = tuple(sorted(set(tokens)))
        if owned:
            self._by_node[node] = owned
        else:
            self._by_node.pop(node, None)
        # Nodes need not be orderable: sort by token, ties by insertion order.
        pairs = sorted(
            ((t, i, n) for i, (n, ts) in enumerate(self._by_node.items()) for t in ts),
            key=lambda item: (item[0], item[1]),
        )
        self._tokens = [t for t, _, _ in pairs]
        self._owners = [n for _, _, n in pairs]

    def owner(self, token: int) -> Hashable | None:
        """The node owning `token`, None while no node's tokens are known."""
        if not self._tokens:
            return None
        i = bisect.bisect_left(self._tokens, token)
        return self._owners[i if i < len(self._tokens) else 0]

    def tokens(self) -> frozenset[int]:
        """Every token of the ring."""
        return frozenset(self._tokens)
