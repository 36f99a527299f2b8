"""Enumerations of protocol codes: consistency levels, error codes, kinds.

Decoded messages keep these as plain `int` (converting every field to an
enum member would cost more than the rest of the decode); the members are
`IntEnum`s, so they compare equal to those ints.
"""

from __future__ import annotations

import enum

__all__ = ["BatchType", "Consistency", "ErrorCode", "ResultKind"]


class Consistency(enum.IntEnum):
    """[consistency] values."""

    ANY = 0x0000
    ONE = 0x0001
    TWO = 0x0002
    THREE = 0x0003
    QUORUM = 0x0004
    ALL = 0x0005
    LOCAL_QUORUM = 0x0006
    EACH_QUORUM = 0x0007
    SERIAL = 0x0008
    LOCAL_SERIAL = 0x0009
    LOCAL_ONE = 0x000A


class ErrorCode(enum.IntEnum):
    """ERROR message codes of native protocol v4."""

    SERVER_ERROR = 0x0000
    PROTOCOL_ERROR = 0x000A
    BAD_CREDENTIALS = 0x0100
    UNAVAILABLE = 0x1000
    OVERLOADED = 0x1001
    IS_BOOTSTRAPPING = 0x1002
    TRUNCATE_ERROR = 0x1003
    WRITE_TIMEOUT = 0x1100
    READ_TIMEOUT = 0x1200
    READ_FAILURE = 0x1300
    FUNCTION_FAILURE = 0x1400
    WRITE_FAILURE = 0x1500
    SYNTAX_ERROR = 0x2000
    UNAUTHORIZED = 0x2100
    INVALID = 0x2200
    CONFIG_ERROR = 0x2300
    ALREADY_EXISTS = 0x2400
    UNPREPARED = 0x2500


class ResultKind(enum.IntEnum):
    """The [int] kind at the start of a RESULT body."""

    VOID = 0x0001
    ROWS = 0x0002
    SET_KEYSPACE = 0x0003
    PREPARED = 0x0004
    SCHEMA_CHANGE = 0x0005


class BatchType(enum.IntEnum):
    """The [byte] type of a BATCH."""

    LOGGED = 0
    UNLOGGED = 1
    COUNTER = 2
