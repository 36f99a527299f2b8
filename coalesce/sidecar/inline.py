"""`run_inline`: drive a coroutine from callbacks, the way a Task would, without a Task.

Every merged read is one `SingleFlight.do` caller. As a Task, each would cost a task
creation and a loop iteration before its first step -- on the hot path of a proxy, a
large share of the work. Here the first step runs inside `run_inline` itself (in the
protocol callback that received the request) and each later step runs as the
done-callback of the future the coroutine awaits: what `asyncio.Task` does, minus
scheduling, context switching and bookkeeping the sidecar does not need.

Only for coroutines that await asyncio futures (or yield bare, as ``sleep(0)`` does);
`SingleFlight.do` only ever awaits its caller's waiter future. Never call it while a
Task is running the current step (`SingleFlight.do` then sees that task as its caller,
which is also fine, but gains nothing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

__all__ = ["InlineRun", "run_inline"]

T = TypeVar("T")

Done = Callable[["InlineRun[T]", T | None, BaseException | None], None]


class InlineRun(Generic[T]):
    """One coroutine being driven; `on_done(run, result, error)` is called exactly once.

    `cancel` is `Task.cancel`'s contract: the future the coroutine awaits is cancelled,
    so the coroutine sees `CancelledError` at that await, may clean up, and ends; its
    outcome (usually that `CancelledError`) reaches `on_done`.
    """

    __slots__ = ("_coro", "_on_done", "_waiting", "done")

    def __init__(self, coro: Coroutine[Any, Any, T], on_done: Done[T]) -> None:
        self._coro = coro
        self._on_done = on_done
        self._waiting: asyncio.Future[Any] | None = None
        self.done = False

    def cancel(self) -> None:
        waiting = self._waiting
        if waiting is not None and not waiting.done():
            waiting.cancel()

    def _step(self, _: object = None) -> None:
        self._waiting = None
        try:
            yielded = self._coro.send(None)
        except StopIteration as stop:
            self._finish(stop.value, None)
            return
        except BaseException as exc:  # the coroutine's own outcome, cancellation included
            self._finish(None, exc)
            return
        if yielded is None:
            asyncio.get_running_loop().call_soon(self._step)
        elif asyncio.isfuture(yielded):
            yielded._asyncio_future_blocking = False  # what Task does before waiting
            self._waiting = yielded
            yielded.add_done_callback(self._step)
        else:
            self._coro.close()
            self._finish(None, RuntimeError(f"run_inline cannot wait for {yielded!r}"))

    def _finish(self, result: T | None, error: BaseException | None) -> None:
        self.done = True
        self._on_done(self, result, error)


def run_inline(coro: Coroutine[Any, Any, T], on_done: Done[T]) -> InlineRun[T]:
    """Run `coro`'s first step now and the rest from callbacks; see `InlineRun`."""
    run = InlineRun(coro, on_done)
    run._step()
    return run
