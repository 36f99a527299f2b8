"""A ring of sidecars whose members come from a real etcd: joins and leaves, end to end."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from coalesce.sidecar import Sidecar
from coalesce.sidecar.members import member_name

from .conftest import eventually, sidecar_config
from .cqlclient import RawClient, rows_of
from .test_membership import EtcdServer, etcd  # noqa: F401 -- the etcd fixture
from .test_ring import READ, WRITE, MakeRing, _free_ports, _int, _write, ring_stack  # noqa: F401

pytestmark = pytest.mark.timeout(60)


def _names(sidecar: Sidecar) -> set[str]:
    ring = sidecar.ring
    return {m.name for m in ring.members} if ring is not None else set()


async def test_members_from_etcd_merge_a_herd_and_see_leaves_and_joins(
    ring_stack: MakeRing, etcd: EtcdServer, request: pytest.FixtureRequest,  # noqa: F811
) -> None:
    url = f"etcd://127.0.0.1:{etcd.port}/test/{request.node.name}/"
    ring = await ring_stack(3, membership=url, lease_ttl=2.0)
    everyone = {member_name("127.0.0.1", s.port) for s in ring.sidecars}
    for sidecar in ring.sidecars:
        await eventually(lambda s=sidecar: _names(s) == everyone, timeout=3)

    # A round-robin herd on one partition: one upstream read for the whole ring.
    clients = [await ring.client(i % 3) for i in range(3)]
    ids = [(await c.prepare(READ)).query_id for c in clients]
    await _write(clients[0], (await clients[0].prepare(WRITE)).query_id, 5, "five")
    hold = ring.emulator.hold_reads()
    before = ring.emulator.statements["select"]
    herd = [c.send_execute(i, [_int(5)]) for c, i in zip(clients * 30, ids * 30, strict=True)]
    owner = ring.sidecars[ring.owner_of(5)]
    await eventually(lambda: owner.stats.ring_served == 2)  # both other members forwarded
    hold.release()
    assert all(rows_of(r) == [[_int(5), b"five"]] for r in await asyncio.gather(*herd))
    assert ring.emulator.statements["select"] - before == 1

    # A member that stops revokes its lease: the others drop it at once, not after the TTL.
    leaving = ring.sidecars.pop(2)
    gone = member_name("127.0.0.1", leaving.port)
    await leaving.stop()
    for sidecar in ring.sidecars:
        await eventually(lambda s=sidecar: gone not in _names(s), timeout=1.5)
    key = next(k for k in range(10_000) if ring.owner_of(k) in (0, 1))
    assert rows_of(await clients[0].send_execute(ids[0], [_int(key)])) == []

    # A newcomer is seen by everyone within a second or two.
    port = _free_ports(1)[0]
    newcomer = Sidecar(sidecar_config((ring.emulator.host, ring.emulator.port),
                                      listen=("127.0.0.1", port), membership=url,
                                      lease_ttl=2.0, vnodes=16))
    await newcomer.start()
    ring.sidecars.append(newcomer)
    joined = member_name("127.0.0.1", port)
    for sidecar in ring.sidecars:
        await eventually(lambda s=sidecar: joined in _names(s), timeout=2)
    assert len(_names(newcomer)) == 3
    for c in clients:
        await c.close()


async def test_without_etcd_a_member_serves_alone_and_never_hangs(
    ring_stack: MakeRing,  # noqa: F811
) -> None:
    port = _free_ports(1)[0]
    ring = await ring_stack(1, membership=f"etcd://127.0.0.1:{port}/nowhere/", lease_ttl=2.0)
    sidecar: Any = ring.sidecars[0]
    assert _names(sidecar) == {member_name("127.0.0.1", sidecar.port)}  # a ring of one
    client = await RawClient.connect("127.0.0.1", sidecar.port)
    read = (await client.prepare(READ)).query_id
    assert rows_of(await client.send_execute(read, [_int(1)])) == []
    assert sidecar.stats.ring_forwarded == 0
    await client.close()
