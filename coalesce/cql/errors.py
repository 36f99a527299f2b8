"""The codec's exception hierarchy.

Every failure to decode bytes that came off the wire is a `CQLProtocolError`
(never an `IndexError` or `struct.error`), so a server can catch exactly one
class, answer with an ERROR frame carrying `.code`, and close the connection.

Encoding Python values is different: handing the codec a value of the wrong
Python type raises `TypeError`, an out-of-range value raises `ValueError` --
those are bugs in the caller, not hostile input.
"""

from __future__ import annotations

__all__ = [
    "CQLProtocolError",
    "InvalidValueError",
    "ProtocolVersionError",
    "UnsupportedCompressionError",
]

# Kept as plain ints (not `ErrorCode`) so this module imports nothing.
_PROTOCOL_ERROR = 0x000A
_INVALID = 0x2200


class CQLProtocolError(Exception):
    """Malformed or unsupported input on a CQL connection.

    `.code` is the CQL error code a server should reply with (PROTOCOL_ERROR
    unless a subclass says otherwise). After one of these, the connection's
    byte stream cannot be trusted any more and should be closed.
    """

    def __init__(self, message: str, *, code: int = _PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code

    @property
    def message(self) -> str:
        """The human-readable message, suitable for an ERROR frame."""
        return str(self.args[0]) if self.args else ""


class ProtocolVersionError(CQLProtocolError):
    """A frame announced a protocol version this codec does not speak.

    Carries the offending `.version` and the frame's `.stream`, so a server
    can answer in the client's stream (see `unsupported_version_reply`),
    which is what makes drivers retry with a lower version.
    """

    def __init__(self, version: int, stream: int) -> None:
        super().__init__(f"Invalid or unsupported protocol version: {version}")
        self.version = version
        self.stream = stream


class InvalidValueError(CQLProtocolError):
    """A value's bytes do not decode as the declared CQL type.

    The framing around the value was fine, so the connection stays usable;
    the `.code` is INVALID (0x2200), as Scylla answers a bad bound value.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, code=_INVALID)


class UnsupportedCompressionError(CQLProtocolError):
    """STARTUP asked for a compression algorithm this codec cannot do."""

    def __init__(self, algorithm: str) -> None:
        super().__init__(f"Unsupported compression algorithm: {algorithm}")
        self.algorithm = algorithm
