"""Adversarial tests of the single-flight core: the inline first step, the parked owner
task, cancellation at every moment, odd functions, loops and threads, garbage, metrics,
and the decorator's keys.

Most tests pin a behaviour that an earlier version got wrong. Tests marked
``xfail(strict=True, reason="BUG: ...")`` pin a defect that exists today: they fail now
and must lose the mark once it is fixed. Tests that could leave a broken group behind
build their own groups instead of using the `groups` fixture, so that a defect shows up
as the test's failure, not as a teardown error.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import sys
import threading
import traceback
import types
import warnings
import weakref
from collections.abc import Awaitable, Callable, Generator, Iterator
from typing import Any

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from coalesce import Overloaded, SingleFlight, coalesced
from coalesce.freshness import FreshnessIndex
from tests.conftest import Backend, settle

# Every test runs with the inline first step and under the plain-task fallback.
pytestmark = pytest.mark.usefixtures("first_step")


async def suspends_once(value: Any = "value") -> Any:
    await asyncio.sleep(0)
    return value


async def warm_up(group: SingleFlight[Any]) -> None:
    """Make a call suspend once, so the loop's parked owner task has started and waits."""
    assert await group.do(("warm-up", id(group)), suspends_once, None) is None
    await settle()


def fresh(**options: Any) -> SingleFlight[Any]:
    options.setdefault("metrics", False)
    return SingleFlight(**options)


@contextlib.contextmanager
def abandoned_tasks_collected() -> Iterator[None]:
    """Collect, inside the block's test, what tasks abandoned on a closed loop leave behind.

    A task destroyed while pending has its coroutine closed; whatever that raises
    (`do` leaving its flight touches the closed loop) is reported through
    `sys.unraisablehook`, which pytest would otherwise pin on whichever later test
    happens to trigger the garbage collection.
    """
    previous = sys.unraisablehook
    sys.unraisablehook = lambda _unraisable: None
    try:
        yield
        gc.collect()
    finally:
        sys.unraisablehook = previous


def assert_idle(group: SingleFlight[Any]) -> None:
    assert len(group) == 0, f"{group!r} left keys in flight"
    assert group.running == 0, f"{group!r} left upstream calls running"


# --------------------------------------------------------------------------------------
# The parked owner task and cancellation reaching it
# --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("inline_only")
async def test_cancelling_the_parked_owner_task_does_not_break_later_calls():
    group = fresh()
    await warm_up(group)
    parked = [t for t in asyncio.all_tasks() if t.get_name() == "coalesce-flight"]
    assert parked, "expected the loop's parked owner task"
    for task in parked:  # what a graceful-shutdown sweep over all_tasks() does
        task.cancel()
    await settle()
    assert await group.do("k", suspends_once, 1) == 1
    assert_idle(group)


@pytest.mark.parametrize("owner", ["parked", "just-created"])
async def test_function_that_cancels_its_own_task_ends_like_a_cancelled_task(owner):
    group = fresh()
    if owner == "parked":
        await warm_up(group)
    # else: the group's first call on this loop creates the owner, which has not run yet

    async def cancels_itself() -> str:
        current = asyncio.current_task()
        assert current is not None
        current.cancel()
        await asyncio.sleep(0)
        return "unreachable"

    caller = asyncio.create_task(group.do("k", cancels_itself))
    await settle()
    try:
        # As `await asyncio.create_task(cancels_itself())` would: the awaiting caller
        # sees CancelledError, and nothing is left behind.
        assert caller.done() and caller.cancelled()
        assert_idle(group)
        assert await group.do("k", suspends_once, 2) == 2
    finally:
        caller.cancel()


@pytest.mark.parametrize("owner", ["parked", "just-created"])
@pytest.mark.parametrize("awaits", ["future", "sleep0"])
async def test_timeout_expiring_before_the_owner_picks_up_the_call(owner, awaits, groups):
    """`asyncio.timeout(0)` in the first step cancels the call's owner task.

    A parked owner is cancelled before it has resumed the call (the hand-off window);
    a just-created one right after. Either way the call sees the cancellation where it
    awaits (a future, or the bare yield of `sleep(0)`), its timeout turns it into
    TimeoutError, and every caller gets that; no caller is left cancelling.
    """
    group = groups()
    if owner == "parked":
        await warm_up(group)

    async def deadline_already_past() -> str:
        async with asyncio.timeout(0):
            if awaits == "future":
                await asyncio.get_running_loop().create_future()
            else:
                for _ in range(1_000):  # bare yields, never a future
                    await asyncio.sleep(0)
        return "unreachable"

    first = asyncio.create_task(group.do("k", deadline_already_past))
    others = [asyncio.create_task(group.do("k", deadline_already_past)) for _ in range(3)]
    results = await asyncio.gather(first, *others, return_exceptions=True)
    assert all(isinstance(r, TimeoutError) for r in results)
    assert len({id(r) for r in results[1:]}) == 1  # joiners share one exception object
    for task in (first, *others):
        assert task.cancelling() == 0
    caller = asyncio.current_task()
    assert caller is not None and caller.cancelling() == 0


async def test_cancellation_before_pickup_waits_for_the_awaited_task_like_a_task():
    group = fresh()
    await warm_up(group)
    log: list[str] = []

    async def child() -> None:
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            await asyncio.sleep(0)  # cleanup that needs a loop turn
            log.append("child cleaned up")

    async def fn() -> None:
        task = asyncio.create_task(child())
        try:
            async with asyncio.timeout(0):
                await task
        except TimeoutError:
            log.append(f"timed out, child done={task.done()}")
            raise

    # Reference: the same function as a plain task.
    with pytest.raises(TimeoutError):
        await asyncio.create_task(fn())
    assert log == ["child cleaned up", "timed out, child done=True"]
    log.clear()
    with pytest.raises(TimeoutError):
        await group.do("k", fn)
    await settle()
    assert log == ["child cleaned up", "timed out, child done=True"]


