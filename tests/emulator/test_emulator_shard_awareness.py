"""Looking like Scylla to shard-aware drivers: SUPPORTED keys, connection shards, hops.

Driver-free: raw connections pick their own client port, so which shard
they land on is known exactly. The real drivers are in
test_emulator_scylla_driver.py, test_emulator_acsylla.py and
test_emulator_node_driver.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coalesce.cql.frame import Opcode, encode_frame
from coalesce.cql.messages import Query, QueryParameters, Supported
from coalesce.emulator import Emulator, EmulatorConfig, EmulatorThread, ShardModel, shard_of
from coalesce.emulator.command import config_from_args, configure_parser
from coalesce.emulator.shard_awareness import ShardAssigner, placement, sharding_options
from coalesce.emulator.shards import IGNORE_MSB_BITS, PARTITIONER, SHARDING_ALGORITHM
from coalesce.emulator.storage import routing_key, token_of
from tests.conftest import examples
from tests.emulator.rawcql import RawConnection

pytestmark = pytest.mark.timeout(60)

SHARDS = 4


def _driver_shard_id(token: int, shards: int, ignore_msb: int) -> int:
    """The shard as scylla-driver's pure-Python fallback computes it: 32-bit halves."""
    biased = ((token + 2**63) << ignore_msb) & (2**64 - 1)
    low, high = biased & 0xFFFFFFFF, biased >> 32
    return (((low * shards) >> 32) + high * shards) >> 32


@settings(max_examples=examples(300), deadline=None)
@given(st.integers(-(2**63), 2**63 - 1), st.integers(1, 256), st.integers(0, 16))
def test_shard_of_agrees_with_the_drivers_split_multiplication(
    token: int, shards: int, ignore_msb: int
) -> None:
    assert shard_of(token, shards, ignore_msb) == _driver_shard_id(token, shards, ignore_msb)


@settings(max_examples=examples(300), deadline=None)
@given(st.integers(-(2**63), 2**63 - 1), st.integers(1, 256))
def test_shard_of_agrees_with_scylla_drivers_sharding_info(token: int, shards: int) -> None:
    shard_info = pytest.importorskip("cassandra.shard_info", reason="needs scylla-driver")
    info = shard_info.ShardingInfo(
        0, shards, PARTITIONER, SHARDING_ALGORITHM, IGNORE_MSB_BITS, None, None
    )
    assert shard_of(token, shards) == info.shard_id_from_token(token)


def test_sharding_options_are_what_scylla_sends() -> None:
    assert sharding_options(2, 8, 19042) == {
        "SCYLLA_SHARD": ["2"],
        "SCYLLA_NR_SHARDS": ["8"],
        "SCYLLA_PARTITIONER": ["org.apache.cassandra.dht.Murmur3Partitioner"],
        "SCYLLA_SHARDING_ALGORITHM": ["biased-token-round-robin"],
        "SCYLLA_SHARDING_IGNORE_MSB": ["12"],
        "SCYLLA_SHARD_AWARE_PORT": ["19042"],
    }
    assert "SCYLLA_SHARD_AWARE_PORT" not in sharding_options(0, 8, None)


def test_shard_aware_port_uses_the_client_port_and_the_cql_port_takes_turns() -> None:
    assigner = ShardAssigner(4)
    assert [assigner.assign(p, shard_aware_port=True) for p in (61000, 61001, 61007)] == [0, 1, 3]
    assert [assigner.assign(61003, shard_aware_port=False) for _ in range(6)] == [0, 1, 2, 3, 0, 1]


def test_placement_tells_local_wrong_and_multi_shard_requests_apart() -> None:
    assert placement([], 0) is None
    assert placement([1], 1) == "local"
    assert placement([2], 1) == "wrong"
    assert placement([1, 2], 1) == "multi"


def test_a_remote_part_starts_one_hop_late_without_holding_any_shard() -> None:
    model = ShardModel(2)
    local = model.reserve(10.0, [(0, 0.001)], home=0, hop=0.5)
    remote = model.reserve(10.0, [(1, 0.001)], home=0, hop=0.5)
    free_remote = model.reserve(10.0, [(1, 0.0)], home=0, hop=0.5)
    assert local.done == pytest.approx(10.001)
    assert remote.done == pytest.approx(10.501)
    assert free_remote.done == pytest.approx(10.5) and free_remote.shards == ()
    # Shard 1 is busy until the remote part ends; a local request there queues behind it.
    assert model.reserve(10.0, [(1, 0.001)], home=1, hop=0.5).done == pytest.approx(10.502)


