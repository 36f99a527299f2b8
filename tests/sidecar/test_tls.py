"""TLS on the client side and on the upstream side (off by default)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coalesce.sidecar import Sidecar

from .conftest import LoopStack, ThreadStack, sidecar_config
from .cqlclient import RawClient

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert.pem, key.pem)."""
    directory = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coalesce-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _client_context(cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    return context


def test_cassandra_driver_connects_over_tls(
    thread_stack: Callable[..., ThreadStack], certificate: tuple[Path, Path],
) -> None:
    cert, key = certificate
    stack = thread_stack(tls_cert=cert, tls_key=key)
    cluster = stack.cluster(ssl_context=_client_context(cert))
    session = cluster.connect()
    assert session.execute("SELECT key FROM system.local").one().key == "local"


async def test_a_plaintext_client_cannot_talk_to_a_tls_listener(
    loop_stack: Callable[..., Any], certificate: tuple[Path, Path],
) -> None:
    cert, key = certificate
    stack: LoopStack = await loop_stack(tls_cert=cert, tls_key=key)
    with pytest.raises((ConnectionError, AssertionError, OSError)):
        await RawClient.connect("127.0.0.1", stack.sidecar.port)


async def test_upstream_tls_verifies_and_speaks_to_a_tls_node(
    loop_stack: Callable[..., Any], certificate: tuple[Path, Path],
) -> None:
    # The TLS "node" is a second sidecar with client-side TLS, in front of the emulator.
    cert, key = certificate
    back: LoopStack = await loop_stack(tls_cert=cert, tls_key=key)
    front = Sidecar(sidecar_config(("127.0.0.1", back.sidecar.port), upstream_tls=True,
                                   upstream_ca=cert))
    await front.start()
    try:
        client = await RawClient.connect("127.0.0.1", front.port)
        rows = (await client.query("SELECT key FROM system.local")).rows
        assert rows[0][0] == b"local"
        await client.close()
    finally:
        await front.stop()


async def test_upstream_tls_refuses_a_node_it_cannot_verify(
    loop_stack: Callable[..., Any], certificate: tuple[Path, Path],
) -> None:
    cert, key = certificate
    back: LoopStack = await loop_stack(tls_cert=cert, tls_key=key)
    front = Sidecar(sidecar_config(("127.0.0.1", back.sidecar.port), upstream_tls=True))
    await front.start()
    try:
        assert not front.upstream.any_reachable
        assert "CERTIFICATE_VERIFY_FAILED" in str(front.health())
    finally:
        await front.stop()