async def test_cancelling_the_first_caller_in_the_handoff_turn_keeps_the_joiners(groups):
    group, backend = groups(), Backend()
    await warm_up(group)
    first = asyncio.create_task(group.do("k", backend))
    joiners = [asyncio.create_task(group.do("k", backend)) for _ in range(3)]
    await asyncio.sleep(0)  # every caller ran its `do` in this one turn
    first.cancel()
    await settle()
    assert first.cancelled() and backend.cancelled == 0
    backend.release()
    assert await asyncio.gather(*joiners) == ["answer"] * 3


async def test_last_caller_leaving_in_the_turn_the_result_lands(groups):
    """Result and cancellation in one turn: whichever runs first wins, nothing leaks."""
    group, backend = groups(), Backend()
    caller = asyncio.create_task(group.do("k", backend))
    await settle()
    caller.cancel()  # the caller leaves first: the call is cancelled...
    backend.release()  # ...even though its gate opened in the same turn
    await settle()
    assert caller.cancelled() and backend.cancelled == 1
    second = asyncio.create_task(group.do("k", backend, "again"))
    await settle()
    backend.release()
    assert await second == "again"


# --------------------------------------------------------------------------------------
# max_inflight, the queue, and what runs the queued calls
# --------------------------------------------------------------------------------------


async def test_queued_key_abandoned_in_the_turn_its_slot_frees_releases_the_slot():
    group = fresh(max_inflight=1, max_queued=1)
    gate = asyncio.get_running_loop().create_future()

    async def first() -> str:
        await gate
        return "first"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        running = asyncio.create_task(group.do("a", first))
        await settle()
        queued = asyncio.create_task(group.do("b", suspends_once))
        await settle()
        gate.set_result(None)  # the owner of "a" resumes first in the next turn and
        queued.cancel()  # starts "b"; right after it, the only caller of "b" leaves
        assert await running == "first"
        await settle()
        assert queued.cancelled()
        del queued  # its traceback holds the flight, hence the dropped call
        gc.collect()
    leaked = group.running
    later = asyncio.create_task(group.do("c", suspends_once, "c"))
    await settle()
    later.cancel()  # a no-op once it is done
    await settle()
    assert not [w for w in caught if "never awaited" in str(w.message)]
    assert leaked == 0 and len(group) == 0
    assert not later.cancelled() and later.result() == "c"  # the slot was free again


async def test_queued_call_runs_in_its_first_callers_context():
    group = fresh(max_inflight=1, max_queued=1)
    tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="-")
    gate = asyncio.get_running_loop().create_future()
    seen: dict[str, str] = {}

    async def read(key: str) -> str:
        seen[key] = tenant.get()
        if key == "a":
            await gate
        else:
            await asyncio.sleep(0)
        return key

    async def as_tenant(name: str, key: str) -> str:
        tenant.set(name)
        return await group.do(key, read, key)

    assert await asyncio.create_task(as_tenant("zed", "warm")) == "warm"
    alice = asyncio.create_task(as_tenant("alice", "a"))
    await settle()
    bob = asyncio.create_task(as_tenant("bob", "b"))  # queued behind "a"
    await settle()
    gate.set_result(None)
    assert await asyncio.gather(alice, bob) == ["a", "b"]
    assert seen == {"warm": "zed", "a": "alice", "b": "bob"}


async def test_finished_call_keeps_nothing_of_its_callers_context_alive():
    group = fresh()
    request: contextvars.ContextVar[object] = contextvars.ContextVar("request")

    class Request:
        pass

    async def handle() -> weakref.ref[Request]:
        obj = Request()
        request.set(obj)
        assert await group.do("k", suspends_once, 1) == 1
        return weakref.ref(obj)

    ref = await asyncio.create_task(handle())
    await settle()
    gc.collect()
    assert ref() is None


def test_many_queued_keys_whose_function_raises_at_once_all_get_their_error():
    # A private loop: the failure leaves tasks that can never be woken, which would hang
    # the teardown of a pytest-asyncio loop.
    group = fresh(max_inflight=1, max_queued=5000)
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _loop, _context: None)

    def refuses(i: int) -> Awaitable[int]:
        raise ValueError(i)  # e.g. a driver refusing a request before returning a future

    async def scenario() -> list[bool]:
        gate = asyncio.get_running_loop().create_future()

        async def first() -> str:
            await gate
            return "first"

        head = asyncio.create_task(group.do("head", first))
        await settle()
        queued = [asyncio.create_task(group.do(i, refuses, i)) for i in range(1500)]
        await settle()
        gate.set_result(None)
        await settle(20)
        return [
            t.done() and not t.cancelled() and isinstance(t.exception(), ValueError)
            for t in queued
        ] + [head.done()]

    with abandoned_tasks_collected():
        try:
            outcomes = loop.run_until_complete(scenario())
        finally:
            loop.close()
            del loop
    assert all(outcomes)
    assert group.running == 0


async def test_calls_nested_in_a_first_step_respect_max_inflight():
    group = fresh(max_inflight=1)
    gate = asyncio.get_running_loop().create_future()

    async def inner() -> str:
        await gate
        return "inner"

    async def outer() -> str:
        return "outer+" + await group.do("inner", inner)

    caller = asyncio.create_task(group.do("outer", outer))
    await settle()
    peak = group.running
    gate.set_result(None)
    with pytest.raises(Overloaded):  # the one upstream slot is the outer call's
        await caller
    assert peak <= 1