def test_config_rejects_a_shard_aware_port_equal_to_the_cql_port_or_a_negative_hop() -> None:
    with pytest.raises(ValueError, match="differ"):
        EmulatorConfig(port=9042, shard_aware=True, shard_aware_port=9042)
    with pytest.raises(ValueError, match="cross_shard_latency"):
        EmulatorConfig(cross_shard_latency=-1.0)


def test_cli_flags_map_onto_the_shard_aware_settings() -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    plain = config_from_args(parser.parse_args([]))
    assert (plain.shard_aware, plain.shard_aware_port, plain.cross_shard_latency) == (
        False,
        0,
        0.0,
    )
    args = ["--shard-aware", "--shard-aware-port", "none", "--cross-shard-latency", "50us"]
    config = config_from_args(parser.parse_args(args))
    assert (config.shard_aware, config.shard_aware_port) == (True, None)
    assert config.cross_shard_latency == pytest.approx(50e-6)
    with pytest.raises(SystemExit):
        parser.parse_args(["--shard-aware-port", "70000"])
    with pytest.raises(ValueError, match="needs --shard-aware"):
        config_from_args(parser.parse_args(["--shard-aware-port", "19042"]))


# ------------------------------------------------------------ over TCP


async def _supported(conn: RawConnection) -> dict[str, list[str]]:
    await conn.send(Opcode.OPTIONS, b"", stream=3)
    frame = await conn.read_frame()
    assert frame is not None and frame.opcode == Opcode.SUPPORTED
    return Supported.decode(frame.body).options


async def test_without_shard_awareness_supported_has_no_scylla_keys_and_no_second_port() -> None:
    async with Emulator(shards=SHARDS) as emu:
        assert emu.shard_aware_port is None
        async with await RawConnection.open(emu.host, emu.port) as conn:
            options = await _supported(conn)
        assert not [key for key in options if key.startswith("SCYLLA_")]
        assert "CQL_VERSION" in options


async def test_each_connection_to_the_shard_aware_port_is_on_client_port_modulo_shards() -> None:
    async with Emulator(shards=SHARDS, shard_aware=True) as emu:
        assert emu.shard_aware_port not in (None, 0, emu.port)
        assert emu.shard_aware_port is not None
        seen: list[tuple[int, int]] = []
        for _ in range(6):
            conn = await RawConnection.open(
                emu.host, emu.shard_aware_port, local_addr=("127.0.0.1", 0)
            )
            async with conn:
                options = await _supported(conn)
                assert options["SCYLLA_NR_SHARDS"] == [str(SHARDS)]
                assert options["SCYLLA_SHARD_AWARE_PORT"] == [str(emu.shard_aware_port)]
                seen.append((conn.local_port % SHARDS, int(options["SCYLLA_SHARD"][0])))
        assert all(expected == got for expected, got in seen), seen


async def test_connections_to_the_cql_port_are_given_shards_in_turn() -> None:
    async with Emulator(shards=SHARDS, shard_aware=True) as emu:
        shards = []
        conns = [await RawConnection.open(emu.host, emu.port) for _ in range(SHARDS + 2)]
        for conn in conns:
            shards.append(int((await _supported(conn))["SCYLLA_SHARD"][0]))
        assert shards == [0, 1, 2, 3, 0, 1]
        assert emu.connections_by_shard() == [2, 2, 1, 1]
        assert not any(info.shard_aware_port for info in emu.connections())
        for conn in conns:
            await conn.aclose()


async def test_without_a_shard_aware_port_the_keys_stay_and_the_port_key_goes() -> None:
    async with Emulator(shards=SHARDS, shard_aware=True, shard_aware_port=None) as emu:
        assert emu.shard_aware_port is None
        async with await RawConnection.open(emu.host, emu.port) as conn:
            options = await _supported(conn)
        assert options["SCYLLA_SHARD"] == ["0"]
        assert "SCYLLA_SHARD_AWARE_PORT" not in options


