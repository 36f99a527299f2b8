"""Random arrival / cancel / complete / forget interleavings against the contract."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coalesce import SingleFlight
from tests.conftest import settle

# Every test runs with the inline first step and under the plain-task fallback.
pytestmark = pytest.mark.usefixtures("first_step")

OPS = st.lists(
    st.one_of(
        st.just(("arrive",)),
        st.tuples(st.just("cancel"), st.integers(0, 30)),
        st.tuples(st.just("complete"), st.integers(0, 10), st.booleans()),
        st.just(("forget",)),
        st.just(("sync",)),  # a call that finishes in its first step
    ),
    max_size=40,
)


@dataclass
class Flight:
    number: int
    started: int  # the step at which the backend was entered
    ended: int | None = None
    gate: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


async def run(ops: list[tuple[Any, ...]]) -> None:
    group: SingleFlight[Any] = SingleFlight(metrics=False)
    flights: list[Flight] = []
    step = 0
    last_forget = -1

    async def backend() -> Flight:
        flight = Flight(len(flights), step)
        flights.append(flight)
        try:
            await flight.gate
        finally:
            flight.ended = step
        return flight

    async def instant() -> Flight:
        flight = Flight(len(flights), step, ended=step)
        flights.append(flight)
        return flight

    callers: list[tuple[asyncio.Task[Flight], int, int]] = []  # task, arrival, last forget
    for step, op in enumerate(ops):
        if op[0] in ("arrive", "sync"):
            fn = backend if op[0] == "arrive" else instant
            callers.append((asyncio.create_task(group.do("k", fn)), step, last_forget))
        elif op[0] == "cancel" and callers:
            callers[op[1] % len(callers)][0].cancel()
        elif op[0] == "complete":
            running = [f for f in flights if not f.gate.done() and f.ended is None]
            if running:
                flight = running[op[1] % len(running)]
                if op[2]:
                    flight.gate.set_result(None)
                else:
                    flight.gate.set_exception(RuntimeError(f"flight {flight.number}"))
        elif op[0] == "forget":
            group.forget("k")
            last_forget = step
        await settle()

    for flight in flights:
        if not flight.gate.done():
            flight.gate.set_result(None)
    await settle()
    for task, arrival, forgotten in callers:
        if task.cancelled():
            continue
        exc = task.exception()
        if exc is not None:
            assert isinstance(exc, RuntimeError)
            answer = flights[int(str(exc).split()[1])]
        else:
            answer = task.result()
        # The answer came from a flight that started after the caller's last preceding
        # forget and was still running when the caller arrived (or started then).
        assert answer.started > forgotten
        assert answer.started <= arrival
        assert answer.ended is None or answer.ended >= arrival
    assert len(group) == 0 and group.running == 0


@given(OPS)
def test_every_answer_comes_from_a_flight_live_at_arrival_and_after_the_last_forget(ops):
    asyncio.run(run(ops))