async def test_upstream_slot_is_held_until_a_cancelled_call_has_cleaned_up(groups):
    group = groups(max_inflight=1)
    cleanup = asyncio.get_running_loop().create_future()

    async def slow_cleanup() -> None:
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            await cleanup

    caller = asyncio.create_task(group.do("k", slow_cleanup))
    await settle()
    caller.cancel()
    await settle()
    assert len(group) == 0 and group.running == 1  # key gone at once, the call not yet
    with pytest.raises(Overloaded):
        await group.do("other", suspends_once)
    cleanup.set_result(None)
    await settle()
    assert group.running == 0


async def test_caller_that_timed_out_frees_its_max_waiters_place(groups):
    group, backend = groups(max_waiters=2), Backend()
    first = asyncio.create_task(group.do("k", backend))
    await settle()
    for _ in range(3):  # each one takes the second place, then gives it back
        with pytest.raises(TimeoutError):
            await group.do("k", backend, timeout=0)
    joiner = asyncio.create_task(group.do("k", backend))
    await settle()
    with pytest.raises(Overloaded):
        await group.do("k", backend)
    backend.release()
    assert await asyncio.gather(first, joiner) == ["answer", "answer"]
    assert backend.calls == 1


async def test_forgetting_a_queued_key_queues_a_fresh_call_behind_it(groups):
    group, backend = groups(max_inflight=1, max_queued=2), Backend()
    running = asyncio.create_task(group.do("a", backend, "a"))
    await settle()
    before = asyncio.create_task(group.do("b", backend, "old b"))
    await settle()
    assert group.forget("b")
    after = asyncio.create_task(group.do("b", backend, "new b"))
    await settle()
    assert backend.calls == 1
    for index in range(3):
        backend.release(index)
        await settle()
    assert await asyncio.gather(running, before, after) == ["a", "old b", "new b"]


# --------------------------------------------------------------------------------------
# Functions that do odd things
# --------------------------------------------------------------------------------------


async def test_function_swallowing_cancellation_cannot_be_joined_after_everyone_left(groups):
    group = groups()
    finish = asyncio.get_running_loop().create_future()
    calls = 0

    async def stubborn() -> str:
        nonlocal calls
        calls += 1
        number = calls
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            await finish  # refuses to stop at once
        return f"call {number}"

    leaving = asyncio.create_task(group.do("k", stubborn))
    await settle()
    leaving.cancel()
    await settle()
    assert leaving.cancelled() and "k" not in group and group.running == 1
    newcomer = asyncio.create_task(group.do("k", stubborn))  # must not get call 1's result
    await settle()
    assert calls == 2 and group.running == 2
    finish.set_result(None)
    await settle()
    assert group.running == 1 and not newcomer.done()
    newcomer.cancel()
    await settle()


async def test_task_group_failure_in_the_function_reaches_every_caller_uncancelled(groups):
    group = groups()
    await warm_up(group)

    async def fails_at_once() -> None:
        raise KeyError("child")

    async def fn() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(fails_at_once())
            tg.create_task(asyncio.get_running_loop().create_future())

    callers = [asyncio.create_task(group.do("k", fn)) for _ in range(3)]
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, ExceptionGroup) for r in results)
    assert all(c.cancelling() == 0 and not c.cancelled() for c in callers)


async def test_shield_inside_the_function_survives_every_caller_leaving(groups):
    group = groups()
    inner_done = asyncio.get_running_loop().create_future()
    release = asyncio.get_running_loop().create_future()

    async def protected() -> None:
        await release
        inner_done.set_result("finished")

    async def fn() -> None:
        await asyncio.shield(protected())

    callers = [asyncio.create_task(group.do("k", fn)) for _ in range(2)]
    await settle()
    for caller in callers:
        caller.cancel()
    await settle()
    assert group.running == 0
    release.set_result(None)
    assert await inner_done == "finished"


async def test_wait_for_inside_the_function_times_out_for_every_caller(groups):
    group = groups()

    async def fn() -> None:
        await asyncio.wait_for(asyncio.get_running_loop().create_future(), 0.001)

    results = await asyncio.gather(
        *(group.do("k", fn) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, TimeoutError) for r in results)


async def test_function_raising_cancelled_error_itself_cancels_every_waiter(groups):
    """Like awaiting a task that raised CancelledError: every waiter sees CancelledError."""
    group = groups()
    backend = Backend()

    async def fn() -> None:
        await backend()
        raise asyncio.CancelledError("upstream gave up")

    callers = [asyncio.create_task(group.do("k", fn)) for _ in range(3)]
    await settle()
    backend.release()
    await settle()
    assert all(c.cancelled() for c in callers)


@pytest.mark.usefixtures("inline_only")
async def test_keyboard_interrupt_in_first_step_restores_the_callers_task(groups):
    group = groups()
    await warm_up(group)  # so that the first step runs inline, in this task's `do`
    caller = asyncio.current_task()

    async def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await group.do("k", interrupted)
    assert asyncio.current_task() is caller
    seen: list[asyncio.Task[Any] | None] = []

    async def who() -> None:
        seen.append(asyncio.current_task())

    await group.do("k", who)
    assert seen[0] is not None and seen[0] is not caller  # the inline step works again


class Abort(BaseException):
    """A BaseException that is neither KeyboardInterrupt nor SystemExit."""


