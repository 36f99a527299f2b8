"""The SingleFlight contract, one behaviour per test."""

from __future__ import annotations

import asyncio
import contextvars

import pytest
from prometheus_client import CollectorRegistry

from coalesce import LoopMismatchError, Overloaded, SingleFlight
from tests.conftest import Backend, settle

# Every test runs with the inline first step and under the plain-task fallback.
pytestmark = pytest.mark.usefixtures("first_step")


async def test_concurrent_callers_share_one_call_and_its_result(groups):
    group, backend = groups(), Backend()
    callers = [asyncio.create_task(group.do("k", backend, "v")) for _ in range(50)]
    await settle()
    assert backend.calls == 1 and len(group) == 1
    backend.release()
    assert await asyncio.gather(*callers) == ["v"] * 50


async def test_exception_reaches_every_waiter_and_backend_ran_once(groups):
    group, backend = groups(), Backend()
    callers = [asyncio.create_task(group.do("k", backend)) for _ in range(20)]
    await settle()
    boom = KeyError("boom")
    backend.release(exc=boom)
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert backend.calls == 1
    assert all(r is boom for r in results)


async def test_exception_in_first_step_reaches_only_the_caller(groups):
    group = groups()

    async def fails() -> None:
        raise ValueError("at once")

    with pytest.raises(ValueError, match="at once"):
        await group.do("k", fails)


async def test_cancelling_first_caller_keeps_others_waiting(groups):
    group, backend = groups(), Backend()
    first = asyncio.create_task(group.do("k", backend))
    await settle()
    others = [asyncio.create_task(group.do("k", backend)) for _ in range(5)]
    await settle()
    first.cancel()
    await settle()
    assert first.cancelled()
    assert backend.cancelled == 0 and len(group) == 1
    backend.release()
    assert await asyncio.gather(*others) == ["answer"] * 5
    assert backend.calls == 1


async def test_cancelling_every_caller_cancels_the_backend_call(groups):
    group, backend = groups(), Backend()
    callers = [asyncio.create_task(group.do("k", backend)) for _ in range(3)]
    await settle()
    for caller in callers:
        caller.cancel()
    await settle()
    assert backend.cancelled == 1
    assert len(group) == 0 and group.running == 0


async def test_cancelling_the_only_caller_right_after_handoff_cancels_the_call(groups):
    group = groups()
    cleaned = asyncio.Event()

    async def backend() -> None:
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            cleaned.set()

    caller = asyncio.create_task(group.do("k", backend))
    await asyncio.sleep(0)  # one turn: the first step ran, the owner task has not
    caller.cancel()
    await settle()
    assert cleaned.is_set() and group.running == 0


async def test_caller_after_completion_starts_a_new_flight(groups):
    group, backend = groups(), Backend()
    first = asyncio.create_task(group.do("k", backend, 1))
    await settle()
    backend.release()
    assert await first == 1
    second = asyncio.create_task(group.do("k", backend, 2))
    await settle()
    assert backend.calls == 2
    backend.release()
    assert await second == 2


async def test_forget_lets_later_callers_start_fresh_while_earlier_ones_keep_theirs(groups):
    group, backend = groups(), Backend()
    before = asyncio.create_task(group.do("k", backend, "old"))
    await settle()
    assert group.forget("k") is True
    after = asyncio.create_task(group.do("k", backend, "new"))
    await settle()
    assert backend.calls == 2
    backend.release(1)  # the new flight ends first: it must not disturb the old one
    assert await after == "new"
    assert not before.done()
    backend.release(0)
    assert await before == "old"
    assert group.forget("k") is False


async def test_timeout_fails_only_that_caller(groups):
    group, backend = groups(), Backend()
    patient = asyncio.create_task(group.do("k", backend))
    await settle()
    with pytest.raises(TimeoutError):
        await group.do("k", backend, timeout=0.01)
    assert backend.cancelled == 0
    backend.release()
    assert await patient == "answer"


async def test_timeout_of_every_caller_cancels_the_backend_call(groups):
    group, backend = groups(), Backend()
    with pytest.raises(TimeoutError):
        await group.do("k", backend, timeout=0.01)
    await settle()
    assert backend.cancelled == 1


async def test_max_waiters_sheds_the_caller_past_the_bound(groups):
    group, backend = groups(max_waiters=3), Backend()
    callers = [asyncio.create_task(group.do("k", backend)) for _ in range(3)]
    await settle()
    with pytest.raises(Overloaded):
        await group.do("k", backend)
    backend.release()
    assert await asyncio.gather(*callers) == ["answer"] * 3


async def test_max_inflight_sheds_new_keys_when_the_queue_is_full(groups):
    group, backend = groups(max_inflight=2), Backend()
    running = [asyncio.create_task(group.do(k, backend, k)) for k in "ab"]
    await settle()
    with pytest.raises(Overloaded):
        await group.do("c", backend)
    joined = asyncio.create_task(group.do("a", backend))  # joining is not a new call
    await settle()
    assert backend.calls == 2
    backend.release(0)
    backend.release(1)
    assert await asyncio.gather(*running, joined) == ["a", "b", "a"]


