"""CQL value types: names, [option]s, and values checked against cassandra-driver."""

from __future__ import annotations

import contextlib
import datetime
import decimal
import ipaddress
import math
import uuid
from typing import Any

import cassandra.cqltypes as driver_types
import pytest
from cassandra.util import Duration as DriverDuration
from hypothesis import given, settings
from hypothesis import strategies as st

from coalesce.cql import (
    TYPE_BY_NAME,
    CQLProtocolError,
    CqlType,
    Duration,
    InvalidValueError,
    ListType,
    MapType,
    SetType,
    TupleType,
    UserType,
    decode_option,
    parse_type,
)
from tests.conftest import examples

_NATIVE_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "ascii": st.text(alphabet=st.characters(max_codepoint=127)),
    "bigint": st.integers(-(2**63), 2**63 - 1),
    "blob": st.binary(),
    "boolean": st.booleans(),
    "counter": st.integers(-(2**63), 2**63 - 1),
    "decimal": st.decimals(allow_nan=False, allow_infinity=False),
    "double": st.floats(allow_nan=False),
    "float": st.floats(allow_nan=False, width=32),
    "int": st.integers(-(2**31), 2**31 - 1),
    "timestamp": st.datetimes().map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000)),
    "uuid": st.uuids(),
    "text": st.text(),
    "varint": st.integers(),
    "timeuuid": st.uuids(version=1),
    "inet": st.ip_addresses().map(str),
    "date": st.dates(),
    "time": st.integers(0, 86_400 * 10**9 - 1),
    "smallint": st.integers(-(2**15), 2**15 - 1),
    "tinyint": st.integers(-128, 127),
    "duration": st.one_of(
        st.builds(
            Duration,
            st.integers(0, 2**31 - 1),
            st.integers(0, 2**31 - 1),
            st.integers(0, 2**63 - 1),
        ),
        st.builds(
            Duration,
            st.integers(-(2**31), 0),
            st.integers(-(2**31), 0),
            st.integers(-(2**63), 0),
        ),
    ),
}
# Types whose values are hashable and totally ordered enough for sets/map keys.
_KEYABLE = ["int", "bigint", "text", "ascii", "uuid", "blob", "varint", "date", "inet", "boolean"]


def _driver_type(t: CqlType) -> Any:
    """The cassandra-driver class for one of our types."""
    if isinstance(t, MapType):
        return driver_types._cqltypes["map"].apply_parameters(
            [_driver_type(t.key), _driver_type(t.value)]
        )
    if isinstance(t, SetType):
        return driver_types._cqltypes["set"].apply_parameters([_driver_type(t.element)])
    if isinstance(t, ListType):
        return driver_types._cqltypes["list"].apply_parameters([_driver_type(t.element)])
    if isinstance(t, TupleType):
        return driver_types._cqltypes["tuple"].apply_parameters(
            [_driver_type(e) for e in t.elements]
        )
    return driver_types._cqltypes[t.cql_name]


@st.composite
def _typed_values(draw: st.DrawFn, depth: int = 2) -> tuple[CqlType, Any]:
    kind = draw(
        st.sampled_from(["native"] * 3 + (["list", "set", "map", "tuple"] if depth else []))
    )
    if kind == "native":
        name = draw(st.sampled_from(sorted(_NATIVE_VALUES)))
        return TYPE_BY_NAME[name], draw(_NATIVE_VALUES[name])
    if kind == "set":
        name = draw(st.sampled_from(_KEYABLE))
        t = SetType(TYPE_BY_NAME[name], frozen=depth < 2)
        return t, draw(st.frozensets(_NATIVE_VALUES[name], max_size=5))
    if kind == "map":
        key = draw(st.sampled_from(_KEYABLE))
        vt, _ = draw(_typed_values(depth - 1))
        values = st.deferred(lambda: _values_of(vt))
        m = MapType(TYPE_BY_NAME[key], vt, frozen=depth < 2)
        return m, draw(st.dictionaries(_NATIVE_VALUES[key], values, max_size=4))
    if kind == "list":
        et, _ = draw(_typed_values(depth - 1))
        return ListType(et, frozen=depth < 2), draw(st.lists(_values_of(et), max_size=4))
    elems = [draw(_typed_values(depth - 1))[0] for _ in range(draw(st.integers(1, 3)))]
    return TupleType(elems), draw(st.tuples(*(st.one_of(st.none(), _values_of(e)) for e in elems)))