async def _abort_after_suspension(group: SingleFlight[Any]) -> list[BaseException]:
    """Three callers of a call that raises `Abort` after suspending; their outcomes."""
    backend = Backend()

    async def fn() -> None:
        await backend()
        raise Abort

    callers = [asyncio.create_task(group.do("k", fn)) for _ in range(3)]
    await settle()
    backend.release()
    results = await asyncio.gather(*callers, return_exceptions=True)
    return [r for r in results if isinstance(r, BaseException)]


async def _logged_while(scenario: Awaitable[Any]) -> tuple[Any, list[str]]:
    """Run `scenario` as a task, collect garbage, return its result and what asyncio logged."""
    logged: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: logged.append(ctx["message"]))
    try:
        result = await asyncio.create_task(scenario)  # type: ignore[arg-type]
        await settle()
        gc.collect()
        return result, logged
    finally:
        loop.set_exception_handler(None)


async def test_base_exception_after_suspension_reaches_every_caller_as_one_object(groups):
    results, _ = await _logged_while(_abort_after_suspension(groups()))
    assert len(results) == 3 and isinstance(results[0], Abort)
    assert all(r is results[0] for r in results)


async def test_base_exception_after_suspension_is_not_logged_as_never_retrieved():
    results, logged = await _logged_while(_abort_after_suspension(fresh()))
    del results
    gc.collect()
    assert logged == []


async def test_current_task_is_the_calls_owner_throughout_and_the_callers_after(groups):
    group = groups()
    seen: list[asyncio.Task[Any] | None] = []

    async def fn() -> None:
        seen.append(asyncio.current_task())
        await asyncio.sleep(0)
        seen.append(asyncio.current_task())
        await asyncio.get_running_loop().create_future()

    async def caller() -> None:
        task = asyncio.create_task(group.do("k", fn))
        await settle()
        task.cancel()
        await settle()

    async def direct() -> None:
        me = asyncio.current_task()
        with pytest.raises(TimeoutError):
            await group.do("k2", fn, timeout=0)
        assert asyncio.current_task() is me

    await caller()
    await direct()
    assert seen[0] is seen[1] and seen[2] is seen[3]
    assert seen[0] is not None and seen[0] is not seen[2]  # one owner task per call
    assert all(s is not asyncio.current_task() for s in seen)


async def test_generator_based_coroutines_awaitables_and_futures_are_coalesced(groups):
    group = groups()
    calls: list[str] = []
    gate = asyncio.get_running_loop().create_future()

    @types.coroutine
    def generator_based() -> Generator[Any, Any, str]:
        calls.append("generator")
        yield from gate.__await__()
        return "generator"

    class Awaitable_:
        def __await__(self) -> Generator[Any, Any, str]:
            yield from gate.__await__()
            return "awaitable"

    def awaitable() -> Awaitable_:
        calls.append("awaitable")
        return Awaitable_()

    def future() -> asyncio.Future[str]:
        calls.append("future")
        fut = asyncio.get_running_loop().create_future()
        gate.add_done_callback(lambda _: fut.set_result("future"))
        return fut

    fns: list[Callable[[], Any]] = [generator_based, awaitable, future]
    callers = [asyncio.create_task(group.do(fn.__name__, fn)) for fn in fns for _ in range(3)]
    await settle()
    assert sorted(calls) == ["awaitable", "future", "generator"]
    gate.set_result(None)
    results = await asyncio.gather(*callers)
    assert results == [n for n in ("generator", "awaitable", "future") for _ in range(3)]


async def test_same_key_nested_in_a_first_step_on_another_group_completes(groups):
    outer_group, inner_group = groups(), groups()

    async def inner() -> str:
        await asyncio.sleep(0)
        return "inner"

    async def outer() -> str:
        return "outer+" + await inner_group.do("k", inner)

    results = await asyncio.gather(*(outer_group.do("k", outer) for _ in range(3)))
    assert results == ["outer+inner"] * 3


@pytest.mark.parametrize("recurses", ["after-suspending", "in-first-step"])
async def test_recursive_call_for_the_same_key_fails_instead_of_hanging(recurses):
    group = fresh()

    async def recursive(depth: int) -> int:
        if recurses == "after-suspending":
            await asyncio.sleep(0)
        if depth < 2:
            return await group.do("same", recursive, depth + 1)
        await asyncio.sleep(0)
        return depth

    caller = asyncio.create_task(group.do("same", recursive, 0))
    await settle(20)
    try:
        assert caller.done(), "the recursive call hangs"
        assert isinstance(caller.exception(), RuntimeError)
    finally:
        caller.cancel()
        await settle()


async def test_calls_awaiting_each_others_keys_fail_instead_of_hanging():
    group = fresh()

    async def a() -> str:
        await asyncio.sleep(0)
        return "a+" + await group.do("B", b)

    async def b() -> str:
        await asyncio.sleep(0)
        return "b+" + await group.do("A", a)

    caller = asyncio.create_task(group.do("A", a))
    await settle(20)
    try:
        assert caller.done(), "the cycle A -> B -> A hangs"
        assert isinstance(caller.exception(), RuntimeError)
    finally:
        caller.cancel()
        await settle()


async def test_cancelling_a_finished_calls_task_leaves_later_calls_alone():
    group = fresh()
    await warm_up(group)
    loop = asyncio.get_running_loop()

    async def remembers_its_task() -> asyncio.Task[Any] | None:
        task = asyncio.current_task()
        await asyncio.sleep(0)
        return task

    finished_calls_task = await group.do("early", remembers_its_task)
    assert finished_calls_task is not None
    # Later calls, one at a time, until one runs in that same task (if any ever does).
    seen: list[asyncio.Task[Any] | None] = []
    gates: list[asyncio.Future[str]] = []

    async def later() -> str:
        seen.append(asyncio.current_task())
        gates.append(loop.create_future())
        return await gates[-1]

    for i in range(20):
        call = asyncio.create_task(group.do(("later", i), later))
        await settle()
        if seen[-1] is finished_calls_task:
            finished_calls_task.cancel()  # aimed at the early call, long over
            await settle()
            assert not gates[-1].cancelled(), f"the cancel reached later call {i}"
        gates[-1].set_result(f"answer {i}")
        assert await call == f"answer {i}"