async def test_max_inflight_queues_new_keys_up_to_max_queued(groups):
    group, backend = groups(max_inflight=1, max_queued=1), Backend()
    first = asyncio.create_task(group.do("a", backend, "a"))
    await settle()
    queued = [asyncio.create_task(group.do("b", backend, "b")) for _ in range(3)]
    await settle()
    with pytest.raises(Overloaded):
        await group.do("c", backend)
    assert backend.calls == 1
    backend.release(0)
    await settle()
    assert backend.calls == 2  # the queued key started as soon as a slot freed
    backend.release(1)
    assert await first == "a"
    assert await asyncio.gather(*queued) == ["b"] * 3


async def test_queued_key_whose_callers_all_left_never_starts(groups):
    group, backend = groups(max_inflight=1, max_queued=1), Backend()
    first = asyncio.create_task(group.do("a", backend))
    await settle()
    queued = asyncio.create_task(group.do("b", backend))
    await settle()
    queued.cancel()
    await settle()
    backend.release(0)
    await first
    await settle()
    assert backend.calls == 1


async def test_ten_thousand_callers_make_one_backend_call(groups):
    group, backend = groups(), Backend()
    callers = [asyncio.create_task(group.do("hot", backend, 7)) for _ in range(10_000)]
    await settle()
    backend.release()
    results = await asyncio.gather(*callers)
    assert backend.calls == 1 and results == [7] * 10_000


async def test_backend_timeout_binds_to_the_call_not_the_caller(groups):
    group = groups()

    async def backend() -> str:
        async with asyncio.timeout(0.01):
            await asyncio.get_running_loop().create_future()
        return "unreachable"

    caller_task = asyncio.current_task()
    with pytest.raises(TimeoutError):
        await group.do("k", backend)
    assert caller_task is not None and caller_task.cancelling() == 0


async def test_backend_runs_in_a_copy_of_the_first_callers_context(groups):
    group = groups()
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("caller")

    async def backend() -> str:
        seen = var.get()
        var.set("backend")
        await asyncio.sleep(0)
        return seen + "/" + var.get()

    assert await group.do("k", backend) == "caller/backend"
    assert var.get() == "caller"


async def test_backend_that_is_not_a_coroutine_is_awaited(groups):
    group = groups()

    def backend() -> asyncio.Future[str]:
        fut = asyncio.get_running_loop().create_future()
        fut.get_loop().call_soon(fut.set_result, "future")
        return fut

    assert await group.do("k", backend) == "future"


async def test_nested_calls_on_the_same_group_do_not_deadlock(groups):
    group = groups()

    async def inner() -> str:
        await asyncio.sleep(0)
        return "inner"

    async def outer() -> str:
        return "outer+" + await group.do("inner", inner)

    assert await group.do("outer", outer) == "outer+inner"


async def test_linger_serves_the_finished_result_then_expires(groups):
    group, backend = groups(linger=0.05), Backend()
    first = asyncio.create_task(group.do("k", backend, 1))
    await settle()
    backend.release()
    assert await first == 1
    assert await group.do("k", backend, 2) == 1  # within the window: no new call
    assert backend.calls == 1
    await asyncio.sleep(0.08)
    assert len(group) == 0


async def test_linger_does_not_keep_exceptions(groups):
    group, backend = groups(linger=10), Backend()
    first = asyncio.create_task(group.do("k", backend))
    await settle()
    backend.release(exc=RuntimeError("no"))
    with pytest.raises(RuntimeError):
        await first
    assert len(group) == 0


async def test_use_from_a_second_loop_with_calls_in_flight_is_refused(groups):
    group, backend = groups(), Backend()
    caller = asyncio.create_task(group.do("k", backend))
    await settle()

    def other_loop() -> None:
        with pytest.raises(LoopMismatchError):
            asyncio.run(group.do("x", backend))

    await asyncio.to_thread(other_loop)
    backend.release()
    await caller


def test_idle_group_follows_a_new_loop():
    group: SingleFlight[int] = SingleFlight(metrics=False)

    async def one() -> int:
        await asyncio.sleep(0)
        return 1

    assert asyncio.run(group.do("k", one)) == 1
    assert asyncio.run(group.do("k", one)) == 1


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="max_waiters"):
        SingleFlight(max_waiters=0)
    with pytest.raises(ValueError, match="linger"):
        SingleFlight(linger=-1)


async def test_metrics_count_callers_and_upstream_outcomes(groups):
    registry = CollectorRegistry()
    group, backend = SingleFlight("m", registry=registry), Backend()
    groups.track(group)
    callers = [asyncio.create_task(group.do("k", backend)) for _ in range(4)]
    await settle()
    callers[0].cancel()
    await settle()
    backend.release()
    await asyncio.gather(*callers[1:])

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"group": "m", **labels})

    assert value("coalesce_callers_total", outcome="started") == 1
    assert value("coalesce_callers_total", outcome="joined") == 3
    assert value("coalesce_callers_total", outcome="cancelled") == 1
    assert value("coalesce_upstream_calls_total", outcome="ok") == 1
    assert value("coalesce_flight_waiters_count") == 1
    assert value("coalesce_flight_waiters_sum") == 4
    assert value("coalesce_inflight_keys") == 0
