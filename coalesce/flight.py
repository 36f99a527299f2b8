"""SingleFlight: the in-flight table of asyncio calls, and its contract.

One upstream call per key at a time; every caller that arrives while it runs gets its
outcome. How it stays cheap: the first caller runs the function's first step inline
(most calls either finish there or park on I/O), and only a call that actually
suspends is handed to a task of its own so that no caller's cancellation can reach it.
During that inline step `asyncio.current_task()` is already the task that will own the
call, so `asyncio.timeout()` or a `TaskGroup` opened by the function binds to the call,
never to the caller; and it runs in a copy of the caller's context, as a task would.
Callers then wait on one future per flight, not one each (see `_Flight`).

The inline step needs private asyncio API, kept in `coalesce._asyncio_compat` and
checked at import; where it does not behave as assumed, every call runs in a plain
task of its own instead: the same contract, slower.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
import types
from asyncio import AbstractEventLoop, CancelledError, Future, Task
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Hashable
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry

from coalesce import _asyncio_compat
from coalesce.errors import LoopMismatchError, Overloaded, ReentrantCallError
from coalesce.metrics import FlightStats, register

__all__ = ["SingleFlight"]

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


class _Flight:
    """One upstream call and the callers waiting for it.

    Callers wait on one future, `shared`, that the outcome settles once. A caller's
    task cancelled while it waits cancels that future (Task.cancel cancels what the
    task awaits): every caller on it wakes, the cancelled one leaves, and the others
    notice they were not cancelled and wait on with a future of their own in
    `waiters`, as do later callers (`shared` is then None). So a herd costs one future,
    and a flight pays the price of private futures only once someone has left it.
    """

    __slots__ = (
        "args", "context", "done", "exception", "fn", "key", "kwargs", "left", "linger",
        "result", "shared", "started_at", "task", "traceback", "waiters", "waiting",
    )

    def __init__(self, key: Hashable, shared: Future[Any] | None) -> None:
        self.key = key
        self.shared = shared
        self.waiters: list[Future[Any]] = []  # private futures (cancelled ones stay behind)
        self.waiting = 0  # callers still waiting
        self.left = 0  # callers that gave up waiting
        self.task: Task[Any] | None = None  # None while queued behind max_inflight
        self.done = False
        self.result: Any = None
        self.exception: BaseException | None = None
        self.traceback: types.TracebackType | None = None  # the exception's, as raised
        self.linger: asyncio.TimerHandle | None = None
        self.started_at = 0.0
        self.fn: Callable[..., Awaitable[Any]] | None = None  # set while queued
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}
        self.context: contextvars.Context | None = None


_Job = tuple["SingleFlight[Any]", _Flight, Coroutine[Any, Any, Any], contextvars.Context, Any]

class _Runner:
    """A parked task of one event loop, ready to become the owner of the next call.

    The first step of a call runs with the standby as `current_task()`. If the call
    suspends, the standby carries it on (see `_resume`) and a new task is parked. An
    owner is never reused for another call: code that kept the task a call saw as
    current (a watchdog, an admin "cancel") must not reach an unrelated later call.
    Parked tasks run in an empty context (each call runs in its own) and are not
    reported as destroyed when a loop is closed by hand.
    """

    __slots__ = ("busy", "job", "loop", "standby")

    def __init__(self, loop: AbstractEventLoop) -> None:
        self.loop = loop
        self.busy = False
        self._park()

    def _park(self) -> None:
        self.job: Future[_Job] = self.loop.create_future()
        self.standby = self.loop.create_task(
            _owner(self.job), name="coalesce-flight", context=contextvars.Context()
        )
        _asyncio_compat.quiet_when_destroyed(self.standby)
        _track_owner(self.standby)

    def ready(self) -> Task[Any]:
        """The standby, replaced first if someone cancelled it while it was parked."""
        if self.job.done() or self.standby.cancelling():
            self._park()
        return self.standby

    def hand_off(self, job: _Job) -> None:
        owner, parked = self.standby, self.job
        self._park()
        group, flight, coro, context, pending = job
        if not parked.done() and not owner.cancelling():
            flight.task = owner
            parked.set_result(job)
            return
        # The call's first step cancelled its own task (the standby), as a task may.
        # Deliver that cancellation as a task would, from a task of its own.
        thrown = None if isinstance(pending, Future) and pending.cancel() else CancelledError()
        flight.task = self.loop.create_task(
            group._run(flight, _resume(coro, context, pending, thrown)),
            name="coalesce-flight",
            context=contextvars.Context(),
        )
        _track_owner(flight.task)


async def _owner(job: Future[_Job]) -> None:
    thrown: BaseException | None = None
    try:
        group, flight, coro, context, pending = await job
    except CancelledError as exc:
        if not job.done() or job.cancelled():
            return  # cancelled while parked: retire
        # Cancelled between the hand-off and the first resumption. As a task would:
        # cancel what the call awaits and let that cancellation reach it once it has
        # finished cancelling, or throw it in if there is nothing to cancel.
        group, flight, coro, context, pending = job.result()
        if not (isinstance(pending, Future) and pending.cancel()):
            thrown = exc
    await group._run(flight, _resume(coro, context, pending, thrown))


@types.coroutine
def _resume(
    coro: Coroutine[Any, Any, T],
    context: contextvars.Context,
    pending: Any,
    thrown: BaseException | None = None,
) -> Generator[Any, Any, T]:
    """Carry on a coroutine whose first step already ran and yielded `pending`.

    Each later step runs in `context`, as a task would run it, and every value, error
    and cancellation the owning task passes in reaches the coroutine unchanged.
    """
    while True:
        step: Callable[[Any], Any]
        if thrown is not None:
            step, arg, thrown = coro.throw, thrown, None
        else:
            try:
                sent = yield pending
            except BaseException as exc:  # a cancellation goes in too
                step, arg = coro.throw, exc
            else:
                step, arg = coro.send, sent
        try:
            pending = context.run(step, arg)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


_get_running_loop = asyncio.get_running_loop
_current_task = asyncio.current_task

_runners: dict[AbstractEventLoop, _Runner] = {}
_runners_lock = threading.Lock()  # loops in several threads may bind at once


def _runner_for(loop: AbstractEventLoop) -> _Runner:
    with _runners_lock:
        runner = _runners.get(loop)
        if runner is None:
            for stale in [other for other in _runners if other.is_closed()]:
                del _runners[stale]
            runner = _runners[loop] = _Runner(loop)
        return runner


# Owner tasks, and the flight each owner waits for: lets a join see a cycle of calls
# that would wait for each other forever (A's call awaits key B, whose awaits key A).
_owners: set[Task[Any] | None] = set()  # each removes itself when done
_joined: dict[Task[Any], _Flight] = {}


def _track_owner(task: Task[Any]) -> None:
    _owners.add(task)
    # An empty context: a parked task must not keep the context of whoever parked it.
    task.add_done_callback(_owners.discard, context=contextvars.Context())


def _waits_on(flight: _Flight, task: Task[Any] | None) -> bool:
    """Whether `flight`'s call already waits, through joined flights, on `task`."""
    for _ in range(64):  # chains are short; a bound keeps a corrupt one from spinning
        owner = flight.task
        if owner is None:
            return False
        if owner is task:
            return True
        next_flight = _joined.get(owner)
        if next_flight is None:
            return False
        flight = next_flight
    return False