# --------------------------------------------------------------------------------------
# Event loops and threads
# --------------------------------------------------------------------------------------


def test_one_group_alternates_between_uvloop_and_the_default_loop():
    group = fresh()
    backend = Backend()

    async def scenario(label: str) -> list[Any]:
        await warm_up(group)
        first = asyncio.create_task(group.do("k", backend, label))
        joiner = asyncio.create_task(group.do("k", backend, label))
        await settle()
        first.cancel()  # the starter leaves; the joiner keeps the call
        await settle()
        backend.release()
        quick = await group.do("sync", asyncio.sleep, 0, label)
        return [await joiner, quick, first.cancelled()]

    for factory in (uvloop.new_event_loop, asyncio.new_event_loop, uvloop.new_event_loop):
        with asyncio.Runner(loop_factory=factory) as runner:
            label = type(runner.get_loop()).__module__
            assert runner.run(scenario(label)) == [label, label, True]
        assert_idle(group)
    assert backend.calls == 3


def test_loops_in_several_threads_at_once_do_not_disturb_each_other():
    bound = threading.Lock()  # first uses of new loops one at a time, as in older versions
    start = threading.Barrier(4)
    results: list[Any] = []

    def worker(n: int) -> None:
        async def run() -> list[Any]:
            group = fresh()
            with bound:
                await warm_up(group)
            start.wait(5)
            backend = Backend()
            callers = [
                asyncio.create_task(group.do(k % 5, backend, (n, k % 5))) for k in range(50)
            ]
            await settle()
            for i in range(len(backend.gates)):
                backend.release(i)
                await asyncio.sleep(0)
            answers = await asyncio.gather(*callers)
            assert_idle(group)
            return [backend.calls, answers == [(n, k % 5) for k in range(50)]]

        try:
            results.append(asyncio.run(run()))
        except BaseException as exc:  # surfaced by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [[5, True]] * 4


class _InterleavingLoop(asyncio.SelectorEventLoop):
    """A loop whose `is_closed`, asked from another thread, first lets `interleave` run.

    `_runner_for` asks every known loop `is_closed()` while it walks the runner table,
    so this puts another thread's first use of a new loop in the middle of that walk.
    """

    interleave: Callable[[], None] | None = None

    def is_closed(self) -> bool:
        interleave, type(self).interleave = type(self).interleave, None
        if interleave is not None and threading.current_thread() is not threading.main_thread():
            interleave()
        return super().is_closed()


@pytest.mark.usefixtures("inline_only")  # the table of parked owners, one per loop
def test_binding_new_loops_from_two_threads_at_once():
    outcomes: dict[str, Any] = {}

    def bind_new_loop(name: str) -> None:
        try:
            outcomes[name] = asyncio.run(fresh().do(name, suspends_once, name))
        except BaseException as exc:
            outcomes[name] = exc

    second = threading.Thread(target=bind_new_loop, args=("second",))

    def second_thread() -> None:
        second.start()
        second.join(1)  # with a lock in _runner_for it waits for the first thread

    with asyncio.Runner(loop_factory=_InterleavingLoop) as runner:
        runner.run(warm_up(fresh()))  # the interleaving loop is now in the runner table
        _InterleavingLoop.interleave = second_thread
        first = threading.Thread(target=bind_new_loop, args=("first",))
        first.start()
        first.join(5)
        second.join(5)
        _InterleavingLoop.interleave = None
    assert outcomes == {"first": "first", "second": "second"}


def test_group_reused_after_its_loop_closed_with_a_call_in_flight():
    group, backend = fresh(), Backend()

    async def again() -> Any:
        task = asyncio.create_task(group.do("k", backend, "new"))
        await settle()
        backend.release()
        return await task

    with abandoned_tasks_collected():
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(lambda _loop, _context: None)  # the abandoned task
        caller = loop.create_task(group.do("k", backend, "old"))
        loop.run_until_complete(settle())
        assert len(group) == 1 and group.running == 1
        loop.close()
        del caller, loop
        assert asyncio.run(again()) == "new"  # the closed loop's call is dropped
    assert backend.calls == 2
    assert_idle(group)


def test_closing_a_loop_by_hand_logs_no_pending_task_of_the_group():
    group = fresh()
    logged: list[str] = []
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _loop, ctx: logged.append(ctx["message"]))
    assert loop.run_until_complete(group.do("k", suspends_once, 1)) == 1
    loop.close()
    del loop
    assert asyncio.run(group.do("k", suspends_once, 2)) == 2  # drops the old loop's runner
    gc.collect()
    assert logged == []


# --------------------------------------------------------------------------------------
# Garbage and warnings
# --------------------------------------------------------------------------------------


def _live(kind: type) -> int:
    return sum(1 for obj in gc.get_objects() if type(obj) is kind)


async def test_many_distinct_keys_leave_no_tasks_futures_or_keys_behind(groups):
    group = groups()
    await warm_up(group)
    gc.collect()
    tasks_before, futures_before = _live(asyncio.Task), _live(asyncio.Future)
    for batch in range(10):
        callers = [
            asyncio.create_task(group.do((batch, k), suspends_once, k)) for k in range(2_000)
        ]
        assert await asyncio.gather(*callers) == list(range(2_000))
        del callers
    await settle()
    gc.collect()
    assert len(group) == 0 and group.running == 0
    assert _live(asyncio.Task) - tasks_before < 10
    assert _live(asyncio.Future) - futures_before < 10


