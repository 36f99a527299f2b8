"""Turning statement terms into Python cell values of a given CQL type.

`resolve(term, ctype, bound)` gives the value a term denotes when it lands
in a column of type `ctype`: literals are converted as Cassandra would
(`'2024-01-02'` for a date, `0xcafe` for a blob, `{}` for an empty set),
bind markers take the already-decoded bound value, and a handful of
functions (`now()`, `uuid()`, `toTimestamp(now())`, ...) are evaluated.
Values are those the codec produces, so a literal and a bound value of the
same thing compare equal. A term that cannot be a value of the type raises
`InvalidRequest` with a message in Cassandra's style.

`decode_bound(raw, ctype)` decodes one bound value body.
"""

from __future__ import annotations

import datetime
import decimal
import ipaddress
import re
import uuid
from collections.abc import Sequence
from typing import Any

from coalesce.cql.errors import CQLProtocolError
from coalesce.cql.messages import UNSET
from coalesce.cql.types import (
    CqlType,
    Duration,
    ListType,
    MapType,
    SetType,
    TupleType,
    parse_type,
)
from coalesce.emulator.errors import InvalidRequest
from coalesce.emulator.statements import (
    BindMarker,
    Constant,
    FunctionCall,
    ListLiteral,
    MapLiteral,
    SetLiteral,
    Term,
    TupleLiteral,
)

__all__ = ["UNSET", "decode_bound", "resolve", "serialize_checked"]

_INTEGER_TYPES = frozenset(["int", "bigint", "smallint", "tinyint", "varint", "counter"])
_STRING_TYPES = frozenset(["text", "ascii", "varchar"])
_EPOCH = datetime.datetime(1970, 1, 1)
_TIMESTAMP_FORMATS = (
    "%Y-%m-%d %H:%M:%S.%f%z",
    "%Y-%m-%d %H:%M:%S%z",
    "%Y-%m-%d %H:%M%z",
    "%Y-%m-%dT%H:%M:%S.%f%z",
    "%Y-%m-%dT%H:%M:%S%z",
    "%Y-%m-%dT%H:%M%z",
    "%Y-%m-%d %H:%M:%S.%f",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%dT%H:%M:%S.%f",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d%z",
    "%Y-%m-%d",
)
_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?$")
_DURATION_RE = re.compile(r"(\d+)(y|mo|w|d|h|ms|m|s|us|µs|ns)", re.IGNORECASE)
_DURATION_UNITS: dict[str, tuple[int, int, int]] = {
    "y": (12, 0, 0),
    "mo": (1, 0, 0),
    "w": (0, 7, 0),
    "d": (0, 1, 0),
    "h": (0, 0, 3600 * 10**9),
    "m": (0, 0, 60 * 10**9),
    "s": (0, 0, 10**9),
    "ms": (0, 0, 10**6),
    "us": (0, 0, 10**3),
    "µs": (0, 0, 10**3),
    "ns": (0, 0, 1),
}


def decode_bound(raw: bytes, ctype: CqlType) -> Any:
    """Decode one bound value body; raises `InvalidRequest` if it is not a valid `ctype`."""
    try:
        return ctype.deserialize(raw)
    except CQLProtocolError as exc:
        raise InvalidRequest(f"Exception while binding column: {exc.message}") from None