def _values_of(t: CqlType) -> st.SearchStrategy[Any]:
    if isinstance(t, MapType):
        return st.dictionaries(_values_of(t.key), _values_of(t.value), max_size=3)
    if isinstance(t, SetType):
        return st.frozensets(_values_of(t.element), max_size=3)
    if isinstance(t, ListType):
        return st.lists(_values_of(t.element), max_size=3)
    if isinstance(t, TupleType):
        return st.tuples(*(st.one_of(st.none(), _values_of(e)) for e in t.elements))
    return _NATIVE_VALUES[t.cql_name]


# -- names and options ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("int", "int"),
        ("VARCHAR", "text"),
        ("map<text,int>", "map<text, int>"),
        ("  map < text , int > ", "map<text, int>"),
        ("frozen<list<int>>", "frozen<list<int>>"),
        ("list<frozen<set<uuid>>>", "list<frozen<set<uuid>>>"),
        (
            "tuple<int, text, frozen<map<int, blob>>>",
            "frozen<tuple<int, text, frozen<map<int, blob>>>>",
        ),
        ("frozen<tuple<int, text>>", "frozen<tuple<int, text>>"),
        ("Set<TimeUUID>", "set<timeuuid>"),
        ("'org.example.MyType'", "'org.example.MyType'"),
    ],
)
def test_parse_type_gives_canonical_name(name: str, canonical: str) -> None:
    assert parse_type(name).cql_name == canonical
    assert parse_type(canonical) == parse_type(name)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("integer", "unknown type"),
        ("list<int", "unexpected end"),
        ("map<int>", "takes 2"),
        ("list<int, int>", "takes 1"),
        ("list<list<int>>", "non-frozen collection"),
        ("frozen<int>", "frozen<> applies"),
        ("int>", "unexpected '>'"),
        ("", "empty"),
        ("list<%>", "unexpected '%'"),
    ],
)
def test_parse_type_rejects_bad_names_with_value_error(name: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_type(name)


def test_varchar_and_text_are_the_same_type() -> None:
    assert TYPE_BY_NAME["varchar"] is TYPE_BY_NAME["text"]
    assert hash(parse_type("varchar")) == hash(parse_type("text"))


def test_frozen_is_part_of_equality_but_not_of_the_option() -> None:
    frozen, plain = parse_type("frozen<list<int>>"), parse_type("list<int>")
    assert frozen != plain
    assert frozen.encode_option() == plain.encode_option()


@pytest.mark.parametrize(
    "name",
    [
        *sorted(TYPE_BY_NAME),
        "list<int>",
        "set<text>",
        "map<uuid, frozen<list<double>>>",
        "tuple<int, text, boolean>",
        "list<frozen<tuple<date, time>>>",
        "'org.example.Custom'",
    ],
)
def test_option_round_trips(name: str) -> None:
    t = parse_type(name)
    raw = t.encode_option() + b"trailing"
    decoded, end = decode_option(raw)
    assert decoded == t
    assert decoded.encode_option() == t.encode_option()
    assert end == len(raw) - len(b"trailing")


def test_user_type_option_round_trips() -> None:
    udt = UserType("ks", "address", [("street", parse_type("text")), ("zip", parse_type("int"))])
    decoded, end = decode_option(b"xx" + udt.encode_option(), 2)
    assert decoded == udt
    assert isinstance(decoded, UserType)
    assert decoded.fields == udt.fields
    assert end == 2 + len(udt.encode_option())
    assert udt.deserialize(udt.serialize({"street": "Main"})) == {"street": "Main", "zip": None}


def test_duration_option_is_the_v4_custom_class_and_v5_id_is_accepted() -> None:
    duration = parse_type("duration")
    assert duration.encode_option()[:2] == b"\x00\x00"
    assert b"DurationType" in duration.encode_option()
    assert decode_option(b"\x00\x15")[0] == duration


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00",
        b"\x00\x20",
        b"\x00\x21\x00\x09",
        b"\x00\x31\x00\x02\x00\x09",
        b"\x00\x99",
        b"\x00\x00\x00\x05ab",
    ],
)
def test_truncated_or_unknown_option_raises_protocol_error(raw: bytes) -> None:
    with pytest.raises(CQLProtocolError):
        decode_option(raw)


