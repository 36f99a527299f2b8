"""The ring of sidecars: which member merges the reads of a partition.

Members sit on one ``uhashring`` ring whose hash is Scylla's Murmur3, so a ring
position is a CQL token. A member named ``host:port`` (its advertised address) has
``vnodes`` positions, the tokens of ``"host:port-0"``, ``"host:port-1"``, ... A
partition belongs to the member with the smallest position at or after its token,
wrapping around: the rule of Cassandra's ring, and so exactly the member a token-aware
driver picks from the tokens the members advertise in ``system.local`` and
``system.peers``. A member's tokens depend on its name and ``vnodes`` only, so every
member computes the same ring from the same list of names, whatever told it the names
(a static list, DNS, etcd), and adding or removing a member moves only the ranges
next to its positions (about 1/N of the partitions).

Bounded loads ("Consistent Hashing with Bounded Loads", Mirrokni, Thorup and
Zadimoghaddam, 2016), off unless ``load_factor`` is set: a member counts the merged
reads it has in flight through each member, itself included, and sends a read to its
owner only while that keeps the owner within ``ceil(load_factor * (total + 1) / N)``;
past that it serves the read itself. Single event loop.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable
from fractions import Fraction
from typing import Final

from uhashring import HashRing

from coalesce.cql.token import murmur3_token
from coalesce.sidecar.advertised import host_id_for
from coalesce.sidecar.config import parse_address

__all__ = ["DEFAULT_VNODES", "Member", "SidecarRing", "member_name"]

DEFAULT_VNODES: Final = 256
"""Positions per member: Scylla's own default ``num_tokens``; each member's share of
the ring is then within about 10% of 1/N."""


def member_name(host: str, port: int) -> str:
    """The name a member has on the ring: its advertised address, ``host:port``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _position(item: str | int) -> int:
    # uhashring hashes its own point names ("name-i", str) and the keys it is asked
    # for. Keys are tokens (int): it returns the first point *after* the key's hash,
    # so a token t is looked up as t - 1 to get the first point at or after t.
    if isinstance(item, str):
        return murmur3_token(item.encode("utf-8"))
    return item - 1


class Member:
    """One sidecar of the ring: its advertised address, host id and tokens."""

    __slots__ = ("host", "host_id", "name", "port", "tokens")

    def __init__(self, name: str, tokens: tuple[int, ...]) -> None:
        host, port = parse_address(name, default_port=0)
        self.name = name
        self.host = host
        self.port = port
        self.host_id: uuid.UUID = host_id_for(host, port)
        self.tokens = tokens

    def __repr__(self) -> str:
        return f"<Member {self.name}>"


class SidecarRing:
    """The members, their positions, and the owner of each token.

    `me` is this sidecar's member name. It need not be a member: a sidecar outside the
    ring (not listed yet, or whose etcd lease was lost) owns nothing and sends every
    read to its owner.
    """

    __slots__ = ("_load_factor", "_loads", "_members", "_ring", "_total", "me", "vnodes")

    def __init__(
        self,
        me: str,
        members: Iterable[str] = (),
        *,
        vnodes: int = DEFAULT_VNODES,
        load_factor: float | None = None,
    ) -> None:
        if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
            raise ValueError(f"vnodes must be a positive int, got {vnodes!r}")
        if load_factor is not None and not (math.isfinite(load_factor) and load_factor > 1.0):
            raise ValueError(f"load_factor must be a finite number > 1.0, got {load_factor!r}")
        self.me = me
        self.vnodes = vnodes
        # Exactly the decimal written, so 1.1 * 10 is 11 (not 11.000000000000002).
        self._load_factor = None if load_factor is None else Fraction(repr(float(load_factor)))
        self._ring = HashRing(nodes=[], hash_fn=_position, vnodes=vnodes)
        self._members: dict[str, Member] = {}
        self._loads: dict[str, int] = {}
        self._total = 0
        self.update(members)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def __repr__(self) -> str:
        return f"SidecarRing(me={self.me!r}, members={sorted(self._members)!r})"

    # -- membership -------------------------------------------------------------------

    def update(self, names: Iterable[str]) -> tuple[list[Member], list[Member]]:
        """Make the ring exactly `names`; return the members (added, removed)."""
        wanted = dict.fromkeys(names)
        removed = [m for name, m in self._members.items() if name not in wanted]
        for member in removed:
            del self._members[member.name]
            self._ring.remove_node(member.name)
        added_names = [name for name in wanted if name not in self._members]
        for name in added_names:
            parse_address(name, default_port=0)  # a bad name fails before anything changes
        for name in added_names:
            self._ring.add_node(name, {"vnodes": self.vnodes})
        points: dict[str, list[int]] = {name: [] for name in added_names}
        if added_names:
            for point, name in self._ring.get_points():
                if name in points:
                    points[name].append(point)
        added = [Member(name, tuple(points[name])) for name in added_names]
        for member in added:
            self._members[member.name] = member
        return added, removed

    @property
    def members(self) -> tuple[Member, ...]:
        return tuple(self._members.values())

    def member(self, name: str) -> Member | None:
        return self._members.get(name)

    @property
    def others(self) -> tuple[Member, ...]:
        """Every member but this sidecar."""
        return tuple(m for name, m in self._members.items() if name != self.me)

    @property
    def owns_all(self) -> bool:
        """Nothing to forward: this sidecar is the ring's only member, or there is no ring."""
        members = self._members
        return not members or (len(members) == 1 and self.me in members)

    # -- lookups -----------------------------------------------------------------------

    def owner(self, token: int) -> Member | None:
        """The member owning `token`; None for an empty ring."""
        name = self._ring.get_node(token)
        return None if name is None else self._members[name]

    def owner_of(self, partition: bytes) -> Member | None:
        """The member owning a serialized partition key."""
        return self.owner(murmur3_token(partition))

    # -- bounded loads -------------------------------------------------------------------

    def choose(self, token: int) -> Member | None:
        """The member to send a merged read of `token` to, None to serve it here.

        That is its owner, unless this sidecar owns it (or there is no ring) or, with
        bounded loads on, sending it would take the owner over its bound.
        """
        owner = self.owner(token)
        if owner is None or owner.name == self.me:
            return None
        if self._load_factor is None:
            return owner
        bound = math.ceil(self._load_factor * (self._total + 1) / len(self._members))
        return owner if self._loads.get(owner.name, 0) + 1 <= bound else None

    def acquire(self, name: str) -> None:
        """A merged read went to member `name` (self included); pair with `release`."""
        self._loads[name] = self._loads.get(name, 0) + 1
        self._total += 1

    def release(self, name: str) -> None:
        load = self._loads.get(name, 0)
        if load <= 0:
            raise ValueError(f"release of member {name!r} without a matching acquire")
        if load == 1:
            del self._loads[name]
        else:
            self._loads[name] = load - 1
        self._total -= 1

    def load(self, name: str) -> int:
        return self._loads.get(name, 0)

    @property
    def bounded(self) -> bool:
        return self._load_factor is not None