def _expire(fut: Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class SingleFlight(Generic[T]):
    """A table of calls in flight, keyed by what makes their answers the same.

    `do` runs one call per key at a time and hands its outcome to every caller that
    arrived while it ran. The contract, under concurrency:

    - **Sharing.** Callers that arrive while a key's call is in flight get the very same
      result object, or an exception of the very same object, as the first caller.
      Results are shared, not copied: return immutable values.
    - **No caching.** Once the call ends its key leaves the table and the next caller
      starts a new call, unless ``linger`` seconds are set, during which callers get the
      finished *result* at once (exceptions never linger).
    - **Cancellation.** Cancelling a caller, including the one that started the call,
      only removes that caller: the others still get the outcome. When the last caller
      has gone, the call itself is cancelled and its key removed.
    - **Timeouts.** ``timeout=`` bounds one caller's wait: that caller gets
      `TimeoutError`, the call and the other callers go on, as with cancellation.
    - **forget(key).** Callers already waiting keep the current call; callers arriving
      afterwards start a fresh one. This is the hook for read-after-write safety.
    - **Bounds.** With ``max_waiters``, a caller arriving at a key that already has that
      many waiters gets `Overloaded` at once. With ``max_inflight``, at most that many
      calls run at a time across keys; a new key then waits in a queue of at most
      ``max_queued`` keys (callers of a queued key join it), and past that its caller
      gets `Overloaded` at once. Nothing piles up without bound.
    - **Loops.** A group serves one event loop, in one thread, at a time; using it from
      another loop while calls are in flight raises `LoopMismatchError`. An idle group
      follows the loop it is used from.
    - **Cycles.** A call that would wait for itself (it awaits its own key, directly or
      through other coalesced calls) gets `ReentrantCallError` instead of hanging. A
      call that awaits another key of the same group while ``max_inflight`` is reached
      waits for a slot it may itself hold: size the bound for nested calls.

    The function runs its first step inside the first caller's `do`, with a task of
    the group's as `current_task()`, in a copy of the caller's context; a call that
    suspends goes on in that task. A call that never suspends is never seen by anyone
    else, so it costs no more than a plain `await`. (Under the plain-task fallback of
    `coalesce._asyncio_compat` every call starts in a task of its own, as a call that
    suspends does; a KeyboardInterrupt raised by the function then ends the event
    loop, as from any task, instead of reaching the first caller.)
    """

    def __init__(
        self,
        name: str = "default",
        *,
        linger: float = 0.0,
        max_waiters: int | None = None,
        max_inflight: int | None = None,
        max_queued: int = 0,
        metrics: bool = True,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if linger < 0:
            raise ValueError(f"linger must be >= 0 seconds, got {linger!r}")
        for label, bound in (("max_waiters", max_waiters), ("max_inflight", max_inflight)):
            if bound is not None and bound < 1:
                raise ValueError(f"{label} must be >= 1 or None, got {bound!r}")
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {max_queued!r}")
        self.name = name
        self.linger = linger
        self.max_waiters = max_waiters
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self._flights: dict[Hashable, _Flight] = {}
        self._running = 0  # upstream calls running, forgotten ones included
        self._queue: deque[_Flight] = deque()
        self._loop: AbstractEventLoop | None = None
        self._runner: _Runner | None = None
        self._stats: FlightStats | None = None
        if metrics:
            self._stats = FlightStats(name, self.__len__)
            register(self._stats, registry)

    def __len__(self) -> int:
        """The number of keys in flight (queued and lingering keys included)."""
        return len(self._flights)

    def __contains__(self, key: object) -> bool:
        return key in self._flights

    def __repr__(self) -> str:
        return f"<SingleFlight {self.name!r} keys={len(self._flights)} running={self._running}>"

    @property
    def running(self) -> int:
        """Upstream calls running now, including ones whose key was forgotten."""
        return self._running

    @property
    def stats(self) -> FlightStats | None:
        """The group's counters (None with ``metrics=False``)."""
        return self._stats

    def forget(self, key: Hashable) -> bool:
        """Make callers arriving from now on start a fresh call for `key`.

        Callers already waiting keep the current call and get its outcome. Returns
        whether a call (or a lingering result) was in the table.
        """
        flight = self._flights.pop(key, None)
        if flight is None:
            return False
        if flight.linger is not None:
            flight.linger.cancel()
        return True

    def forget_all(self) -> None:
        """`forget` every key."""
        for key in list(self._flights):
            self.forget(key)

    async def do(
        self,
        key: Hashable,
        fn: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> T:
        """Return the outcome of ``fn(*args, **kwargs)``, shared by key.

        If no call for `key` is in flight, this caller starts one; otherwise it joins
        the running one and never calls `fn`. See the class docstring for what
        cancellation, ``timeout`` (this caller's wait, in seconds) and the bounds do.
        `fn` cannot receive a keyword argument named ``timeout`` this way: use `call`.
        A call that awaits its own key from inside itself would wait for itself: it
        gets `ReentrantCallError` instead.
        """
        loop = _get_running_loop()
        flight = self._flights.get(key)
        caller = _current_task(loop)
        if (
            flight is not None
            and (shared := flight.shared) is not None
            and loop is self._loop
            and timeout is None
            and caller is not None
            and caller not in _owners
            and (self.max_waiters is None or flight.waiting < self.max_waiters)
        ):  # the common joiner, checked first and alone: a herd is made of them
            if self._stats is not None:
                self._stats.joined += 1
        else:
            # Everything else lives in `_arrive`, so that this coroutine, one per caller
            # of a herd, keeps a small frame: fewer slots to clear, and to traverse at
            # every garbage collection while it waits.
            flight = self._arrive(key, fn, args, kwargs, loop, caller, flight)
            if type(flight) is not _Flight:  # finished in its first step, or lingering
                return flight  # type: ignore[no-any-return]
            shared = flight.shared
            if shared is None or timeout is not None or caller is None or caller in _owners:
                flight.waiting += 1
                return await self._wait(flight, loop, caller, timeout)  # type: ignore[no-any-return]
        flight.waiting += 1
        cancelled = caller.cancelling()
        # A herd's waiters hold nothing they no longer need: 10,000 keys and argument
        # tuples kept alive are 10,000 more objects for every garbage collection, and
        # every reference a waiting frame keeps is one more for each collection to follow
        # (the rare paths below look the task and the loop up again).
        del key, fn, args, kwargs, loop, caller
        try:
            return await shared  # type: ignore[no-any-return]
        except CancelledError:
            caller = _current_task()  # not kept while waiting: see above
            assert caller is not None
            if caller.cancelling() > cancelled or isinstance(flight.exception, CancelledError):
                self._leave(flight, timed_out=False)  # this caller, or the call, was cancelled
                raise
            # Another caller's cancellation reached the shared future: carry on (below,
            # outside this handler, so that a shared exception never gets it as context).
        except GeneratorExit:
            raise  # closed by the garbage collector: its loop is gone
        except BaseException as exc:
            if exc is not flight.exception:
                self._leave(flight, timed_out=isinstance(exc, TimeoutError))
            raise
        if flight.done:  # the outcome landed in the same turn
            if flight.exception is None:
                return flight.result  # type: ignore[no-any-return]
            raise flight.exception.with_traceback(flight.traceback)
        if flight.shared is shared:
            flight.shared = None
        return await self._wait(flight, _get_running_loop(), caller, None)  # type: ignore[no-any-return]

    def _arrive(
        self,
        key: Hashable,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        loop: AbstractEventLoop,
        caller: Task[Any] | None,
        flight: _Flight | None,
    ) -> Any:
        """A caller the common joiner path did not take: the flight to wait for, or the
        outcome itself (a call that finished in its first step, a lingering result).

        Binds the group to `loop`, then starts the key's call (inline, queued, or in a
        task of its own) or joins the one in flight through `_join`.
        """
        if loop is not self._loop:
            self._bind(loop)
            flight = self._flights.get(key)  # binding may have cleared the table
        if flight is not None:
            return self._join(flight, caller, self.max_waiters)
        if self.max_inflight is not None and self._running >= self.max_inflight:
            flight = self._enqueue(key, fn, args, kwargs, loop)
        else:
            runner = self._runner
            self._running += 1  # counted during the first step: nested calls see it
            try:
                call = fn(*args, **kwargs)
            except BaseException:
                self._running -= 1
                raise
            if runner is None or runner.busy or type(call) is not types.CoroutineType:
                # No inline step: the fallback, a first step nested inside another
                # one, or not a coroutine.
                flight = self._start(key, call, loop)
            else:
                started = time.perf_counter()
                context = contextvars.copy_context()
                owner = runner.standby
                if runner.job.done() or owner.cancelling():
                    owner = runner.ready()
                runner.busy = True
                if caller is not None:
                    _asyncio_compat.leave_task(loop, caller)
                _asyncio_compat.enter_task(loop, owner)
                try:
                    pending = context.run(call.send, None)
                except StopIteration as stop:
                    self._running -= 1
                    if self._stats is not None:
                        self._stats.started += 1
                        self._stats.ended(None, 1, time.perf_counter() - started)
                    if self.linger and key not in self._flights:
                        self._linger(key, stop.value)
                    return stop.value
                except BaseException as exc:
                    self._running -= 1
                    if self._stats is not None:
                        self._stats.started += 1
                        self._stats.ended(exc, 1, time.perf_counter() - started)
                    raise
                finally:
                    _asyncio_compat.leave_task(loop, owner)
                    if caller is not None:
                        _asyncio_compat.enter_task(loop, caller)
                    runner.busy = False
                flight = _Flight(key, loop.create_future())
                flight.started_at = started
                # A call nested in the first step may have taken the key meanwhile:
                # then this one runs detached, for its first caller alone.
                self._flights.setdefault(key, flight)
                runner.hand_off((self, flight, call, context, pending))
        if self._stats is not None:
            self._stats.started += 1
        return flight

    def call(
        self,
        key: Hashable,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Coroutine[Any, Any, T]:
        """`do`, with the arguments of `fn` passed as a tuple and a dict."""
        if kwargs and "timeout" in kwargs:  # for `fn`, not for `do`
            fn, args, kwargs = functools.partial(fn, *args, **kwargs), (), None
        return self.do(key, fn, *args, timeout=timeout, **(kwargs or {}))

    def _join(
        self, flight: _Flight, caller: Task[Any] | None, max_waiters: int | None
    ) -> Any:
        """A joiner the common path did not take: the flight to wait for, or the result.

        Serves a lingering result, refuses a caller past ``max_waiters`` or one that
        would wait for itself, or counts the caller in.
        """
        if flight.done:
            if self._stats is not None:
                self._stats.joined += 1
            return flight.result
        elif max_waiters is not None and flight.waiting >= max_waiters:
            if self._stats is not None:
                self._stats.shed += 1
            raise Overloaded(f"{self.name}: a key already has {flight.waiting} callers waiting")
        else:
            if caller in _owners and _waits_on(flight, caller):  # only owners can close a cycle
                raise ReentrantCallError(
                    f"{self.name}: a call would wait for itself "
                    "(it awaits its own key, directly or through other coalesced calls)"
                )
            if self._stats is not None:
                self._stats.joined += 1
        return flight

    async def _wait(
        self,
        flight: _Flight,
        loop: AbstractEventLoop,
        caller: Task[Any] | None,
        timeout: float | None,
    ) -> Any:
        """Wait for `flight` on a future of this caller's own (already counted waiting)."""
        waiter: Future[Any] = loop.create_future()
        flight.waiters.append(waiter)
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
        # A call made from inside another call's owner task: recorded for cycle detection.
        nested = caller if caller is not None and caller in _owners else None
        if nested is not None:
            _joined[nested] = flight
        try:
            return await waiter
        except GeneratorExit:
            raise  # closed by the garbage collector: its loop is gone
        except BaseException as exc:
            if exc is not flight.exception:
                self._leave(flight, timed_out=isinstance(exc, TimeoutError))
            raise
        finally:
            if nested is not None:
                _joined.pop(nested, None)
            if timer is not None:
                timer.cancel()

    def _bind(self, loop: AbstractEventLoop) -> None:
        old = self._loop
        if old is not None and not old.is_closed() and (self._flights or self._running):
            raise LoopMismatchError(
                f"SingleFlight {self.name!r} has calls in flight on another event loop"
            )
        self._flights.clear()  # anything left belongs to a closed loop
        self._queue.clear()
        self._running = 0
        self._loop = loop
        self._runner = _runner_for(loop) if _asyncio_compat.INLINE_FIRST_STEP else None

    def _start(self, key: Hashable, call: Awaitable[Any], loop: AbstractEventLoop) -> _Flight:
        """Run `call` in a task of its own (`_running` already counts it)."""
        flight = _Flight(key, loop.create_future())
        self._flights.setdefault(key, flight)
        flight.started_at = time.perf_counter()
        self._launch(flight, call, loop, None)
        return flight

    def _launch(
        self,
        flight: _Flight,
        call: Awaitable[Any],
        loop: AbstractEventLoop,
        context: contextvars.Context | None,
    ) -> None:
        if not isinstance(call, Coroutine):
            call = _awaited(call)
        task = loop.create_task(self._run(flight, call), name="coalesce-flight", context=context)
        _track_owner(task)
        # A task cancelled before its first step never runs `_run`: end the flight here.
        task.add_done_callback(functools.partial(self._launched_done, flight, call))
        flight.task = task

    def _launched_done(self, flight: _Flight, call: Coroutine[Any, Any, Any], _: Any) -> None:
        if not flight.done:
            call.close()
            self._finish(flight, None, CancelledError())

    def _enqueue(
        self,
        key: Hashable,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        loop: AbstractEventLoop,
    ) -> _Flight:
        if len(self._queue) >= self.max_queued:
            if self._stats is not None:
                self._stats.shed += 1
            raise Overloaded(
                f"{self.name}: {self._running} calls in flight and {len(self._queue)} queued"
            )
        flight = self._flights[key] = _Flight(key, loop.create_future())
        flight.fn, flight.args, flight.kwargs = fn, args, kwargs
        flight.context = contextvars.copy_context()  # the call runs as its first caller's
        self._queue.append(flight)
        return flight

    def _dequeue(self) -> None:
        """Start queued keys while there is room (a loop, never a recursion)."""
        loop = self._loop
        assert loop is not None
        while self._queue and (self.max_inflight is None or self._running < self.max_inflight):
            flight = self._queue.popleft()
            if flight.waiting == 0:
                continue  # every caller left while it was queued
            fn, args, kwargs, context = flight.fn, flight.args, flight.kwargs, flight.context
            assert fn is not None and context is not None
            flight.fn, flight.args, flight.kwargs, flight.context = None, (), {}, None
            flight.started_at = time.perf_counter()
            self._running += 1
            try:
                call = context.run(fn, *args, **kwargs)
            except BaseException as exc:  # handed to the waiters
                self._finish(flight, None, exc, dequeue=False)
                continue
            self._launch(flight, call, loop, context)

    async def _run(self, flight: _Flight, call: Awaitable[Any]) -> None:
        """Await the call and end the flight."""
        try:
            result = await call
        except GeneratorExit:
            raise  # closed by the garbage collector after its loop closed: nobody waits
        except (CancelledError, KeyboardInterrupt, SystemExit) as exc:
            self._finish(flight, None, exc)
            raise
        except BaseException as exc:  # handed to the waiters, who alone may care
            self._finish(flight, None, exc)
            return
        self._finish(flight, result, None)

    def _finish(
        self,
        flight: _Flight,
        result: Any,
        exception: BaseException | None,
        *,
        dequeue: bool = True,
    ) -> None:
        """End a flight: free its slot, answer its waiters, maybe start queued keys."""
        flight.done = True
        _owners.discard(flight.task)  # hold no finished task (nor its context)
        flight.task = None
        flight.exception = exception
        self._running -= 1
        stats = self._stats
        if stats is not None:
            callers = flight.waiting + flight.left
            stats.ended(exception, callers, time.perf_counter() - flight.started_at)
        shared, flight.shared = flight.shared, None
        if shared is not None and not shared.done():
            if exception is None:
                shared.set_result(result)
            elif isinstance(exception, CancelledError):
                shared.cancel()
            else:
                shared.set_exception(exception)
                shared.exception()  # nobody may be awaiting it: not "never retrieved"
        elif exception is None:
            flight.result = result  # for callers woken by another's cancellation
        else:
            flight.traceback = exception.__traceback__
        waiters, flight.waiters = flight.waiters, []
        if exception is None:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(result)
        elif isinstance(exception, CancelledError):
            for waiter in waiters:
                waiter.cancel()
        else:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exception)
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
            if exception is None and self.linger:
                self._linger(flight.key, result)
        if dequeue and self._queue:
            self._dequeue()

    def _linger(self, key: Hashable, result: Any) -> None:
        """Serve `result` to callers of `key` for ``linger`` seconds."""
        assert self._loop is not None
        flight = self._flights[key] = _Flight(key, None)
        flight.done = True
        flight.result = result
        flight.linger = self._loop.call_later(self.linger, self._unlinger, flight)

    def _unlinger(self, flight: _Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    def _leave(self, flight: _Flight, *, timed_out: bool) -> None:
        """A caller gave up waiting; the last one to go takes the call down with it."""
        if self._stats is not None:
            if timed_out:
                self._stats.timed_out += 1
            else:
                self._stats.cancelled += 1
        if flight.done:
            return  # it left in the turn the flight ended: counted, nothing to undo
        flight.waiting -= 1
        flight.left += 1
        if flight.waiting:
            waiters = flight.waiters
            if len(waiters) > 2 * flight.waiting + 16:  # callers churn on a long flight
                flight.waiters = [w for w in waiters if not w.done()]
            return
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        if flight.task is not None:
            flight.task.cancel()
        elif flight in self._queue:
            self._queue.remove(flight)
