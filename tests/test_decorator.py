"""@coalesced: keys, options, methods, and the wrapped function's face."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

from coalesce import SingleFlight, coalesced
from tests.conftest import settle

# Every test runs with the inline first step and under the plain-task fallback.
pytestmark = pytest.mark.usefixtures("first_step")


class Gate:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.opened = asyncio.Event()

    async def wait(self, *args: Any) -> None:
        self.calls.append(args)
        await self.opened.wait()


async def test_positional_keyword_and_default_spellings_share_one_call(groups):
    gate = Gate()

    @coalesced
    async def history(channel: int, limit: int = 50) -> tuple[int, int]:
        await gate.wait(channel, limit)
        return channel, limit

    groups.track(history.group)
    spellings = [history(1), history(channel=1), history(1, limit=50), history(1, 50)]
    callers = [asyncio.create_task(c) for c in spellings]
    other = asyncio.create_task(history(1, limit=10))
    await settle()
    assert gate.calls == [(1, 50), (1, 10)]
    gate.opened.set()
    assert await asyncio.gather(*callers) == [(1, 50)] * 4
    assert await other == (1, 10)


async def test_keyword_only_and_variadic_arguments_are_keyed(groups):
    gate = Gate()

    @coalesced
    async def fetch(*ids: int, consistency: str = "ONE", **opts: int) -> int:
        await gate.wait(ids, consistency, opts)
        return len(ids)

    groups.track(fetch.group)
    a = asyncio.create_task(fetch(1, 2, page=3))
    b = asyncio.create_task(fetch(1, 2, page=3, consistency="ONE"))
    c = asyncio.create_task(fetch(1, 2, page=4))
    await settle()
    assert len(gate.calls) == 2
    gate.opened.set()
    assert await asyncio.gather(a, b, c) == [2, 2, 2]


async def test_unhashable_argument_gets_a_type_error_naming_it(groups):
    @coalesced
    async def by_ids(channel: int, ids: list[int]) -> int:
        return len(ids)

    groups.track(by_ids.group)
    with pytest.raises(TypeError, match="'ids' is an unhashable list"):
        await by_ids(1, [1, 2])


async def test_missing_argument_raises_the_usual_type_error(groups):
    @coalesced
    async def needs(a: int, b: int) -> int:
        return a + b

    groups.track(needs.group)
    with pytest.raises(TypeError, match="missing"):
        await needs(1)  # type: ignore[call-arg]


async def test_key_function_decides_what_is_the_same(groups):
    gate = Gate()

    @coalesced(key=lambda channel, trace_id: channel)
    async def read(channel: int, trace_id: str) -> int:
        await gate.wait(channel, trace_id)
        return channel

    groups.track(read.group)
    callers = [asyncio.create_task(read(5, f"t{i}")) for i in range(3)]
    await settle()
    assert len(gate.calls) == 1
    gate.opened.set()
    assert await asyncio.gather(*callers) == [5, 5, 5]


async def test_methods_are_keyed_by_instance_identity(groups):
    gate = Gate()

    class Repo:
        def __eq__(self, other: object) -> bool:
            return True  # equal, yet distinct instances must not share

        __hash__ = object.__hash__

        @coalesced
        async def get(self, key: str) -> int:
            await gate.wait(id(self), key)
            return id(self)

    groups.track(Repo.get.group)
    one, two = Repo(), Repo()
    callers = [asyncio.create_task(r.get("k")) for r in (one, one, two)]
    await settle()
    assert len(gate.calls) == 2
    gate.opened.set()
    assert await asyncio.gather(*callers) == [id(one), id(one), id(two)]


async def test_decorator_uses_the_given_group_and_timeout(groups):
    group = groups()

    @coalesced(group=group, timeout=0.01)
    async def slow() -> None:
        await asyncio.get_running_loop().create_future()

    assert slow.group is group
    with pytest.raises(TimeoutError):
        await slow()
    await settle()


def test_wrapper_keeps_signature_name_and_hints():
    @coalesced
    async def history(channel: int, limit: int = 50) -> list[str]:
        """Docs."""
        return []

    assert history.__name__ == "history" and history.__doc__ == "Docs."
    assert str(inspect.signature(history)) == "(channel: 'int', limit: 'int' = 50) -> 'list[str]'"
    assert isinstance(history.group, SingleFlight)
    assert history.group.name.endswith("history")


def test_group_options_next_to_a_group_are_refused(groups):
    with pytest.raises(TypeError, match="no group options"):
        coalesced(group=groups(), linger=1.0)