async def test_a_restart_listens_on_the_same_shard_aware_port() -> None:
    async with Emulator(shards=SHARDS, shard_aware=True) as emu:
        first = emu.shard_aware_port
        emu.stop()
        await emu.start()
        assert emu.shard_aware_port == first
        assert first is not None
        async with await RawConnection.open(emu.host, first) as conn:
            assert "SCYLLA_SHARD" in await _supported(conn)


# ------------------------------------------------------------ wrong shard


async def _table(conn: RawConnection) -> None:
    await conn.startup()
    for text in (
        "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', "
        "'replication_factor': 1}",
        "CREATE TABLE ks.kv (k int PRIMARY KEY, v text)",
    ):
        assert (await conn.query(text)).opcode == Opcode.RESULT


def _key_on(emu: Emulator, shard: int) -> int:
    column = emu.executor.schema.table("ks", "kv").partition_key
    return next(
        key
        for key in range(10_000)
        if shard_of(token_of(routing_key(column, (key,))), SHARDS) == shard
    )


def _select(key: int, stream: int) -> bytes:
    body = Query(f"SELECT * FROM ks.kv WHERE k = {key}", QueryParameters(1)).encode()
    return encode_frame(Opcode.QUERY, body, stream=stream)


async def test_only_reads_of_another_shards_partition_count_as_wrong_shard() -> None:
    async with Emulator(shards=SHARDS, read_latency=0.0, per_row=0.0) as emu:
        async with await RawConnection.open(emu.host, emu.port) as conn:  # shard 0
            await _table(conn)
            local, remote = _key_on(emu, 0), _key_on(emu, 2)
            await conn.send_raw(_select(local, 1) + _select(local, 2) + _select(remote, 3))
            scan = Query("SELECT * FROM ks.kv", QueryParameters(1)).encode()
            await conn.send(Opcode.QUERY, scan, stream=4)
            for _ in range(4):
                frame = await conn.read_frame()
                assert frame is not None and frame.opcode == Opcode.RESULT
        assert emu.wrong_shard_requests == 1
        assert emu.metrics.shard_requests == [4, 0, 0, 0]
        registry = emu.metrics.registry
        assert registry.get_sample_value("coalesce_emulator_wrong_shard_requests_total") == 1
        assert (
            registry.get_sample_value("coalesce_emulator_shard_requests_total", {"shard": "0"})
            == 4
        )


async def test_a_wrong_shard_read_is_answered_after_a_local_read_sent_later() -> None:
    # An hour-long hop: the wrong-shard answer cannot overtake, whatever the machine's speed.
    async with Emulator(
        shards=SHARDS, read_latency=0.0, per_row=0.0, cross_shard_latency=3600.0
    ) as emu, await RawConnection.open(emu.host, emu.port) as conn:  # shard 0
        await _table(conn)
        await conn.send_raw(_select(_key_on(emu, 1), 1) + _select(_key_on(emu, 0), 2))
        first = await conn.read_frame()
        assert first is not None and first.stream == 2
        assert emu.wrong_shard_requests == 1


def test_emulator_thread_exposes_the_shard_aware_port_and_connections() -> None:
    with EmulatorThread(shards=SHARDS, shard_aware=True) as emu:
        assert emu.shard_aware_port not in (None, 0, emu.port)
        assert emu.connections() == [] and emu.connections_by_shard() == [0] * SHARDS
        assert emu.wrong_shard_requests == 0
    with EmulatorThread(shards=SHARDS) as plain:
        assert plain.shard_aware_port is None


def test_the_command_prints_and_serves_its_shard_aware_port() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coalesce.emulator.command",
            "--listen",
            "127.0.0.1:0",
            "--shard-aware",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = ""
        while "listening on" not in line:
            line = process.stdout.readline()
            assert line, "the emulator exited before listening"
        match = re.search(r"shard-aware port (\d+)", line)
        assert match, line
        port = int(match.group(1))

        async def ask() -> dict[str, list[str]]:
            async with await RawConnection.open("127.0.0.1", port) as conn:
                return await _supported(conn)

        options = asyncio.run(ask())
        assert options["SCYLLA_SHARD_AWARE_PORT"] == [str(port)]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
