"""Message bodies: round trips, cassandra-driver compatibility both ways, fuzzing."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import pytest
from cassandra import ConsistencyLevel
from cassandra.policies import WriteType
from cassandra.protocol import (
    AuthResponseMessage,
    BatchMessage,
    ExecuteMessage,
    OptionsMessage,
    PrepareMessage,
    QueryMessage,
    RegisterMessage,
    StartupMessage,
)
from cassandra.query import BatchType as DriverBatchType
from hypothesis import given, settings
from hypothesis import strategies as st

from coalesce.cql import (
    CUSTOM_PAYLOAD,
    TRACING,
    UNSET,
    WARNING,
    AlreadyExists,
    AuthChallenge,
    Authenticate,
    AuthResponse,
    AuthSuccess,
    Batch,
    BatchStatement,
    BatchType,
    BodyExtras,
    ColumnSpec,
    Consistency,
    CQLProtocolError,
    Error,
    ErrorCode,
    Execute,
    FrameDecoder,
    FunctionFailure,
    Message,
    Opcode,
    Options,
    Prepare,
    PreparedMetadata,
    Query,
    QueryParameters,
    ReadFailure,
    ReadTimeout,
    Ready,
    Register,
    ResultKind,
    ResultPrepared,
    ResultRows,
    ResultSchemaChange,
    ResultSetKeyspace,
    ResultVoid,
    RowsMetadata,
    SchemaChangeEvent,
    Startup,
    StatusChangeEvent,
    Supported,
    TopologyChangeEvent,
    Unavailable,
    Unprepared,
    WriteFailure,
    WriteTimeout,
    decode_message,
    encode_message,
    encode_rows_body,
    join_extras,
    parse_type,
    peek_consistency,
    peek_execute_id,
    peek_prepared_id,
    peek_query_string,
    peek_result_kind,
    query_parameters_offset,
    split_extras,
)
from tests.conftest import examples
from tests.cql.driver_codec import driver_decode, driver_encode

_INT, _TEXT = parse_type("int"), parse_type("text")
_COLUMNS = [
    ColumnSpec("ks", "users", "id", _INT),
    ColumnSpec("ks", "users", "name", _TEXT),
    ColumnSpec("ks", "users", "tags", parse_type("map<text, frozen<list<int>>>")),
]
_FULL_PARAMS = QueryParameters(
    consistency=Consistency.LOCAL_QUORUM,
    values=[b"\x00\x00\x00\x01", None, UNSET, b""],
    skip_metadata=True,
    page_size=5000,
    paging_state=b"\x01\x02",
    serial_consistency=Consistency.LOCAL_SERIAL,
    timestamp=1_700_000_000_000_000,
)

_MESSAGES: list[Message] = [
    Startup({"CQL_VERSION": "3.0.0", "COMPRESSION": "lz4"}),
    Options(),
    Supported({"CQL_VERSION": ["3.3.1"], "COMPRESSION": ["lz4", "snappy"]}),
    Ready(),
    Authenticate("org.apache.cassandra.auth.PasswordAuthenticator"),
    AuthResponse(b"\x00user\x00pass"),
    AuthResponse(None),
    AuthChallenge(b"challenge"),
    AuthSuccess(None),
    AuthSuccess(b""),
    Register(["TOPOLOGY_CHANGE", "STATUS_CHANGE", "SCHEMA_CHANGE"]),
    Query("SELECT * FROM ks.users WHERE id = ?", _FULL_PARAMS),
    Query("SELECT now() FROM system.local", QueryParameters(Consistency.ONE)),
    Query("SELECT 'é'", QueryParameters(Consistency.ONE, values=[])),
    Query("INSERT INTO t (a, b) VALUES (:a, :b)", QueryParameters(1, [b"1", None], ["a", "b"])),
    Prepare("SELECT * FROM ks.users WHERE id = ?"),
    Execute(b"\xde\xad\xbe\xef" * 4, _FULL_PARAMS),
    Execute(b"", QueryParameters(Consistency.QUORUM, values=[b"x"])),
    Batch(
        BatchType.UNLOGGED,
        [
            BatchStatement(False, "INSERT INTO t (a) VALUES (?)", [b"\x00\x00\x00\x01"]),
            BatchStatement(True, b"\x01\x02", [None, UNSET]),
            BatchStatement(False, "DELETE FROM t WHERE a = 1"),
        ],
        Consistency.QUORUM,
        Consistency.SERIAL,
        123,
    ),
    Batch(BatchType.LOGGED, [], Consistency.ONE),
    Error(ErrorCode.SYNTAX_ERROR, "line 1:0 no viable alternative"),
    Error(ErrorCode.SERVER_ERROR, ""),
    Error(0x7777, "an error code this codec does not know"),
    Error(ErrorCode.UNAVAILABLE, "Cannot achieve consistency", Unavailable(Consistency.ALL, 3, 1)),
    Error(ErrorCode.WRITE_TIMEOUT, "timeout", WriteTimeout(Consistency.QUORUM, 1, 2, "SIMPLE")),
    Error(ErrorCode.READ_TIMEOUT, "timeout", ReadTimeout(Consistency.QUORUM, 1, 2, True)),
    Error(ErrorCode.READ_FAILURE, "failure", ReadFailure(Consistency.ONE, 0, 1, 1, False)),
    Error(ErrorCode.WRITE_FAILURE, "failure", WriteFailure(Consistency.ONE, 0, 1, 1, "BATCH")),
    Error(ErrorCode.FUNCTION_FAILURE, "boom", FunctionFailure("ks", "fn", ["int", "text"])),
    Error(ErrorCode.ALREADY_EXISTS, "exists", AlreadyExists("ks", "users")),
    Error(ErrorCode.UNPREPARED, "unknown id", Unprepared(b"\x01\x02\x03")),
    TopologyChangeEvent("NEW_NODE", ("127.0.0.2", 9042)),
    StatusChangeEvent("DOWN", ("::1", 9042)),
    SchemaChangeEvent("CREATED", "TABLE", "ks", "users"),
    SchemaChangeEvent("DROPPED", "KEYSPACE", "ks"),
    SchemaChangeEvent("UPDATED", "FUNCTION", "ks", "fn", ["int"]),
    ResultVoid(),
    ResultSetKeyspace("ks"),
    ResultRows(RowsMetadata(_COLUMNS), [[b"\x00\x00\x00\x01", b"ann", None], [b"", b"", b""]]),
    ResultRows(RowsMetadata(_COLUMNS, paging_state=b"page2"), []),
    ResultRows(RowsMetadata(no_metadata=True, column_count=2), [[b"a", None]]),
    ResultRows(
        RowsMetadata([ColumnSpec("ks", "a", "x", _INT), ColumnSpec("other", "b", "y", _TEXT)]),
        [[None, b"y"]],
    ),
    ResultRows(RowsMetadata(), []),
    ResultPrepared(
        b"\xaa" * 16,
        PreparedMetadata([ColumnSpec("ks", "users", "id", _INT)], [0]),
        RowsMetadata(_COLUMNS),
    ),
    ResultPrepared(b"\xbb", PreparedMetadata(), RowsMetadata()),
    ResultSchemaChange("CREATED", "KEYSPACE", "ks"),
    ResultSchemaChange("UPDATED", "AGGREGATE", "ks", "agg", ["int", "int"]),
]


@pytest.mark.parametrize("msg", _MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: Message) -> None:
    opcode, body = encode_message(msg)
    decoded = decode_message(opcode, body)
    assert decoded == msg
    assert decoded.encode() == body


@pytest.mark.parametrize("msg", _MESSAGES, ids=lambda m: type(m).__name__)
def test_every_truncated_body_raises_protocol_error(msg: Message) -> None:
    opcode, body = encode_message(msg)
    for cut in range(len(body)):
        try:
            decoded = decode_message(opcode, body[:cut])
        except CQLProtocolError:
            continue
        # A prefix may itself be a valid, shorter message (e.g. fewer flags
        # set); it must then never claim to be the full message.
        assert decoded != msg or cut == len(body)


def test_unknown_opcode_raises_protocol_error() -> None:
    with pytest.raises(CQLProtocolError, match="opcode"):
        decode_message(0x04, b"")


def test_result_of_unknown_kind_raises_protocol_error() -> None:
    with pytest.raises(CQLProtocolError, match="kind"):
        decode_message(Opcode.RESULT, b"\x00\x00\x00\x09")


def test_error_without_required_details_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="Unprepared"):
        Error(ErrorCode.UNPREPARED, "missing id").encode()
    with pytest.raises(ValueError, match="no details"):
        Error(ErrorCode.INVALID, "x", AlreadyExists("ks", "t")).encode()


def test_named_values_in_batch_are_rejected() -> None:
    body = bytearray(Batch(BatchType.LOGGED, [], Consistency.ONE).encode())
    body[-1] |= 0x40
    with pytest.raises(CQLProtocolError, match="named values"):
        Batch.decode(bytes(body))


@settings(max_examples=examples(300), deadline=None)
@given(st.sampled_from(list(Opcode)), st.binary(max_size=80))
def test_random_bodies_only_ever_raise_protocol_errors(opcode: Opcode, body: bytes) -> None:
    with contextlib.suppress(CQLProtocolError):
        decode_message(opcode, body)


@settings(max_examples=examples(200), deadline=None)
@given(st.sampled_from(_MESSAGES), st.data())
def test_mutated_bodies_only_ever_raise_protocol_errors(msg: Message, data: st.DataObject) -> None:
    opcode, body = encode_message(msg)
    if not body:
        return
    raw = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(CQLProtocolError):
        decode_message(opcode, bytes(raw))


_VALUE = st.one_of(st.none(), st.just(UNSET), st.binary(max_size=20))


@settings(max_examples=examples(200), deadline=None)
@given(
    st.integers(0, 10),
    st.one_of(st.none(), st.lists(_VALUE, max_size=5)),
    st.booleans(),
    st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)),
    st.one_of(st.none(), st.binary(max_size=10)),
    st.one_of(st.none(), st.integers(8, 9)),
    st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
)
def test_query_parameters_round_trip(
    consistency: int,
    values: list[Any] | None,
    skip: bool,
    page_size: int | None,
    paging_state: bytes | None,
    serial: int | None,
    timestamp: int | None,
) -> None:
    params = QueryParameters(
        consistency, values, None, skip, page_size, paging_state, serial, timestamp
    )
    assert Execute.decode(Execute(b"id", params).encode()) == Execute(b"id", params)


# -- requests encoded by cassandra-driver ---------------------------------------


def _driver_frame(msg: Any, stream: int = 7) -> tuple[int, bytes]:
    (frame,) = FrameDecoder().feed(driver_encode(msg, stream))
    assert frame.stream == stream
    extras, body = split_extras(frame.flags, frame.body, response=False)
    assert extras == BodyExtras()
    return frame.opcode, body


def test_decodes_driver_query_with_every_parameter() -> None:
    msg = QueryMessage(
        "SELECT * FROM t WHERE a = ?",
        ConsistencyLevel.LOCAL_QUORUM,
        serial_consistency_level=ConsistencyLevel.LOCAL_SERIAL,
        fetch_size=100,
        paging_state=b"\x05\x06",
        timestamp=42,
    )
    opcode, body = _driver_frame(msg)
    assert decode_message(opcode, body) == Query(
        "SELECT * FROM t WHERE a = ?",
        QueryParameters(
            Consistency.LOCAL_QUORUM,
            page_size=100,
            paging_state=b"\x05\x06",
            serial_consistency=Consistency.LOCAL_SERIAL,
            timestamp=42,
        ),
    )
    assert peek_query_string(body) == "SELECT * FROM t WHERE a = ?"
    assert peek_consistency(opcode, body) == Consistency.LOCAL_QUORUM


def test_decodes_driver_execute_with_null_and_unset_values() -> None:
    from cassandra.query import UNSET_VALUE

    values = [b"\x00\x00\x00\x2a", None, UNSET_VALUE]
    msg = ExecuteMessage(b"\x11" * 16, values, ConsistencyLevel.ONE, skip_meta=True, fetch_size=10)
    opcode, body = _driver_frame(msg)
    decoded = decode_message(opcode, body)
    # cassandra-driver 3.30 accepts skip_meta but never sets the flag on the wire.
    assert decoded == Execute(
        b"\x11" * 16,
        QueryParameters(Consistency.ONE, [b"\x00\x00\x00\x2a", None, UNSET], page_size=10),
    )
    assert peek_execute_id(body) == b"\x11" * 16
    assert query_parameters_offset(opcode, body) == 18


def test_decodes_driver_prepare_startup_options_register_auth() -> None:
    assert decode_message(*_driver_frame(PrepareMessage("SELECT 1"))) == Prepare("SELECT 1")
    startup = decode_message(*_driver_frame(StartupMessage("3.4.5", {"COMPRESSION": "lz4"})))
    assert isinstance(startup, Startup)
    assert startup.options["CQL_VERSION"] == "3.4.5"
    assert startup.options["COMPRESSION"] == "lz4"
    assert decode_message(*_driver_frame(OptionsMessage())) == Options()
    assert decode_message(*_driver_frame(RegisterMessage(["STATUS_CHANGE"]))) == Register(
        ["STATUS_CHANGE"]
    )
    assert decode_message(*_driver_frame(AuthResponseMessage(b"\x00u\x00p"))) == AuthResponse(
        b"\x00u\x00p"
    )


def test_decodes_driver_batch() -> None:
    msg = BatchMessage(
        DriverBatchType.UNLOGGED,
        [
            (False, "INSERT INTO t (a) VALUES (?)", [b"\x00\x00\x00\x01"]),
            (True, b"\x09\x09", [None]),
        ],
        ConsistencyLevel.QUORUM,
        serial_consistency_level=ConsistencyLevel.SERIAL,
        timestamp=99,
    )
    assert decode_message(*_driver_frame(msg)) == Batch(
        BatchType.UNLOGGED,
        [
            BatchStatement(False, "INSERT INTO t (a) VALUES (?)", [b"\x00\x00\x00\x01"]),
            BatchStatement(True, b"\x09\x09", [None]),
        ],
        Consistency.QUORUM,
        Consistency.SERIAL,
        99,
    )


def test_decodes_driver_custom_payload_prefix() -> None:
    msg = QueryMessage("SELECT 1", ConsistencyLevel.ONE)
    msg.custom_payload = {"k": b"v"}
    (frame,) = FrameDecoder().feed(driver_encode(msg, 1))
    extras, body = split_extras(frame.flags, frame.body, response=False)
    assert extras.custom_payload == {"k": b"v"}
    assert peek_query_string(body) == "SELECT 1"


# -- responses decoded by cassandra-driver --------------------------------------


def _driver_decode(msg: Message, extras: BodyExtras | None = None) -> Any:
    opcode, body = encode_message(msg)
    flags = 0
    if extras is not None:
        flags, body = join_extras(extras, body, response=True)
    return driver_decode(opcode, body, flags=flags)


def test_driver_reads_our_rows_with_typed_cells() -> None:
    tags = _COLUMNS[2].type.serialize({"a": [1, 2]})
    rows: list[list[bytes | None]] = [
        [_INT.serialize(1), _TEXT.serialize("ann"), tags],
        [_INT.serialize(2), None, None],
    ]
    body = encode_rows_body(RowsMetadata(_COLUMNS, paging_state=b"next"), rows)
    decoded = driver_decode(Opcode.RESULT, body)
    assert decoded.column_names == ["id", "name", "tags"]
    assert decoded.paging_state == b"next"
    assert [tuple(r) for r in decoded.parsed_rows] == [(1, "ann", {"a": [1, 2]}), (2, None, None)]
    assert decode_message(Opcode.RESULT, body) == ResultRows(
        RowsMetadata(_COLUMNS, paging_state=b"next"), rows
    )


def test_driver_reads_our_prepared_result() -> None:
    prepared = ResultPrepared(
        b"\x42" * 16,
        PreparedMetadata([ColumnSpec("ks", "users", "id", _INT)], [0]),
        RowsMetadata(_COLUMNS),
    )
    decoded = _driver_decode(prepared)
    assert decoded.query_id == b"\x42" * 16
    assert decoded.pk_indexes == [0]
    assert [c.name for c in decoded.bind_metadata] == ["id"]
    assert [c[2] for c in decoded.column_metadata] == ["id", "name", "tags"]
    assert peek_prepared_id(prepared.encode()) == b"\x42" * 16
    assert peek_result_kind(prepared.encode()) == ResultKind.PREPARED


def test_driver_reads_our_errors_with_details() -> None:
    unavailable = _driver_decode(
        Error(ErrorCode.UNAVAILABLE, "nope", Unavailable(Consistency.ALL, 3, 1))
    )
    assert unavailable.info == {
        "consistency": Consistency.ALL,
        "required_replicas": 3,
        "alive_replicas": 1,
    }
    timeout = _driver_decode(
        Error(ErrorCode.WRITE_TIMEOUT, "slow", WriteTimeout(Consistency.ONE, 0, 1, "SIMPLE"))
    )
    assert timeout.info["write_type"] == WriteType.SIMPLE
    unprepared = _driver_decode(Error(ErrorCode.UNPREPARED, "?", Unprepared(b"\x07")))
    assert unprepared.info == b"\x07"
    exists = _driver_decode(Error(ErrorCode.ALREADY_EXISTS, "x", AlreadyExists("ks", "t")))
    assert exists.info == {"keyspace": "ks", "table": "t"}
    failure = _driver_decode(
        Error(ErrorCode.READ_FAILURE, "f", ReadFailure(Consistency.ONE, 0, 1, 1, True))
    )
    assert failure.info["failures"] == 1
    assert failure.info["data_retrieved"] is True


def test_driver_reads_our_supported_ready_authenticate_and_events() -> None:
    supported = _driver_decode(Supported({"CQL_VERSION": ["3.3.1"], "COMPRESSION": ["lz4"]}))
    assert supported.cql_versions == ["3.3.1"]
    assert supported.options["COMPRESSION"] == ["lz4"]
    assert type(_driver_decode(Ready())).__name__ == "ReadyMessage"
    assert (
        _driver_decode(Authenticate("PasswordAuthenticator")).authenticator
        == "PasswordAuthenticator"
    )
    event = _driver_decode(StatusChangeEvent("UP", ("127.0.0.1", 9042)))
    assert event.event_args == {"change_type": "UP", "address": ("127.0.0.1", 9042)}
    schema = _driver_decode(SchemaChangeEvent("CREATED", "TABLE", "ks", "t"))
    assert schema.event_args == {
        "target_type": "TABLE",
        "change_type": "CREATED",
        "keyspace": "ks",
        "table": "t",
    }
    ks = _driver_decode(ResultSetKeyspace("ks"))
    assert ks.new_keyspace == "ks"


def test_driver_reads_our_tracing_id_and_warnings() -> None:
    trace = uuid.uuid4()
    decoded = _driver_decode(
        ResultVoid(),
        BodyExtras(tracing_id=trace, warnings=["big batch"], custom_payload={"p": b"1"}),
    )
    assert decoded.trace_id == trace
    assert decoded.warnings == ["big batch"]
    assert decoded.custom_payload == {"p": b"1"}


def test_extras_round_trip_and_request_tracing_adds_no_prefix() -> None:
    extras = BodyExtras(uuid.uuid4(), ["w1", "w2"], {"k": None})
    flags, body = join_extras(extras, b"BODY", response=True)
    assert flags == TRACING | WARNING | CUSTOM_PAYLOAD
    assert split_extras(flags, body, response=True) == (extras, b"BODY")
    assert split_extras(TRACING, b"BODY", response=False) == (BodyExtras(), b"BODY")


def test_peek_helpers_reject_short_or_wrong_bodies() -> None:
    with pytest.raises(CQLProtocolError):
        peek_query_string(b"\x00\x00\x00\x10abc")
    with pytest.raises(CQLProtocolError):
        peek_execute_id(b"\x00")
    with pytest.raises(CQLProtocolError):
        peek_result_kind(b"\x00\x00")
    with pytest.raises(CQLProtocolError):
        peek_prepared_id(ResultVoid().encode())
    with pytest.raises(CQLProtocolError):
        query_parameters_offset(Opcode.PREPARE, Prepare("x").encode())
    with pytest.raises(CQLProtocolError):
        query_parameters_offset(Opcode.QUERY, b"\x00\x00\x00\x01x\x00")


def test_rows_with_a_truncated_last_cell_raise_protocol_error() -> None:
    body = ResultRows(RowsMetadata(_COLUMNS[:1]), [[b"\x00\x00\x00\x01"]]).encode()
    with pytest.raises(CQLProtocolError, match="past the end"):
        decode_message(Opcode.RESULT, body[:-1])


def test_rows_count_the_body_cannot_hold_is_rejected_before_allocating() -> None:
    huge = RowsMetadata(no_metadata=True, column_count=0).encode() + b"\x7f\xff\xff\xff"
    with pytest.raises(CQLProtocolError, match="row count"):
        decode_message(Opcode.RESULT, b"\x00\x00\x00\x02" + huge)
    meta = RowsMetadata(no_metadata=True, column_count=3).encode()
    with pytest.raises(CQLProtocolError, match="row count"):
        decode_message(Opcode.RESULT, b"\x00\x00\x00\x02" + meta + b"\x00\x10\x00\x00")


_CELL = st.one_of(st.none(), st.binary(max_size=30))


@settings(max_examples=examples(100), deadline=None)
@given(st.integers(1, 4).flatmap(lambda n: st.lists(st.lists(_CELL, min_size=n, max_size=n))))
def test_rows_of_random_cells_round_trip(rows: list[list[bytes | None]]) -> None:
    width = len(rows[0]) if rows else 1
    meta = RowsMetadata([ColumnSpec("ks", "t", f"c{i}", _TEXT) for i in range(width)])
    body = encode_rows_body(meta, rows)
    assert decode_message(Opcode.RESULT, body) == ResultRows(meta, rows)
