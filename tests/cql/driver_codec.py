"""The driver's own frame codec, called alike on cassandra-driver and scylla-driver.

`ProtocolHandler` is private to the driver; scylla-driver's takes one more
argument (its negotiated protocol extensions) than cassandra-driver's.
"""

from __future__ import annotations

from typing import Any

from cassandra.protocol import ProtocolHandler

try:
    from cassandra.protocol_features import ProtocolFeatures
except ImportError:  # cassandra-driver
    _EXTRA: tuple[Any, ...] = ()
else:  # scylla-driver: no extension negotiated
    _EXTRA = (ProtocolFeatures(),)


def driver_encode(msg: Any, stream: int, version: int = 4) -> bytes:
    """The uncompressed frame the driver sends for request `msg`."""
    return bytes(ProtocolHandler.encode_message(msg, stream, version, None, False, *_EXTRA))


def driver_decode(opcode: int, body: bytes, *, flags: int = 0, stream: int = 1) -> Any:
    """The driver's reading of a v4 response body, as its connection would see it."""
    return ProtocolHandler.decode_message(4, *_EXTRA, {}, stream, flags, opcode, body, None, None)
