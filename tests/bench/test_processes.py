"""`ServerGroup`: servers start on free ports, say why they did not, and always stop."""

from __future__ import annotations

import asyncio
import socket

import pytest

from coalesce.bench.processes import ServerGroup, ServerProcess, ServerStartError, free_ports

pytestmark = pytest.mark.timeout(60)


def _emulator(group: ServerGroup, port: int, metrics: int) -> ServerProcess:
    return group.start("emulator", ["emulator", "--listen", f"127.0.0.1:{port}",
                                    "--metrics", f"127.0.0.1:{metrics}"],
                       port=port, metrics_port=metrics)


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(8)
    assert len(set(ports)) == 8
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


async def test_a_server_whose_port_is_taken_fails_saying_so() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with ServerGroup() as group:
            server = _emulator(group, port, *free_ports(1))
            with pytest.raises(ServerStartError) as caught:
                await group.ready(server)
    assert caught.value.address_in_use
    assert "emulator exited" in str(caught.value)


async def test_leaving_the_group_stops_its_servers_even_when_cancelled() -> None:
    started: list[ServerProcess] = []
    ready = asyncio.Event()

    async def run() -> None:
        async with ServerGroup() as group:
            server = _emulator(group, *free_ports(2))
            started.append(server)
            await group.ready(server)
            ready.set()
            await asyncio.Event().wait()  # until cancelled

    task = asyncio.get_running_loop().create_task(run())
    await asyncio.wait_for(ready.wait(), 30)
    assert started[0].popen.poll() is None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert started[0].popen.poll() is not None