def serialize_checked(ctype: CqlType, value: Any) -> bytes:
    """`ctype.serialize(value)`, with a bad value reported as `InvalidRequest`."""
    try:
        return ctype.serialize(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequest(f"Invalid value for type {ctype.cql_name}: {exc}") from None


def resolve(term: Term, ctype: CqlType, bound: Sequence[Any]) -> Any:
    """The value of `term` as a `ctype` cell; `bound` holds decoded values by marker index.

    Returns `None` for null and `UNSET` for an unset bound value.
    """
    if isinstance(term, BindMarker):
        if term.index >= len(bound):
            raise InvalidRequest(
                f"There were {len(bound)} markers(?) in CQL but {term.index + 1} bound variables"
            )
        return bound[term.index]
    if isinstance(term, Constant):
        return _constant(term, ctype)
    if isinstance(term, FunctionCall):
        return _function(term, ctype, bound)
    if isinstance(term, ListLiteral):
        if not isinstance(ctype, ListType) or isinstance(ctype, SetType):
            raise _mismatch(term, ctype)
        return [_element(item, ctype.element, bound) for item in term.items]
    if isinstance(term, SetLiteral) or (
        isinstance(term, MapLiteral) and not term.items and isinstance(ctype, SetType)
    ):
        if not isinstance(ctype, SetType):
            raise _mismatch(term, ctype)
        items = term.items if isinstance(term, SetLiteral) else ()
        values = [_element(item, ctype.element, bound) for item in items]
        try:
            return frozenset(values)
        except TypeError:
            return values
    if isinstance(term, MapLiteral):
        if not isinstance(ctype, MapType):
            raise _mismatch(term, ctype)
        pairs = [
            (_element(k, ctype.key, bound), _element(v, ctype.value, bound)) for k, v in term.items
        ]
        try:
            return dict(pairs)
        except TypeError:
            return pairs
    if isinstance(term, TupleLiteral):
        if not isinstance(ctype, TupleType):
            raise _mismatch(term, ctype)
        if len(term.items) > len(ctype.elements):
            raise InvalidRequest(
                f"Invalid tuple literal: too many elements. Type {ctype.cql_name} expects "
                f"{len(ctype.elements)} but got {len(term.items)}"
            )
        resolved = [
            resolve(item, t, bound) for item, t in zip(term.items, ctype.elements, strict=False)
        ]
        resolved += [None] * (len(ctype.elements) - len(resolved))
        return tuple(resolved)
    raise _mismatch(term, ctype)


def _element(term: Term, ctype: CqlType, bound: Sequence[Any]) -> Any:
    value = resolve(term, ctype, bound)
    if value is None or value is UNSET:
        raise InvalidRequest("null is not supported inside collections")
    return value


def _mismatch(term: Term, ctype: CqlType) -> InvalidRequest:
    shown = term.text if isinstance(term, Constant) else type(term).__name__
    return InvalidRequest(
        f"Invalid {_describe(term)} constant ({shown}) for column of type {ctype.cql_name}"
    )


def _describe(term: Term) -> str:
    if isinstance(term, Constant):
        return {
            "string": "STRING",
            "integer": "INTEGER",
            "float": "FLOAT",
            "uuid": "UUID",
            "blob": "HEX",
            "boolean": "BOOLEAN",
            "null": "NULL",
        }[term.kind]
    return "collection"


def _constant(term: Constant, ctype: CqlType) -> Any:
    kind, text = term.kind, term.text
    if kind == "null":
        return None
    name = ctype.cql_name
    try:
        if name in _INTEGER_TYPES and kind == "integer":
            value: Any = int(text)
        elif name in ("float", "double") and kind in ("integer", "float"):
            value = float(text)
        elif name == "decimal" and kind in ("integer", "float"):
            value = decimal.Decimal(text)
        elif name in _STRING_TYPES and kind == "string":
            value = text
        elif name == "blob" and kind == "blob":
            value = bytes.fromhex(text[2:])
        elif name == "boolean" and kind == "boolean":
            value = text == "true"
        elif name in ("uuid", "timeuuid") and kind == "uuid":
            value = uuid.UUID(text)
        elif name == "timestamp" and kind in ("integer", "string"):
            value = (
                _timestamp(text)
                if kind == "string"
                else _EPOCH + datetime.timedelta(milliseconds=int(text))
            )
        elif name == "date" and kind in ("integer", "string"):
            value = datetime.date.fromisoformat(text) if kind == "string" else _raw_date(text)
        elif name == "time" and kind in ("integer", "string"):
            value = _time(text) if kind == "string" else int(text)
        elif name == "inet" and kind == "string":
            value = str(ipaddress.ip_address(text))
        elif name == "duration" and kind == "string":
            value = _duration(text)
        else:
            raise _mismatch(term, ctype)
    except (ValueError, OverflowError, decimal.InvalidOperation):
        raise InvalidRequest(f"Unable to make {name} from '{text}'") from None
    serialize_checked(ctype, value)
    return value


def _raw_date(text: str) -> Any:
    raw = int(text)
    return parse_type("date").deserialize(raw.to_bytes(4, "big"))


def _timestamp(text: str) -> datetime.datetime:
    cleaned = text.strip()
    if cleaned.endswith("Z"):
        cleaned = cleaned[:-1] + "+0000"
    for fmt in _TIMESTAMP_FORMATS:
        try:
            parsed = datetime.datetime.strptime(cleaned, fmt)
        except ValueError:
            continue
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(datetime.UTC).replace(tzinfo=None)
        return parsed.replace(microsecond=parsed.microsecond // 1000 * 1000)
    raise ValueError(f"unable to parse a timestamp from '{text}'")


def _time(text: str) -> int:
    match = _TIME_RE.match(text.strip())
    if match is None:
        raise ValueError(f"unable to parse a time from '{text}'")
    hours, minutes, seconds, fraction = match.groups()
    nanos = int((fraction or "").ljust(9, "0"))
    return ((int(hours) * 60 + int(minutes)) * 60 + int(seconds)) * 10**9 + nanos


def _duration(text: str) -> Duration:
    body = text.strip()
    sign = -1 if body.startswith("-") else 1
    body = body.lstrip("-")
    months = days = nanos = 0
    pos = 0
    for match in _DURATION_RE.finditer(body):
        if match.start() != pos:
            raise ValueError(f"unable to parse a duration from '{text}'")
        pos = match.end()
        m, d, n = _DURATION_UNITS[match.group(2).lower()]
        count = int(match.group(1))
        months += m * count
        days += d * count
        nanos += n * count
    if pos != len(body) or pos == 0:
        raise ValueError(f"unable to parse a duration from '{text}'")
    return Duration(sign * months, sign * days, sign * nanos)


def _function(term: FunctionCall, ctype: CqlType, bound: Sequence[Any]) -> Any:
    name = term.name
    if name in ("now", "currenttimeuuid") and not term.args:
        return uuid.uuid1()
    if name == "uuid" and not term.args:
        return uuid.uuid4()
    if name == "currenttimestamp" and not term.args:
        return _now()
    if name == "currentdate" and not term.args:
        return _now().date()
    if name in ("totimestamp", "todate") and len(term.args) == 1:
        inner = resolve(term.args[0], parse_type("timeuuid"), bound)
        if inner is None:
            return None
        moment = _EPOCH + datetime.timedelta(microseconds=(inner.time - 0x01B21DD213814000) // 10)
        moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
        return moment if name == "totimestamp" else moment.date()
    raise InvalidRequest(
        f"Unknown function {name} called with {len(term.args)} argument(s) "
        f"for a {ctype.cql_name} value"
    )


def _now() -> datetime.datetime:
    moment = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)