@pytest.mark.parametrize("path", ["sync", "suspends", "raises", "queued", "not-a-coroutine"])
async def test_finished_call_keeps_neither_arguments_nor_result_alive(path, groups):
    group = groups(max_inflight=1, max_queued=1) if path == "queued" else groups()
    refs: dict[str, weakref.ref[Any]] = {}

    class Thing:
        pass

    class Failure(Exception):
        pass

    async def fn(arg: Thing) -> Thing:
        if path != "sync":
            await asyncio.sleep(0)
        result = Thing()
        refs["result"] = weakref.ref(result)
        if path == "raises":
            raise Failure(arg)
        return result

    def not_a_coroutine(arg: Thing) -> Awaitable[Thing]:
        return asyncio.ensure_future(fn(arg))

    async def call() -> None:
        arg = Thing()
        refs["arg"] = weakref.ref(arg)
        target = not_a_coroutine if path == "not-a-coroutine" else fn
        with contextlib.suppress(Failure):
            await group.do("k", target, arg)

    if path == "queued":
        backend = Backend()
        blocker = asyncio.create_task(group.do("blocker", backend))
        await settle()
        queued = asyncio.create_task(call())
        await settle()
        backend.release()
        await asyncio.gather(blocker, queued)
        del blocker, queued
    else:
        await call()
    await settle()
    if path == "raises":
        gc.collect()  # an exception and the frames of its traceback form a cycle
    assert {name: ref() for name, ref in refs.items()} == {"arg": None, "result": None}


async def test_shared_exception_traceback_does_not_grow_with_the_callers(groups):
    group, backend = groups(), Backend()
    callers = [asyncio.create_task(group.do("k", backend)) for _ in range(1_000)]
    await settle()
    backend.release(exc=LookupError("shared"))
    results = await asyncio.gather(*callers, return_exceptions=True)
    shared = results[0]
    assert all(r is shared for r in results)
    assert len(traceback.extract_tb(shared.__traceback__)) < 20


async def test_callers_that_leave_a_long_flight_do_not_pile_up():
    group, backend = fresh(max_waiters=2), Backend()
    first = asyncio.create_task(group.do("k", backend))
    await settle()
    gc.collect()
    futures_before = _live(asyncio.Future)
    for _ in range(500):
        with pytest.raises(TimeoutError):
            await group.do("k", backend, timeout=0)
    gc.collect()
    grown = _live(asyncio.Future) - futures_before
    backend.release()
    await first
    assert grown < 50


def test_mixed_workload_in_debug_mode_warns_and_logs_nothing():
    logged: list[str] = []

    async def workload() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, ctx: logged.append(ctx["message"])
        )
        group, backend = fresh(max_inflight=2, max_queued=2, linger=0.001), Backend()

        async def fails() -> None:
            await asyncio.sleep(0)
            raise LookupError

        assert await group.do("sync", asyncio.sleep, 0, "s") == "s"
        ok = [asyncio.create_task(group.do("ok", backend, "ok")) for _ in range(3)]
        gone = [asyncio.create_task(group.do("gone", backend)) for _ in range(2)]
        queued = asyncio.create_task(group.do("queued", backend, "q"))
        timed = asyncio.create_task(group.do("ok", backend, timeout=0))
        await settle()
        ok[0].cancel()
        for task in gone:
            task.cancel()
        await settle()
        backend.release(0)
        await settle()
        backend.release(-1)
        with pytest.raises(LookupError):
            await group.do("fails", fails)
        assert await asyncio.gather(*ok[1:], queued) == ["ok", "ok", "q"]
        with pytest.raises(TimeoutError):
            await timed
        group.forget_all()  # the lingering results
        assert_idle(group)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with asyncio.Runner(debug=True) as runner:
            runner.run(workload())
        gc.collect()
    assert logged == []


# --------------------------------------------------------------------------------------
# linger, freshness
# --------------------------------------------------------------------------------------


async def test_linger_applies_to_calls_that_finish_in_their_first_step():
    group = fresh(linger=10)
    calls = 0

    async def instant() -> int:
        nonlocal calls
        calls += 1
        return calls

    try:
        assert await group.do("k", instant) == 1
        assert await group.do("k", instant) == 1  # within the linger window
    finally:
        group.forget_all()


async def test_write_forgets_a_lingering_read():
    group = fresh(linger=10)
    try:
        index = FreshnessIndex(group)
    except ValueError:
        return  # refusing a lingering group is a fix too
    row = ["before the write"]

    async def read() -> str:
        with index.reading("k", "table", b"p"):
            await asyncio.sleep(0)
            return row[0]

    try:
        assert await group.do("k", read) == "before the write"
        row[0] = "after the write"
        index.written("table", b"p")
        assert await group.do("k", read) == "after the write"
    finally:
        group.forget_all()


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"group": "adv", **labels})


