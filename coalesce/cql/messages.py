"""Message bodies of native protocol v4, both directions.

Each message is a small slotted dataclass with an `opcode` class attribute,
`encode() -> bytes` (the body) and `decode(body) -> message`. Bound values
stay raw bytes: only the server knows the column types to decode them with.

Every `decode` raises `CQLProtocolError` (never `IndexError` or
`struct.error`) on a malformed body; trailing bytes after a complete message
are ignored, as Cassandra does. Messages are plain data: not shared state,
no locking, safe to hand between tasks once built.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Final, Self

from ._wire import (
    UNSET,
    Reader,
    Value,
    decode_guard,
    pack_byte,
    pack_int,
    pack_long,
    pack_short,
    w_bytes,
    w_bytes_map,
    w_inet,
    w_long_string,
    w_short_bytes,
    w_string,
    w_string_list,
    w_string_map,
    w_string_multimap,
    w_value,
)
from .codes import ErrorCode
from .errors import CQLProtocolError
from .frame import CUSTOM_PAYLOAD, TRACING, WARNING, Opcode
from .results import (
    Result,
    _encode_schema_change,
    _read_schema_change,
    decode_result,
)

__all__ = [
    "UNSET",
    "AlreadyExists",
    "AuthChallenge",
    "AuthResponse",
    "AuthSuccess",
    "Authenticate",
    "Batch",
    "BatchStatement",
    "BodyExtras",
    "Error",
    "ErrorDetails",
    "Event",
    "Execute",
    "FunctionFailure",
    "Message",
    "Options",
    "Prepare",
    "Query",
    "QueryParameters",
    "ReadFailure",
    "ReadTimeout",
    "Ready",
    "Register",
    "SchemaChangeEvent",
    "Startup",
    "StatusChangeEvent",
    "Supported",
    "TopologyChangeEvent",
    "Unavailable",
    "Unprepared",
    "Value",
    "WriteFailure",
    "WriteTimeout",
    "decode_message",
    "encode_message",
    "join_extras",
    "split_extras",
]

# <query_parameters> flags (a [byte] in v4).
_VALUES: Final = 0x01
_SKIP_METADATA: Final = 0x02
_PAGE_SIZE: Final = 0x04
_PAGING_STATE: Final = 0x08
_SERIAL_CONSISTENCY: Final = 0x10
_DEFAULT_TIMESTAMP: Final = 0x20
_NAMES_FOR_VALUES: Final = 0x40

_SHORT_BYTE: Final = struct.Struct(">HB")
_SHORT: Final = struct.Struct(">H")
_INT: Final = struct.Struct(">i")
_LONG: Final = struct.Struct(">q")


class _Body:
    """Shared decode contract: subclasses implement `_read` and `encode`."""

    __slots__ = ()
    opcode: ClassVar[Opcode]

    def encode(self) -> bytes:
        """This message's body."""
        raise NotImplementedError

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse a body. Raises `CQLProtocolError` if it is malformed."""
        r = Reader(body)
        try:
            return cls._read(r)
        except CQLProtocolError:
            raise
        except (struct.error, IndexError, ValueError, OverflowError) as exc:
            raise CQLProtocolError(f"malformed {cls.__name__} body: {exc}") from None

    @classmethod
    def _read(cls, r: Reader) -> Self:
        raise NotImplementedError


# -- connection setup ----------------------------------------------------------


@dataclass(slots=True)
class Startup(_Body):
    """STARTUP: CQL_VERSION, COMPRESSION, DRIVER_NAME, ... as a string map."""

    opcode: ClassVar[Opcode] = Opcode.STARTUP
    options: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return w_string_map(self.options)

    @classmethod
    def _read(cls, r: Reader) -> Self:
        return cls(r.string_map())


@dataclass(slots=True)
class Options(_Body):
    opcode: ClassVar[Opcode] = Opcode.OPTIONS

    def encode(self) -> bytes:
        return b""

    @classmethod
    def _read(cls, r: Reader) -> Self:
        return cls()


@dataclass(slots=True)
class Supported(_Body):
    opcode: ClassVar[Opcode] = Opcode.SUPPORTED
    options: dict[str, list[str]] = field(default_factory=dict)

    def encode(self) -> bytes:
        return w_string_multimap(self.options)

    @classmethod
    def _read(cls, r: Reader) -> Self:
        return cls(r.string_multimap())


@dataclass(slots=True)
class Ready(_Body):
    opcode: ClassVar[Opcode] = Opcode.READY

    def encode(self) -> bytes:
        return b""

    @classmethod
    def _read(cls, r: Reader) -> Self:
        return cls()


@dataclass(slots=True)
class Authenticate(_Body):
    opcode: ClassVar[Opcode] = Opcode.AUTHENTICATE
    authenticator: str

    def encode(self) -> bytes:
        return w_string(self.authenticator)

    @classmethod
    def _read(cls, r: Reader) -> Self:
        return cls(r.string())


@dataclass(slots=True)
class _Token(_Body):
    """The SASL messages: one opaque [bytes] token each way."""

    token: bytes | None = None

    def encode(self) -> bytes:
        return w_bytes(self.token)

    @classmethod
    def _read(cls, r: Reader) -> Self:
        return cls(r.nbytes())


@dataclass(slots=True)
class AuthResponse(_Token):
    opcode: ClassVar[Opcode] = Opcode.AUTH_RESPONSE


@dataclass(slots=True)
class AuthChallenge(_Token):
    opcode: ClassVar[Opcode] = Opcode.AUTH_CHALLENGE


@dataclass(slots=True)
class AuthSuccess(_Token):
    opcode: ClassVar[Opcode] = Opcode.AUTH_SUCCESS


@dataclass(slots=True)
class Register(_Body):
    opcode: ClassVar[Opcode] = Opcode.REGISTER
    event_types: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        return w_string_list(self.event_types)

    @classmethod
    def _read(cls, r: Reader) -> Self:
        return cls(r.string_list())


# -- queries -------------------------------------------------------------------


@dataclass(slots=True)
class QueryParameters:
    """<query_parameters> of QUERY and EXECUTE.

    `values` are raw value bodies: `bytes`, `None` (NULL) or `UNSET`.
    `values=None` means the Values flag is absent; `[]` sends it with zero
    values. `names`, when given, must be as long as `values` and sets the
    "names for values" flag. `page_size`, `paging_state`,
    `serial_consistency` and `timestamp` are sent only when not None.
    """

    consistency: int
    values: list[Value] | None = None
    names: list[str] | None = None
    skip_metadata: bool = False
    page_size: int | None = None
    paging_state: bytes | None = None
    serial_consistency: int | None = None
    timestamp: int | None = None

    def encode(self) -> bytes:
        flags = 0
        parts: list[bytes] = []
        values = self.values
        if values is not None:
            flags |= _VALUES
            parts.append(pack_short(len(values)))
            names = self.names
            if names is not None:
                if len(names) != len(values):
                    raise ValueError(f"{len(names)} names for {len(values)} values")
                flags |= _NAMES_FOR_VALUES
                for name, v in zip(names, values, strict=True):
                    parts.append(w_string(name))
                    parts.append(w_value(v))
            else:
                parts.extend(map(w_value, values))
        if self.skip_metadata:
            flags |= _SKIP_METADATA
        if self.page_size is not None:
            flags |= _PAGE_SIZE
            parts.append(pack_int(self.page_size))
        if self.paging_state is not None:
            flags |= _PAGING_STATE
            parts.append(w_bytes(self.paging_state))
        if self.serial_consistency is not None:
            flags |= _SERIAL_CONSISTENCY
            parts.append(pack_short(self.serial_consistency))
        if self.timestamp is not None:
            flags |= _DEFAULT_TIMESTAMP
            parts.append(pack_long(self.timestamp))
        return pack_short(self.consistency) + pack_byte(flags) + b"".join(parts)

    @classmethod
    def read(cls, r: Reader) -> QueryParameters:
        """Parse parameters at `r.pos`, advancing it."""
        params, r.pos = _read_params(r.data, r.pos)
        return params


def _read_params(data: bytes, pos: int) -> tuple[QueryParameters, int]:
    """Parse <query_parameters> at `pos`; return them and the end offset.

    Hand-inlined offsets rather than `Reader` calls: this runs once per
    EXECUTE, the proxy's and the emulator's hottest path. Truncation
    surfaces as `struct.error`, translated by the caller.
    """
    consistency, flags = _SHORT_BYTE.unpack_from(data, pos)
    pos += 3
    values: list[Value] | None = None
    names: list[str] | None = None
    if flags & _VALUES:
        if flags & _NAMES_FOR_VALUES:
            r = Reader(data, pos)
            names = []
            values = []
            for _ in range(r.short()):
                names.append(r.string())
                values.append(r.value())
            pos = r.pos
        else:
            (count,) = _SHORT.unpack_from(data, pos)
            pos += 2
            values = []
            append = values.append
            unpack_int = _INT.unpack_from
            size = len(data)
            for _ in range(count):
                (n,) = unpack_int(data, pos)
                pos += 4
                if n >= 0:
                    end = pos + n
                    if end > size:
                        raise CQLProtocolError("bound value runs past the end of the body")
                    append(data[pos:end])
                    pos = end
                elif n == -1:
                    append(None)
                elif n == -2:
                    append(UNSET)
                else:
                    raise CQLProtocolError(f"invalid [value] length {n}")
    page_size = paging_state = serial = timestamp = None
    if flags & 0x3C:
        if flags & _PAGE_SIZE:
            (page_size,) = _INT.unpack_from(data, pos)
            pos += 4
        if flags & _PAGING_STATE:
            (n,) = _INT.unpack_from(data, pos)
            pos += 4
            if n >= 0:
                if pos + n > len(data):
                    raise CQLProtocolError("paging state runs past the end of the body")
                paging_state = data[pos : pos + n]
                pos += n
        if flags & _SERIAL_CONSISTENCY:
            (serial,) = _SHORT.unpack_from(data, pos)
            pos += 2
        if flags & _DEFAULT_TIMESTAMP:
            (timestamp,) = _LONG.unpack_from(data, pos)
            pos += 8
    params = QueryParameters(
        consistency,
        values,
        names,
        bool(flags & _SKIP_METADATA),
        page_size,
        paging_state,
        serial,
        timestamp,
    )
    return params, pos


@dataclass(slots=True)
class Query(_Body):
    opcode: ClassVar[Opcode] = Opcode.QUERY
    query: str
    params: QueryParameters

    def encode(self) -> bytes:
        return w_long_string(self.query) + self.params.encode()

    @classmethod
    def _read(cls, r: Reader) -> Self:
        q = r.long_string()
        return cls(q, QueryParameters.read(r))


@dataclass(slots=True)
class Prepare(_Body):
    opcode: ClassVar[Opcode] = Opcode.PREPARE
    query: str

    def encode(self) -> bytes:
        return w_long_string(self.query)

    @classmethod
    def _read(cls, r: Reader) -> Self:
        return cls(r.long_string())


@dataclass(slots=True)
class Execute(_Body):
    opcode: ClassVar[Opcode] = Opcode.EXECUTE
    query_id: bytes
    params: QueryParameters

    def encode(self) -> bytes:
        return w_short_bytes(self.query_id) + self.params.encode()

    @classmethod
    def decode(cls, body: bytes) -> Self:
        # Overrides `_Body.decode` to skip the Reader: the hottest decode.
        try:
            (n,) = _SHORT.unpack_from(body)
            if n + 2 > len(body):
                raise CQLProtocolError("EXECUTE id runs past the end of the body")
            params, _ = _read_params(body, n + 2)
        except struct.error as exc:
            raise CQLProtocolError(f"malformed Execute body: {exc}") from None
        return cls(body[2 : n + 2], params)

    @classmethod
    def _read(cls, r: Reader) -> Self:
        query_id = r.short_bytes()
        return cls(query_id, QueryParameters.read(r))


@dataclass(slots=True)
class BatchStatement:
    """One statement of a BATCH: a query string, or a prepared id if `is_prepared`."""

    is_prepared: bool
    query_or_id: str | bytes
    values: list[Value] = field(default_factory=list)


@dataclass(slots=True)
class Batch(_Body):
    """BATCH; `batch_type` is a `BatchType`.

    Named values are not supported in batches (Cassandra rejects the flag
    too, and no driver sends it): decoding a BATCH with that flag raises
    `CQLProtocolError`.
    """

    opcode: ClassVar[Opcode] = Opcode.BATCH
    batch_type: int
    statements: list[BatchStatement]
    consistency: int
    serial_consistency: int | None = None
    timestamp: int | None = None

    def encode(self) -> bytes:
        parts = [pack_byte(self.batch_type), pack_short(len(self.statements))]
        for s in self.statements:
            if s.is_prepared:
                if not isinstance(s.query_or_id, bytes):
                    raise TypeError("a prepared batch statement needs a bytes id")
                parts.append(b"\x01" + w_short_bytes(s.query_or_id))
            else:
                if not isinstance(s.query_or_id, str):
                    raise TypeError("a batch query must be a str")
                parts.append(b"\x00" + w_long_string(s.query_or_id))
            parts.append(pack_short(len(s.values)))
            parts.extend(map(w_value, s.values))
        flags = 0
        parts.append(b"")  # placeholder for consistency + flags
        at = len(parts) - 1
        if self.serial_consistency is not None:
            flags |= _SERIAL_CONSISTENCY
            parts.append(pack_short(self.serial_consistency))
        if self.timestamp is not None:
            flags |= _DEFAULT_TIMESTAMP
            parts.append(pack_long(self.timestamp))
        parts[at] = pack_short(self.consistency) + pack_byte(flags)
        return b"".join(parts)

    @classmethod
    def _read(cls, r: Reader) -> Self:
        batch_type = r.byte()
        statements: list[BatchStatement] = []
        for _ in range(r.short()):
            kind = r.byte()
            query_or_id: str | bytes
            if kind == 0:
                query_or_id = r.long_string()
            elif kind == 1:
                query_or_id = r.short_bytes()
            else:
                raise CQLProtocolError(f"invalid batch statement kind {kind}")
            values = [r.value() for _ in range(r.short())]
            statements.append(BatchStatement(kind == 1, query_or_id, values))
        consistency = r.short()
        flags = r.byte()
        if flags & _NAMES_FOR_VALUES:
            raise CQLProtocolError("named values are not supported in BATCH")
        serial = r.short() if flags & _SERIAL_CONSISTENCY else None
        timestamp = r.int64() if flags & _DEFAULT_TIMESTAMP else None
        return cls(batch_type, statements, consistency, serial, timestamp)


# -- errors --------------------------------------------------------------------


@dataclass(slots=True)
class Unavailable:
    consistency: int
    required: int
    alive: int

    def encode(self) -> bytes:
        return pack_short(self.consistency) + pack_int(self.required) + pack_int(self.alive)

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.short(), r.int32(), r.int32())


@dataclass(slots=True)
class WriteTimeout:
    consistency: int
    received: int
    block_for: int
    write_type: str

    def encode(self) -> bytes:
        return (
            pack_short(self.consistency)
            + pack_int(self.received)
            + pack_int(self.block_for)
            + w_string(self.write_type)
        )

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.short(), r.int32(), r.int32(), r.string())


@dataclass(slots=True)
class ReadTimeout:
    consistency: int
    received: int
    block_for: int
    data_present: bool

    def encode(self) -> bytes:
        return (
            pack_short(self.consistency)
            + pack_int(self.received)
            + pack_int(self.block_for)
            + pack_byte(1 if self.data_present else 0)
        )

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.short(), r.int32(), r.int32(), r.byte() != 0)


@dataclass(slots=True)
class ReadFailure:
    consistency: int
    received: int
    block_for: int
    num_failures: int
    data_present: bool

    def encode(self) -> bytes:
        return (
            pack_short(self.consistency)
            + pack_int(self.received)
            + pack_int(self.block_for)
            + pack_int(self.num_failures)
            + pack_byte(1 if self.data_present else 0)
        )

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.short(), r.int32(), r.int32(), r.int32(), r.byte() != 0)


@dataclass(slots=True)
class WriteFailure:
    consistency: int
    received: int
    block_for: int
    num_failures: int
    write_type: str

    def encode(self) -> bytes:
        return (
            pack_short(self.consistency)
            + pack_int(self.received)
            + pack_int(self.block_for)
            + pack_int(self.num_failures)
            + w_string(self.write_type)
        )

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.short(), r.int32(), r.int32(), r.int32(), r.string())


@dataclass(slots=True)
class FunctionFailure:
    keyspace: str
    function: str
    arg_types: list[str]

    def encode(self) -> bytes:
        return w_string(self.keyspace) + w_string(self.function) + w_string_list(self.arg_types)

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.string(), r.string(), r.string_list())


@dataclass(slots=True)
class AlreadyExists:
    """`table` is empty when a keyspace already exists."""

    keyspace: str
    table: str

    def encode(self) -> bytes:
        return w_string(self.keyspace) + w_string(self.table)

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.string(), r.string())


@dataclass(slots=True)
class Unprepared:
    query_id: bytes

    def encode(self) -> bytes:
        return w_short_bytes(self.query_id)

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.short_bytes())


ErrorDetails = (
    Unavailable
    | WriteTimeout
    | ReadTimeout
    | ReadFailure
    | WriteFailure
    | FunctionFailure
    | AlreadyExists
    | Unprepared
)

_DETAILS_BY_CODE: Final[dict[int, type[ErrorDetails]]] = {
    ErrorCode.UNAVAILABLE: Unavailable,
    ErrorCode.WRITE_TIMEOUT: WriteTimeout,
    ErrorCode.READ_TIMEOUT: ReadTimeout,
    ErrorCode.READ_FAILURE: ReadFailure,
    ErrorCode.WRITE_FAILURE: WriteFailure,
    ErrorCode.FUNCTION_FAILURE: FunctionFailure,
    ErrorCode.ALREADY_EXISTS: AlreadyExists,
    ErrorCode.UNPREPARED: Unprepared,
}


@dataclass(slots=True)
class Error(_Body):
    """ERROR: a code, a message, and the code's extra fields if it has any.

    Codes that carry extra fields on the wire (UNAVAILABLE, WRITE_TIMEOUT,
    READ_TIMEOUT, READ_FAILURE, WRITE_FAILURE, FUNCTION_FAILURE,
    ALREADY_EXISTS, UNPREPARED) need `details` of the matching class;
    `encode` raises `ValueError` otherwise. Unknown codes decode with
    `details=None`.
    """

    opcode: ClassVar[Opcode] = Opcode.ERROR
    code: int
    message: str
    details: ErrorDetails | None = None

    def encode(self) -> bytes:
        head = pack_int(self.code) + w_string(self.message)
        expected = _DETAILS_BY_CODE.get(self.code)
        if expected is None:
            if self.details is not None:
                raise ValueError(f"error code 0x{self.code:04x} carries no details")
            return head
        if not isinstance(self.details, expected):
            raise ValueError(f"error code 0x{self.code:04x} needs {expected.__name__} details")
        return head + self.details.encode()

    @classmethod
    def _read(cls, r: Reader) -> Self:
        code = r.int32()
        message = r.string()
        details_cls = _DETAILS_BY_CODE.get(code)
        return cls(code, message, details_cls.read(r) if details_cls else None)


# -- events --------------------------------------------------------------------


class Event:
    """Base of the EVENT kinds; `Event.decode` returns the right subclass."""

    __slots__ = ()
    opcode: ClassVar[Opcode] = Opcode.EVENT

    def encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, body: bytes) -> Event:
        """Decode any EVENT body. Raises `CQLProtocolError` if malformed."""
        return decode_guard("EVENT", lambda: _read_event(Reader(body)))


@dataclass(slots=True)
class TopologyChangeEvent(Event):
    """`change` is NEW_NODE or REMOVED_NODE; `address` is (ip text, port)."""

    change: str
    address: tuple[str, int]

    def encode(self) -> bytes:
        return w_string("TOPOLOGY_CHANGE") + w_string(self.change) + w_inet(*self.address)


@dataclass(slots=True)
class StatusChangeEvent(Event):
    """`change` is UP or DOWN; `address` is (ip text, port)."""

    change: str
    address: tuple[str, int]

    def encode(self) -> bytes:
        return w_string("STATUS_CHANGE") + w_string(self.change) + w_inet(*self.address)


@dataclass(slots=True)
class SchemaChangeEvent(Event):
    """Same fields and rules as `ResultSchemaChange`."""

    change_type: str
    target: str
    keyspace: str
    name: str | None = None
    arg_types: list[str] | None = None

    def encode(self) -> bytes:
        return w_string("SCHEMA_CHANGE") + _encode_schema_change(
            self.change_type, self.target, self.keyspace, self.name, self.arg_types
        )


def _read_event(r: Reader) -> Event:
    event_type = r.string()
    if event_type == "TOPOLOGY_CHANGE":
        change = r.string()
        return TopologyChangeEvent(change, r.inet())
    if event_type == "STATUS_CHANGE":
        change = r.string()
        return StatusChangeEvent(change, r.inet())
    if event_type == "SCHEMA_CHANGE":
        return SchemaChangeEvent(*_read_schema_change(r))
    raise CQLProtocolError(f"unknown event type {event_type!r}")


# -- dispatch ------------------------------------------------------------------

Message = (
    Startup
    | Options
    | Supported
    | Ready
    | Authenticate
    | AuthResponse
    | AuthChallenge
    | AuthSuccess
    | Register
    | Query
    | Prepare
    | Execute
    | Batch
    | Error
    | Event
    | Result
)

_DECODERS: Final[dict[int, Callable[[bytes], Message]]] = {
    Opcode.ERROR: Error.decode,
    Opcode.STARTUP: Startup.decode,
    Opcode.READY: Ready.decode,
    Opcode.AUTHENTICATE: Authenticate.decode,
    Opcode.OPTIONS: Options.decode,
    Opcode.SUPPORTED: Supported.decode,
    Opcode.QUERY: Query.decode,
    Opcode.RESULT: decode_result,
    Opcode.PREPARE: Prepare.decode,
    Opcode.EXECUTE: Execute.decode,
    Opcode.REGISTER: Register.decode,
    Opcode.EVENT: Event.decode,
    Opcode.BATCH: Batch.decode,
    Opcode.AUTH_CHALLENGE: AuthChallenge.decode,
    Opcode.AUTH_RESPONSE: AuthResponse.decode,
    Opcode.AUTH_SUCCESS: AuthSuccess.decode,
}


def decode_message(opcode: int, body: bytes) -> Message:
    """Decode a (decompressed, extras-stripped) body by opcode.

    Raises `CQLProtocolError` for an unknown opcode or a malformed body.
    """
    decoder = _DECODERS.get(opcode)
    if decoder is None:
        raise CQLProtocolError(f"unknown opcode 0x{opcode:02x}")
    return decoder(body)


def encode_message(msg: Message) -> tuple[int, bytes]:
    """`(opcode, body)` for any message."""
    return int(msg.opcode), msg.encode()


# -- tracing id, warnings and custom payload -----------------------------------


@dataclass(slots=True)
class BodyExtras:
    """What the TRACING, WARNING and CUSTOM_PAYLOAD flags put before a body.

    In a response, TRACING means the body starts with the tracing session id;
    in a request it asks for tracing and adds nothing to the body (so
    `tracing_id` is only meaningful in responses). Order on the wire:
    tracing id, warnings, custom payload.
    """

    tracing_id: uuid.UUID | None = None
    warnings: list[str] | None = None
    custom_payload: dict[str, bytes | None] | None = None


_NO_EXTRAS_FLAGS: Final = ~(TRACING | WARNING | CUSTOM_PAYLOAD)


def split_extras(flags: int, body: bytes, *, response: bool) -> tuple[BodyExtras, bytes]:
    """Separate the flag-driven prefixes from the message body proper.

    `body` must already be decompressed. Costs nothing when no such flag is
    set (the body is returned as is). Raises `CQLProtocolError` if a
    prefix is malformed.
    """
    if not flags & (~_NO_EXTRAS_FLAGS if response else CUSTOM_PAYLOAD):
        return _EMPTY_EXTRAS, body  # (a request's TRACING and WARNING flags add no bytes)

    def read(r: Reader) -> BodyExtras:
        extras = BodyExtras()
        if response and flags & TRACING:
            extras.tracing_id = r.uuid()
        if response and flags & WARNING:
            extras.warnings = r.string_list()
        if flags & CUSTOM_PAYLOAD:
            extras.custom_payload = r.bytes_map()
        return extras

    r = Reader(body)
    extras = decode_guard("body prefix", lambda: read(r))
    return extras, body[r.pos :]


_EMPTY_EXTRAS: Final = BodyExtras()


def join_extras(extras: BodyExtras, body: bytes, *, response: bool) -> tuple[int, bytes]:
    """Prefix `body` with `extras`; return the header flags to set and the body.

    A request's `tracing_id` is ignored (requests only carry the flag: pass
    `TRACING` yourself to ask for tracing).
    """
    flags = 0
    parts: list[bytes] = []
    if response and extras.tracing_id is not None:
        flags |= TRACING
        parts.append(extras.tracing_id.bytes)
    if response and extras.warnings is not None:
        flags |= WARNING
        parts.append(w_string_list(extras.warnings))
    if extras.custom_payload is not None:
        flags |= CUSTOM_PAYLOAD
        parts.append(w_bytes_map(extras.custom_payload))
    if not parts:
        return 0, body
    parts.append(body)
    return flags, b"".join(parts)
