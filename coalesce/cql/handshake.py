"""Connection-setup rules a CQL server needs: versions and compression.

Version downgrade, as the drivers implement it: cassandra-driver 3.30 opens
with protocol 0x42 (DSE v2) and steps down (0x41, 5, 4) whenever the reply
to its first request is a PROTOCOL_ERROR whose message contains
"unsupported protocol version"; the DataStax C++ driver under acsylla looks
for "Invalid or unsupported protocol version". Scylla answers in the
client's stream with a v4 response header and the message
"Invalid or unsupported protocol version: N", which satisfies both;
`unsupported_version_reply` builds exactly that frame. The server should
then close the connection: the drivers reconnect with the lower version.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from .codes import ErrorCode
from .errors import UnsupportedCompressionError
from .frame import Opcode, encode_frame
from .messages import Error

__all__ = [
    "DEFAULT_SUPPORTED",
    "SUPPORTED_COMPRESSION",
    "negotiate_compression",
    "unsupported_version_reply",
]

SUPPORTED_COMPRESSION: Final = ("lz4",)
"""Compression algorithms this codec can do (snappy is not supported)."""

DEFAULT_SUPPORTED: Final[Mapping[str, list[str]]] = {
    "CQL_VERSION": ["3.3.1"],
    "COMPRESSION": list(SUPPORTED_COMPRESSION),
    "PROTOCOL_VERSIONS": ["3/v3", "4/v4"],
}
"""A SUPPORTED reply matching what this codec can do.

cassandra-driver picks compression from the intersection of this list and
what it has installed, so advertising lz4 means drivers will use it.
"""


def negotiate_compression(options: Mapping[str, str]) -> str | None:
    """The compression a STARTUP's options select: "lz4" or None.

    The option name is matched exactly (COMPRESSION) and its value
    case-insensitively. Raises `UnsupportedCompressionError` (a
    `CQLProtocolError`, code PROTOCOL_ERROR) for anything else, e.g.
    "snappy": the server must answer with that error.
    """
    algorithm = options.get("COMPRESSION")
    if algorithm is None or algorithm == "":
        return None
    if algorithm.lower() in SUPPORTED_COMPRESSION:
        return algorithm.lower()
    raise UnsupportedCompressionError(algorithm)


def unsupported_version_reply(version: int, stream: int) -> bytes:
    """The ERROR frame that makes drivers retry with a lower protocol version.

    A v4 response in `stream` (the client's), code PROTOCOL_ERROR, message
    "Invalid or unsupported protocol version: {version}".
    """
    body = Error(
        ErrorCode.PROTOCOL_ERROR, f"Invalid or unsupported protocol version: {version}"
    ).encode()
    return encode_frame(Opcode.ERROR, body, stream=stream, version=4, response=True)