async def test_metrics_of_first_step_outcomes_and_abandoned_calls(groups):
    registry = CollectorRegistry()
    group = SingleFlight("adv", registry=registry, max_inflight=1, max_queued=1)
    groups.track(group)
    backend = Backend()

    async def instant() -> int:
        return 1

    async def fails_at_once() -> None:
        raise LookupError

    assert await group.do("a", instant) == 1
    with pytest.raises(LookupError):
        await group.do("b", fails_at_once)
    abandoned = [asyncio.create_task(group.do("c", backend)) for _ in range(2)]
    await settle()
    queued = asyncio.create_task(group.do("d", backend))  # never starts: its caller leaves
    await settle()
    with pytest.raises(Overloaded):
        await group.do("e", backend)
    for task in (*abandoned, queued):
        task.cancel()
    await settle()

    assert _sample(registry, "coalesce_callers_total", outcome="started") == 4
    assert _sample(registry, "coalesce_callers_total", outcome="joined") == 1
    assert _sample(registry, "coalesce_callers_total", outcome="shed") == 1
    assert _sample(registry, "coalesce_callers_total", outcome="cancelled") == 3
    assert _sample(registry, "coalesce_upstream_calls_total", outcome="ok") == 1
    assert _sample(registry, "coalesce_upstream_calls_total", outcome="error") == 1
    assert _sample(registry, "coalesce_upstream_calls_total", outcome="cancelled") == 1
    assert _sample(registry, "coalesce_upstream_duration_seconds_count") == 3
    assert _sample(registry, "coalesce_flight_waiters_bucket", le="1.0") == 2
    assert _sample(registry, "coalesce_flight_waiters_bucket", le="2.0") == 3
    assert _sample(registry, "coalesce_inflight_keys") == 0
    assert backend.calls == 1


@pytest.mark.parametrize("leaves_by", ["cancel", "timeout"])
async def test_callers_leaving_in_the_turn_the_flight_ends_are_counted(leaves_by):
    registry = CollectorRegistry()
    group, backend = SingleFlight("adv", registry=registry), Backend()
    patient = asyncio.create_task(group.do("k", backend))
    await settle()
    if leaves_by == "cancel":
        leaving = asyncio.create_task(group.do("k", backend))
        await settle()
        backend.release()  # the owner resumes first in the next turn...
        leaving.cancel()  # ...the leaving caller's wakeup comes right after it
        expected: type[BaseException] = asyncio.CancelledError
        outcome = "cancelled"
    else:
        leaving = asyncio.create_task(group.do("k", backend, timeout=0))
        await asyncio.sleep(0)  # the timer fires next turn; the result lands just after
        asyncio.get_running_loop().call_soon(backend.release)
        expected, outcome = TimeoutError, "timeout"
    assert await patient == "answer"
    with pytest.raises(expected):
        await leaving
    assert _sample(registry, "coalesce_callers_total", outcome=outcome) == 1


# --------------------------------------------------------------------------------------
# One shared future per flight: a caller's cancellation wakes the others, who go on
# --------------------------------------------------------------------------------------


async def test_cancelling_one_caller_of_a_herd_leaves_the_others_waiting_uncancelled(groups):
    group, backend = groups(), Backend()
    callers = [asyncio.create_task(group.do("k", backend)) for _ in range(50)]
    await settle()
    callers[10].cancel()
    await settle()
    assert callers[10].cancelled()
    others = callers[:10] + callers[11:]
    assert not any(c.done() for c in others)
    assert all(c.cancelling() == 0 for c in others)
    late = [asyncio.create_task(group.do("k", backend)) for _ in range(5)]
    await settle()
    assert backend.calls == 1 and backend.cancelled == 0
    backend.release()
    assert await asyncio.gather(*others, *late) == ["answer"] * 54


async def test_each_of_several_cancelled_callers_leaves_alone(groups):
    group, backend = groups(), Backend()
    callers = [asyncio.create_task(group.do("k", backend)) for _ in range(20)]
    await settle()
    for turn, caller in enumerate(callers[:5]):  # one storm, then private futures
        caller.cancel()
        await settle()
        assert caller.cancelled()
        assert not any(c.done() for c in callers[turn + 1 :])
    backend.release()
    assert await asyncio.gather(*callers[5:]) == ["answer"] * 15


async def test_callers_of_a_herd_leaving_one_turn_at_a_time_take_the_call_down_with_the_last(
    groups,
):
    # The first leaves through the shared future, the rest from the private futures
    # the survivors moved to: the last one to go must still cancel the call.
    group, backend = groups(), Backend()
    callers = [asyncio.create_task(group.do("k", backend)) for _ in range(5)]
    await settle()
    for turn, caller in enumerate(callers):
        caller.cancel()
        await settle()
        assert caller.cancelled()
        assert all(c.cancelling() == 0 and not c.done() for c in callers[turn + 1 :])
        assert backend.cancelled == (turn == len(callers) - 1)
    assert backend.calls == 1 and len(group) == 0 and group.running == 0


async def test_caller_already_cancelling_when_it_joins_is_not_taken_for_the_cancelled_one(
    groups,
):
    group, backend = groups(), Backend()
    first = asyncio.create_task(group.do("k", backend))
    await settle()

    async def joins_while_cancelling() -> Any:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)  # swallowed: the request stays counted
        assert task.cancelling() == 1
        return await group.do("k", backend)

    patient = asyncio.create_task(joins_while_cancelling())
    await settle()
    first.cancel()  # wakes every caller on the shared future
    await settle()
    assert first.cancelled() and not patient.done()
    backend.release()
    assert await patient == "answer"


@pytest.mark.parametrize("outcome", ["result", "error"])
@pytest.mark.parametrize("first", ["cancel", "outcome"])
async def test_outcome_landing_in_the_turn_a_caller_is_cancelled_reaches_the_others(
    first, outcome, groups
):
    group, backend = groups(), Backend()
    callers = [asyncio.create_task(group.do("k", backend)) for _ in range(4)]
    await settle()
    boom = LookupError("shared")
    # The cancellation wakes every caller; the outcome lands before or after they run.
    if first == "cancel":
        callers[0].cancel()
    backend.release(exc=boom if outcome == "error" else None)
    if first == "outcome":
        callers[0].cancel()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == (["answer"] * 3 if outcome == "result" else [boom] * 3)
    if outcome == "error":
        assert all(r is boom for r in results[1:])
        assert len(traceback.extract_tb(boom.__traceback__)) < 10