def test_deeply_nested_option_raises_protocol_error_not_recursion_error() -> None:
    with pytest.raises(CQLProtocolError, match="nested"):
        decode_option(b"\x00\x20" * 10_000 + b"\x00\x09")


@settings(max_examples=examples(200), deadline=None)
@given(st.binary(max_size=64))
def test_decode_option_on_random_bytes_only_raises_protocol_error(raw: bytes) -> None:
    with contextlib.suppress(CQLProtocolError):
        decode_option(raw)


# -- values --------------------------------------------------------------------


@settings(max_examples=examples(400), deadline=None)
@given(_typed_values())
def test_every_type_round_trips_values(typed: tuple[CqlType, Any]) -> None:
    t, value = typed
    assert t.deserialize(t.serialize(value)) == _expected_decoded(t, value)


def _expected_decoded(t: CqlType, value: Any) -> Any:
    if isinstance(t, TupleType):
        return tuple(
            None if v is None else _expected_decoded(e, v)
            for e, v in zip(t.elements, value, strict=True)
        )
    if isinstance(t, MapType):
        return {
            _expected_decoded(t.key, k): _expected_decoded(t.value, v) for k, v in value.items()
        }
    if isinstance(t, SetType):
        return frozenset(_expected_decoded(t.element, v) for v in value)
    if isinstance(t, ListType):
        return [_expected_decoded(t.element, v) for v in value]
    return value


@settings(max_examples=examples(400), deadline=None)
@given(_typed_values())
def test_serialized_bytes_decode_like_cassandra_driver_encodes(typed: tuple[CqlType, Any]) -> None:
    t, value = typed
    if "duration" in t.cql_name:
        return  # covered separately: the driver needs its own Duration class
    driver_bytes = _driver_type(t).to_binary(value, 4)
    assert t.serialize(value) == driver_bytes
    assert t.deserialize(driver_bytes) == _expected_decoded(t, value)


@settings(max_examples=examples(100), deadline=None)
@given(_NATIVE_VALUES["duration"])
def test_duration_matches_cassandra_driver_vint_encoding(d: Duration) -> None:
    t = TYPE_BY_NAME["duration"]
    driver_bytes = driver_types.DurationType.serialize(DriverDuration(*d), 4)
    assert t.serialize(d) == driver_bytes
    assert t.deserialize(driver_bytes) == d
    assert t.serialize(DriverDuration(*d)) == driver_bytes


def test_timestamp_accepts_aware_datetimes_and_decodes_naive_utc() -> None:
    t = TYPE_BY_NAME["timestamp"]
    aware = datetime.datetime(
        2024, 1, 2, 5, 4, 5, 123000, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
    )
    assert t.deserialize(t.serialize(aware)) == datetime.datetime(2024, 1, 2, 3, 4, 5, 123000)
    assert t.serialize(1_700_000_000_123) == t.serialize(
        datetime.datetime(2023, 11, 14, 22, 13, 20, 123000)
    )


def test_timestamp_and_date_outside_python_range_decode_to_int() -> None:
    assert TYPE_BY_NAME["timestamp"].deserialize(b"\x7f" + b"\xff" * 7) == 2**63 - 1
    assert TYPE_BY_NAME["date"].deserialize(b"\x00\x00\x00\x00") == 0


def test_date_int_is_the_raw_wire_value_like_the_driver() -> None:
    t = TYPE_BY_NAME["date"]
    assert t.serialize(2**31) == driver_types.SimpleDateType.serialize(2**31, 4)
    assert t.deserialize(t.serialize(2**31)) == datetime.date(1970, 1, 1)
    assert t.serialize("2024-02-29") == t.serialize(datetime.date(2024, 2, 29))


