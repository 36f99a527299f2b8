"""Emulator lifecycle, metrics export, cqlsh, auth, and the command-line entry point."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request

import acsylla
import pytest
from cassandra import Unauthorized
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import Cluster, NoHostAvailable
from prometheus_client import generate_latest

from coalesce.cql.frame import Opcode
from coalesce.emulator import Emulator, EmulatorThread, Unprepared
from coalesce.emulator.command import configure_parser, parse_address, parse_duration
from coalesce.emulator.executor import Session
from tests.emulator.rawcql import RawConnection, rows_of

pytestmark = pytest.mark.timeout(60)

KEYSPACE = (
    "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
)


async def test_restart_keeps_data_and_port_but_forgets_prepared_statements() -> None:
    async with Emulator(read_latency=0.0) as emu:
        port = emu.port
        conn = await RawConnection.open(emu.host, emu.port)
        await conn.startup()
        for text in (
            KEYSPACE,
            "CREATE TABLE ks.kv (k int PRIMARY KEY, v text)",
            "INSERT INTO ks.kv (k, v) VALUES (1, 'kept')",
        ):
            assert (await conn.query(text)).opcode == Opcode.RESULT
        prepared = emu.executor.prepare("SELECT * FROM ks.kv", Session())
        emu.stop()
        assert await conn.closed_by_server()
        await conn.aclose()
        assert not emu.running
        await emu.start()
        assert emu.port == port
        again = await RawConnection.open(emu.host, emu.port)
        await again.startup()
        assert rows_of(await again.query("SELECT v FROM ks.kv WHERE k = 1")) == [["kept"]]
        await again.aclose()
        with pytest.raises(Unprepared):
            emu.executor.lookup(prepared.id)


async def test_several_emulators_keep_separate_metrics() -> None:
    async with Emulator() as first, Emulator() as second:
        conn = await RawConnection.open(first.host, first.port)
        await conn.startup()
        await conn.query("SELECT * FROM system.local")
        await conn.aclose()
        assert first.statements["system"] == 1
        assert second.statements["system"] == 0
        exported = generate_latest(first.registry).decode()  # type: ignore[arg-type]
        assert 'coalesce_emulator_statements_total{kind="system"} 1.0' in exported
        assert 'coalesce_emulator_shard_queue_depth{shard="3"} 0.0' in exported
        assert 'kind="system"} 0.0' in generate_latest(second.registry).decode()  # type: ignore[arg-type]


async def test_metrics_are_served_over_http_on_loopback() -> None:
    async with Emulator(metrics=("127.0.0.1", 0)) as emu:
        assert emu.metrics_port is not None
        url = f"http://127.0.0.1:{emu.metrics_port}/metrics"
        body = await _fetch(url)
        assert "coalesce_emulator_statements_total" in body
    assert emu.metrics_port is None


async def _fetch(url: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(get)


def test_emulator_thread_leaves_no_thread_behind() -> None:
    before = {t.name for t in threading.enumerate()}
    with EmulatorThread() as emu:
        assert emu.port > 0
        assert "coalesce-emulator" in {t.name for t in threading.enumerate()}
    after = {t.name for t in threading.enumerate()}
    assert "coalesce-emulator" not in after - before


def test_emulator_thread_reports_start_failures() -> None:
    with EmulatorThread() as running, pytest.raises(OSError):
        EmulatorThread(port=running.port, host="127.0.0.1").start()


@pytest.mark.skipif(shutil.which("cqlsh") is None, reason="cqlsh is not installed")
def test_cqlsh_connects_and_runs_a_select(emulator_thread: EmulatorThread) -> None:
    result = subprocess.run(
        [
            "cqlsh",
            emulator_thread.host,
            str(emulator_thread.port),
            "-e",
            "SELECT cluster_name, data_center FROM system.local",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "coalesce-emulator" in result.stdout
    assert "datacenter1" in result.stdout
    assert "(1 rows)" in result.stdout


# ------------------------------------------------------------------- auth


def test_password_authentication_and_permissions_with_cassandra_driver() -> None:
    with EmulatorThread(auth=True) as emu:
        admin = Cluster(
            [emu.host],
            port=emu.port,
            protocol_version=4,
            auth_provider=PlainTextAuthProvider("cassandra", "cassandra"),
        )
        try:
            session = admin.connect()
            session.execute(KEYSPACE)
            session.execute("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
            session.execute("INSERT INTO ks.kv (k, v) VALUES (1, 'secret')")
            session.execute("CREATE ROLE reader WITH PASSWORD = 'pw' AND LOGIN = true")
            session.execute("GRANT SELECT ON KEYSPACE ks TO reader")
        finally:
            admin.shutdown()

        wrong = Cluster(
            [emu.host],
            port=emu.port,
            protocol_version=4,
            auth_provider=PlainTextAuthProvider("reader", "nope"),
        )
        with pytest.raises(NoHostAvailable, match=r"(?i)bad credentials|incorrect"):
            wrong.connect()
        wrong.shutdown()

        reader = Cluster(
            [emu.host],
            port=emu.port,
            protocol_version=4,
            auth_provider=PlainTextAuthProvider("reader", "pw"),
        )
        try:
            session = reader.connect()
            assert session.execute("SELECT v FROM ks.kv WHERE k = 1").one().v == "secret"
            with pytest.raises(Unauthorized):
                session.execute("INSERT INTO ks.kv (k, v) VALUES (2, 'no')")
        finally:
            reader.shutdown()


async def test_acsylla_logs_in_with_username_and_password() -> None:
    async with Emulator(auth=True) as emu:
        cluster = acsylla.create_cluster(
            [emu.host], port=emu.port, username="cassandra", password="cassandra", log_level="error"
        )
        session = await cluster.create_session()
        result = await session.execute(acsylla.create_statement("SELECT key FROM system.local"))
        assert result.first().as_dict()["key"] == "local"
        await session.close()


async def test_requests_before_authentication_are_refused() -> None:
    async with Emulator(auth=True) as emu:
        conn = await RawConnection.open(emu.host, emu.port)
        from coalesce.cql.messages import Startup

        await conn.send(Opcode.STARTUP, Startup({"CQL_VERSION": "3.0.0"}).encode(), stream=1)
        frame = await conn.read_frame()
        assert frame is not None and frame.opcode == Opcode.AUTHENTICATE
        reply = await conn.query("SELECT * FROM system.local", stream=2)
        assert reply.opcode == Opcode.ERROR
        assert await conn.closed_by_server()
        await conn.aclose()


# -------------------------------------------------------------------- CLI


def test_durations_and_addresses_parse_or_fail_clearly() -> None:
    assert parse_duration("1ms") == pytest.approx(0.001)
    assert parse_duration("250us") == pytest.approx(0.00025)
    assert parse_duration("0.5s") == pytest.approx(0.5)
    assert parse_duration("2") == pytest.approx(2.0)
    assert parse_address("127.0.0.1:9042") == ("127.0.0.1", 9042)
    assert parse_address("[::1]:9042") == ("::1", 9042)
    for bad in ("fast", "1 hour", "-1ms", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)
    for bad in ("localhost", ":9042", "host:port", "h:70000"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_address(bad)


def test_parser_maps_flags_onto_the_config() -> None:
    from coalesce.emulator.command import config_from_args

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(
        [
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "8",
            "--read-latency",
            "250us",
            "--per-row",
            "1us",
            "--auth",
        ]
    )
    config = config_from_args(args)
    assert (config.host, config.port, config.shards, config.auth) == ("127.0.0.1", 0, 8, True)
    assert config.read_latency == pytest.approx(250e-6)
    assert config.write_latency is None


def test_command_prints_the_banner_and_stops_cleanly_on_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "coalesce.emulator.command", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert "not a database" in banner
        listening = ""
        while "listening on" not in listening:
            listening = process.stdout.readline()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
