"""Errors the emulator answers requests with.

Every failure while handling a request is one of these; the server turns it
into a CQL ERROR frame carrying `code` and `message` on the request's stream.
Anything else escaping a request handler is a bug in the emulator and is
answered as SERVER_ERROR (0x0000), never by dropping the connection.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExists",
    "BadCredentials",
    "ConfigurationError",
    "CqlRequestError",
    "CqlSyntaxError",
    "EmulatorError",
    "InvalidRequest",
    "ProtocolViolation",
    "Unauthorized",
    "Unprepared",
]


class EmulatorError(Exception):
    """Base of every exception the emulator raises on purpose."""


class CqlRequestError(EmulatorError):
    """A request failed; `code` is the CQL error code sent back to the client."""

    code: int = 0x0000

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ProtocolViolation(CqlRequestError):
    """The client broke the wire protocol (PROTOCOL_ERROR 0x000A)."""

    code = 0x000A


class BadCredentials(CqlRequestError):
    """Authentication failed (BAD_CREDENTIALS 0x0100)."""

    code = 0x0100


class CqlSyntaxError(CqlRequestError):
    """The statement text does not parse (SYNTAX_ERROR 0x2000)."""

    code = 0x2000


class Unauthorized(CqlRequestError):
    """The logged-in role lacks a permission (UNAUTHORIZED 0x2100)."""

    code = 0x2100


class InvalidRequest(CqlRequestError):
    """The statement parses but is not valid here (INVALID 0x2200).

    Unknown keyspace, table or column, a missing partition key, a value of
    the wrong type, and every unsupported-but-valid CQL construct.
    """

    code = 0x2200


class ConfigurationError(CqlRequestError):
    """A DDL statement asks for something impossible (CONFIG_ERROR 0x2300)."""

    code = 0x2300


class AlreadyExists(CqlRequestError):
    """CREATE of an existing keyspace or table (ALREADY_EXISTS 0x2400).

    `table` is the empty string for a keyspace, as the protocol requires.
    """

    code = 0x2400

    def __init__(self, keyspace: str, table: str = "") -> None:
        if table:
            message = f'Cannot add already existing table "{table}" to keyspace "{keyspace}"'
        else:
            message = f'Cannot add existing keyspace "{keyspace}"'
        super().__init__(message)
        self.keyspace = keyspace
        self.table = table


class Unprepared(CqlRequestError):
    """EXECUTE of an id the emulator does not know (UNPREPARED 0x2500)."""

    code = 0x2500

    def __init__(self, query_id: bytes) -> None:
        super().__init__(f"Prepared query with ID {query_id.hex()} not found")
        self.query_id = query_id
