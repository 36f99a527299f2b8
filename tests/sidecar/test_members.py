"""The ring of sidecars as a data structure: owners, movement, bounded loads."""

from __future__ import annotations

import bisect
import random

import pytest
from cassandra.metadata import Murmur3Token
from hypothesis import given
from hypothesis import strategies as st

from coalesce.sidecar.members import SidecarRing, member_name

NAMES = [member_name(f"10.0.0.{i}", 9042) for i in range(1, 9)]


def _driver_owner(ring: SidecarRing, key: bytes) -> str:
    """The owner as cassandra-driver's token map finds it: first token >= the key's."""
    points = sorted((t, m.name) for m in ring.members for t in m.tokens)
    tokens = [t for t, _ in points]
    i = bisect.bisect_left(tokens, Murmur3Token.from_key(key).value)
    return points[i % len(points)][1]


@given(st.lists(st.binary(max_size=24), min_size=1, max_size=50))
def test_owners_are_what_a_token_aware_driver_computes(keys: list[bytes]) -> None:
    ring = SidecarRing(NAMES[0], NAMES[:5], vnodes=32)
    for key in keys:
        owner = ring.owner_of(key)
        assert owner is not None and owner.name == _driver_owner(ring, key)


def test_a_token_equal_to_a_position_belongs_to_that_member() -> None:
    ring = SidecarRing(NAMES[0], NAMES[:3], vnodes=8)
    for member in ring.members:
        for token in member.tokens:
            owner = ring.owner(token)
            assert owner is not None and owner.name == member.name
            before = ring.owner(token + 1)
            assert before is not None  # the next one's (or wraps): never an error


def test_tokens_depend_on_the_name_and_vnodes_only() -> None:
    a = SidecarRing(NAMES[0], NAMES[:4], vnodes=16)
    b = SidecarRing(NAMES[3], reversed(NAMES[:4]), vnodes=16)
    assert {m.name: m.tokens for m in a.members} == {m.name: m.tokens for m in b.members}
    assert all(len(m.tokens) == 16 for m in a.members)
    assert len(SidecarRing("x:1", ["x:1"], vnodes=3).members[0].tokens) == 3


def test_a_join_or_a_leave_moves_about_one_nth_of_the_partitions() -> None:
    rng = random.Random(7)
    keys = [rng.randbytes(8) for _ in range(20_000)]
    ring = SidecarRing(NAMES[0], NAMES[:7], vnodes=256)
    before = {k: ring.owner_of(k).name for k in keys}  # type: ignore[union-attr]
    added, removed = ring.update(NAMES[:8])
    assert [m.name for m in added] == [NAMES[7]] and removed == []
    after = {k: ring.owner_of(k).name for k in keys}  # type: ignore[union-attr]
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == NAMES[7] for k in moved)  # only to the newcomer
    assert 0.5 / 8 < len(moved) / len(keys) < 2 / 8
    added, removed = ring.update(NAMES[:7])
    assert added == [] and [m.name for m in removed] == [NAMES[7]]
    assert {k: ring.owner_of(k).name for k in keys} == before  # type: ignore[union-attr]


def test_members_and_others() -> None:
    ring = SidecarRing(NAMES[1], NAMES[:3], vnodes=4)
    assert [m.name for m in ring.others] == [NAMES[0], NAMES[2]]
    assert not ring.owns_all
    assert SidecarRing(NAMES[0], [NAMES[0]]).owns_all
    assert SidecarRing(NAMES[0]).owner(0) is None
    outside = SidecarRing("10.9.9.9:9042", NAMES[:2], vnodes=4)
    assert len(outside.others) == 2  # out of the ring: everything goes to the members


@pytest.mark.parametrize("bad", [{"vnodes": 0}, {"vnodes": True}, {"load_factor": 1.0},
                                 {"load_factor": float("nan")}])
def test_bad_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SidecarRing(NAMES[0], NAMES[:2], **bad)  # type: ignore[arg-type]


def test_a_bad_name_changes_nothing() -> None:
    ring = SidecarRing(NAMES[0], NAMES[:2], vnodes=4)
    with pytest.raises(ValueError):
        ring.update([*NAMES[:2], "host:99999"])
    assert len(ring) == 2


def test_bounded_loads_serve_here_once_the_owner_is_past_its_bound() -> None:
    ring = SidecarRing(NAMES[0], NAMES[:4], vnodes=64, load_factor=1.25)
    token = next(t for m in ring.members if m.name == NAMES[2] for t in m.tokens)
    chosen = []
    for total in range(1, 41):
        member = ring.choose(token)
        chosen.append(member.name if member is not None else None)
        ring.acquire(member.name if member is not None else ring.me)
        # The owner never holds more than ceil(1.25 * total / 4) of the reads.
        assert ring.load(NAMES[2]) <= -(-125 * total // 400)
    assert chosen[0] == NAMES[2]  # the owner while it has room
    assert None in chosen  # served here once it had its share
    assert ring.load(NAMES[2]) == 13  # ceil(1.25 * 40 / 4)
    for name in [NAMES[2]] * ring.load(NAMES[2]) + [NAMES[0]] * ring.load(NAMES[0]):
        ring.release(name)
    assert ring.load(NAMES[2]) == ring.load(NAMES[0]) == 0
    with pytest.raises(ValueError):
        ring.release(NAMES[2])
    free = SidecarRing(NAMES[0], NAMES[:4], vnodes=64)
    assert all(free.choose(token).name == NAMES[2] for _ in range(10))  # type: ignore[union-attr]


def test_the_bound_is_exact_decimal_arithmetic() -> None:
    ring = SidecarRing(NAMES[0], NAMES[:2], vnodes=8, load_factor=1.1)
    token = ring.others[0].tokens[0]
    for _ in range(55):
        ring.acquire(NAMES[1])
    for _ in range(44):
        ring.acquire(NAMES[0])
    # ceil(1.1 * 100 / 2) is 55, not 56 as 1.1 in binary floating point would make it.
    assert ring.choose(token) is None