async def test_caller_with_a_timeout_leaving_does_not_wake_the_herd(groups):
    group, backend = groups(), Backend()
    herd = [asyncio.create_task(group.do("k", backend)) for _ in range(10)]
    await settle()
    with pytest.raises(TimeoutError):
        await group.do("k", backend, timeout=0)
    assert not any(c.done() for c in herd)
    backend.release()
    assert await asyncio.gather(*herd) == ["answer"] * 10


# --------------------------------------------------------------------------------------
# @coalesced keys
# --------------------------------------------------------------------------------------


class Calls:
    """Counts calls of a decorated function and holds them until released."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []
        self.gate = asyncio.Event()

    async def hold(self, *args: Any) -> None:
        self.seen.append(args)
        await self.gate.wait()


async def _share(calls: Calls, *coros: Awaitable[Any]) -> list[Any]:
    tasks = [asyncio.create_task(c) for c in coros]  # type: ignore[arg-type]
    await settle()
    calls.gate.set()
    return await asyncio.gather(*tasks)


async def test_keyword_order_and_defaults_do_not_change_the_key(groups):
    calls = Calls()

    @coalesced(metrics=False)
    async def search(table: str, *, limit: int = 10, **filters: Any) -> tuple[Any, ...]:
        await calls.hold(table, limit, filters)
        return table, limit, tuple(sorted(filters.items()))

    groups.track(search.group)
    results = await _share(
        calls,
        search("t", a=1, b=2),
        search("t", b=2, a=1),
        search("t", limit=10, b=2, a=1),
        search(b=2, table="t", a=1),
    )
    assert len(calls.seen) == 1
    assert all(r == ("t", 10, (("a", 1), ("b", 2))) for r in results)


async def test_unhashable_value_nested_in_a_tuple_is_named(groups):
    @coalesced(metrics=False)
    async def by_ids(channel: int, ids: tuple[Any, ...]) -> int:
        return len(ids)

    groups.track(by_ids.group)
    with pytest.raises(TypeError, match="'ids' is an unhashable tuple"):
        await by_ids(1, (1, [2]))


async def test_classmethods_are_keyed_by_class_and_staticmethods_by_arguments(groups):
    calls = Calls()

    class Base:
        @classmethod
        @coalesced(metrics=False)
        async def load(cls, key: str) -> str:
            await calls.hold(cls.__name__, key)
            return f"{cls.__name__}:{key}"

        @staticmethod
        @coalesced(metrics=False)
        async def ping(key: str) -> str:
            await calls.hold("ping", key)
            return key

    class Sub(Base):
        pass

    groups.track(Base.__dict__["load"].__func__.group)
    groups.track(Base.ping.group)
    results = await _share(
        calls, Base.load("k"), Base.load("k"), Sub.load("k"), Base.ping("p"), Sub().ping("p")
    )
    assert sorted(calls.seen) == [("Base", "k"), ("Sub", "k"), ("ping", "p")]
    assert results == ["Base:k", "Base:k", "Sub:k", "p", "p"]


async def test_instance_keyed_by_identity_is_released_after_its_call(groups):
    class Repo:
        @coalesced(metrics=False)
        async def get(self, key: str) -> str:
            await asyncio.sleep(0)
            return key

    groups.track(Repo.get.group)
    repo = Repo()
    ref = weakref.ref(repo)
    assert await repo.get("k") == "k"
    del repo
    await settle()
    assert ref() is None


async def test_function_with_a_timeout_parameter_accepts_it_by_keyword():
    @coalesced(metrics=False)
    async def fetch(url: str, timeout: float = 10.0) -> str:
        return f"{url} within {timeout}"

    assert await fetch("u", timeout=3) == "u within 3"


async def test_dict_argument_never_shares_a_call_with_a_tuple_of_its_items():
    calls = Calls()

    @coalesced(metrics=False)
    async def query(where: Any, *, consistency: str = "ONE") -> str:
        await calls.hold(where)
        return type(where).__name__

    tasks = [asyncio.create_task(query(w)) for w in ({"id": 1}, (("id", 1),))]
    await settle()
    calls.gate.set()
    as_dict, as_tuple = await asyncio.gather(*tasks, return_exceptions=True)
    assert as_tuple == "tuple"
    # Either refused like any unhashable argument, or frozen into a key of its own.
    assert as_dict == "dict" or (
        isinstance(as_dict, TypeError) and "'where'" in str(as_dict)
    ), as_dict


async def test_positional_only_argument_by_keyword_fails_even_while_a_call_runs():
    calls = Calls()

    @coalesced(metrics=False)
    async def get(key: int, /) -> int:
        await calls.hold(key)
        return key

    running = asyncio.create_task(get(1))
    await settle()
    by_keyword = asyncio.create_task(get(key=1))  # type: ignore[call-arg]
    await settle()
    calls.gate.set()
    assert await running == 1
    with pytest.raises(TypeError, match="positional"):
        await by_keyword


async def test_equal_values_of_different_types_do_not_share_a_call():
    calls = Calls()

    @coalesced(metrics=False)
    async def encode(value: Any) -> str:
        await calls.hold(value)
        return repr(value)

    assert await _share(calls, encode(1), encode(True), encode(1.0)) == ["1", "True", "1.0"]
