"""`Flights` on its own: answers kept for requests read before them, and forgetting."""

from __future__ import annotations

from typing import Any

from coalesce.cql import Frame, Opcode
from coalesce.metrics import FlightStats
from coalesce.sidecar.errors import UpstreamError
from coalesce.sidecar.flights import Answer, Flight, Flights

KEY = ("role", "ks", Opcode.EXECUTE, b"body")
ANSWER = Frame(4, True, 0, 0, Opcode.RESULT, b"\x00\x00\x00\x01")


class _Conn:
    closed = False

    def __init__(self) -> None:
        self.callbacks: list[Any] = []

    def send(self, opcode: int, body: bytes, flags: int, callback: Any, **_: Any) -> None:
        self.callbacks.append(callback)


class _Pool:
    def __init__(self) -> None:
        self.conn = _Conn()
        self.upstream = self

    errors = 0

    def pick(self, node: Any = None, shard: Any = None) -> _Conn:
        return self.conn


class _Ingest:
    ingest_seq = 10
    backlogged = True  # some client still has requests read but not dispatched


class _Waiter:
    read_at = 0.0

    def __init__(self) -> None:
        self.answers: list[tuple[list[int], Answer]] = []

    def answer(self, flight: Flight, streams: list[int], answer: Answer) -> None:
        self.answers.append((streams, answer))

    def refuse(self, flight: Flight, streams: list[int], error: UpstreamError) -> None:
        raise AssertionError(error)


def _started(flights: Flights, pool: _Pool, waiter: _Waiter) -> Flight:
    flight = Flight(flights, KEY, pool, None, Opcode.EXECUTE, 0, b"body",  # type: ignore[arg-type]
                    None, ("ks", "t"), None)
    assert flights.start(flight, waiter, 1)
    return flight


def _flights() -> Flights:
    flights = Flights(FlightStats("test", lambda: 0))
    flights.ingest = _Ingest()
    return flights


def test_an_answer_is_kept_for_requests_read_before_it_and_only_those() -> None:
    flights, pool, waiter = _flights(), _Pool(), _Waiter()
    _started(flights, pool, waiter)
    pool.conn.callbacks[0](ANSWER)
    assert flights.settled == 1
    assert flights.join(KEY, waiter, 2, seq=10) is not None  # read before the answer
    assert flights.join(KEY, waiter, 3, seq=11) is None  # read after: a new flight
    flights.drop_settled(11)
    assert flights.settled == 0 and len(flights) == 0 and flights.running == 0


def test_a_flight_forgotten_by_a_write_keeps_no_answer_for_later_requests() -> None:
    # The write completed while the read was in flight: a request dispatched after it
    # must not get the older read's answer, however early it was read.
    flights, pool, waiter = _flights(), _Pool(), _Waiter()
    _started(flights, pool, waiter)
    assert flights.forget(KEY)
    pool.conn.callbacks[0](ANSWER)
    assert [streams for streams, _ in waiter.answers] == [[1]]  # its waiter still answered
    assert flights.settled == 0
    assert flights.join(KEY, waiter, 2, seq=1) is None
    assert len(flights) == 0 and flights.running == 0