def test_time_accepts_datetime_time() -> None:
    t = TYPE_BY_NAME["time"]
    assert t.deserialize(t.serialize(datetime.time(1, 2, 3, 4))) == (3723 * 10**9 + 4000)


def test_inet_accepts_ipaddress_objects_and_decodes_to_str() -> None:
    t = TYPE_BY_NAME["inet"]
    assert t.deserialize(t.serialize(ipaddress.IPv6Address("::1"))) == "::1"
    assert t.deserialize(t.serialize(ipaddress.IPv4Address("10.0.0.1"))) == "10.0.0.1"


def test_nan_float_round_trips() -> None:
    for name in ("float", "double"):
        t = TYPE_BY_NAME[name]
        assert math.isnan(t.deserialize(t.serialize(math.nan)))


def test_set_of_unhashable_elements_decodes_to_list() -> None:
    t = parse_type("set<frozen<list<int>>>")
    assert t.deserialize(t.serialize([[1], [2, 3]])) == [[1], [2, 3]]


def test_map_with_unhashable_keys_decodes_to_pairs() -> None:
    t = parse_type("map<frozen<list<int>>, int>")
    assert t.deserialize(t.serialize([([1], 2)])) == [([1], 2)]


def test_tuple_with_fewer_fields_on_the_wire_is_padded_with_none() -> None:
    t = parse_type("tuple<int, text, boolean>")
    assert t.deserialize(t.serialize((7,))) == (7, None, None)


def test_empty_fixed_width_value_decodes_to_none_but_empty_text_stays_text() -> None:
    assert TYPE_BY_NAME["int"].deserialize(b"") is None
    assert TYPE_BY_NAME["uuid"].deserialize(b"") is None
    assert TYPE_BY_NAME["text"].deserialize(b"") == ""
    assert TYPE_BY_NAME["blob"].deserialize(b"") == b""


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("int", b"\x00\x00\x01"),
        ("bigint", b"\x00" * 9),
        ("boolean", b"\x00\x01"),
        ("uuid", b"\x00" * 15),
        ("timeuuid", uuid.uuid4().bytes),
        ("text", b"\xff\xfe"),
        ("ascii", "é".encode()),
        ("inet", b"\x01\x02\x03"),
        ("time", (-1).to_bytes(8, "big", signed=True)),
        ("decimal", b"\x00\x00\x01"),
        ("duration", b"\xff\x00"),
        ("list<int>", b"\x00\x00\x00\x02\x00\x00\x00\x04\x00\x00\x00\x01"),
        ("list<int>", b"\x7f\xff\xff\xff"),
        ("map<int, int>", b"\x00\x00\x00\x01\x00\x00\x00\x04\x00\x00\x00\x01"),
        ("list<int>", b"\x00\x00\x00\x00extra"),
    ],
)
def test_malformed_value_raises_invalid_value_error(name: str, raw: bytes) -> None:
    with pytest.raises(InvalidValueError) as info:
        parse_type(name).deserialize(raw)
    assert info.value.code == 0x2200


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("int", 2**31, ValueError),
        ("int", "1", TypeError),
        ("tinyint", -129, ValueError),
        ("text", 5, TypeError),
        ("ascii", "é", ValueError),
        ("timeuuid", uuid.uuid4(), ValueError),
        ("time", 86_400 * 10**9, ValueError),
        ("inet", "not-an-ip", ValueError),
        ("list<int>", "abc", TypeError),
        ("tuple<int>", (1, 2), ValueError),
        ("duration", Duration(1, -1, 0), ValueError),
        ("decimal", decimal.Decimal("NaN"), ValueError),
        ("float", 1e300, ValueError),
        ("int", None, TypeError),
    ],
)
def test_serialize_rejects_bad_python_values(name: str, value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_type(name).serialize(value)


@settings(max_examples=examples(300), deadline=None)
@given(
    st.sampled_from(
        [*sorted(TYPE_BY_NAME), "list<int>", "map<text, frozen<set<int>>>", "tuple<int, text>"]
    ),
    st.binary(max_size=40),
)
def test_deserialize_random_bytes_only_raises_invalid_value_error(name: str, raw: bytes) -> None:
    with contextlib.suppress(InvalidValueError):
        parse_type(name).deserialize(raw)
