"""The private asyncio API the single-flight core relies on, all in one place.

`SingleFlight` runs a call's first step inline, inside its first caller's `do`, while
`asyncio.current_task()` already names the task that will own the call. That needs
what asyncio keeps private: `asyncio.tasks._enter_task` / `_leave_task` to swap the
loop's current task, and `Task._log_destroy_pending` so that a parked owner task is
not reported as destroyed when a loop is closed by hand. CPython has changed this
bookkeeping before (eager tasks in 3.12, per-thread current tasks later), so at import
a small self-test on a private loop checks that it behaves as assumed. Where it does
not, or with ``COALESCE_FORCE_TASK_FALLBACK=1`` in the environment, `INLINE_FIRST_STEP`
is False and every flight runs in a plain task of its own: the same contract, slower
(the first step no longer runs before the caller's `do` suspends).

Nothing else in the package may touch private asyncio names.
"""

from __future__ import annotations

import asyncio
import os
import threading
from asyncio import AbstractEventLoop, Task
from collections.abc import Callable
from typing import Any

__all__ = [
    "FALLBACK_REASON",
    "FORCE_FALLBACK_ENV",
    "INLINE_FIRST_STEP",
    "enter_task",
    "leave_task",
    "quiet_when_destroyed",
    "swap_current_task",
]

FORCE_FALLBACK_ENV = "COALESCE_FORCE_TASK_FALLBACK"

_enter: Callable[[AbstractEventLoop, Task[Any]], None] | None
_leave: Callable[[AbstractEventLoop, Task[Any]], None] | None
try:
    from asyncio.tasks import _enter_task as _enter
    from asyncio.tasks import _leave_task as _leave
except ImportError:  # pragma: no cover - a CPython without them
    _enter = _leave = None


def _unavailable(loop: AbstractEventLoop, task: Task[Any]) -> None:
    raise RuntimeError("asyncio.tasks has no _enter_task/_leave_task")


#: `_enter_task` and `_leave_task` themselves, for the first step's hot path, where a
#: Python wrapper would cost a call each way. Only valid while `INLINE_FIRST_STEP` is True.
enter_task: Callable[[AbstractEventLoop, Task[Any]], None] = _enter or _unavailable
leave_task: Callable[[AbstractEventLoop, Task[Any]], None] = _leave or _unavailable


def swap_current_task(
    loop: AbstractEventLoop, leaving: Task[Any] | None, entering: Task[Any] | None
) -> None:
    """Make `entering` the current task of `loop` in place of `leaving` (either may be None).

    Only valid while `INLINE_FIRST_STEP` is True.
    """
    assert _enter is not None and _leave is not None
    if leaving is not None:
        _leave(loop, leaving)
    if entering is not None:
        _enter(loop, entering)


def quiet_when_destroyed(task: Task[Any]) -> None:
    """Keep asyncio from logging `task` as destroyed while pending when its loop closes."""
    task._log_destroy_pending = False  # type: ignore[attr-defined]


def _self_test() -> str | None:
    """Why the inline first step cannot be used here, or None if it can."""
    if _enter is None or _leave is None:
        return "asyncio.tasks has no _enter_task/_leave_task"
    if not hasattr(Task, "_log_destroy_pending"):
        return "asyncio.Task has no _log_destroy_pending"
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_self_test()
    # Imported from inside a running loop: a private loop cannot run in this thread.
    outcome: list[str | None] = []
    thread = threading.Thread(target=lambda: outcome.append(_run_self_test()))
    thread.start()
    thread.join()
    return outcome[0] if outcome else "self-test did not finish"


def _run_self_test() -> str | None:
    loop = asyncio.new_event_loop()
    try:
        checked: asyncio.Future[str | None] = loop.create_future()
        # From a plain callback, so that a swap that misbehaves cannot upset a task.
        loop.call_soon(_check_swap, loop, checked)
        return loop.run_until_complete(checked)
    except Exception as exc:  # any surprise means: do not rely on it
        return f"self-test failed: {exc!r}"
    finally:
        loop.close()


def _check_swap(loop: AbstractEventLoop, checked: asyncio.Future[str | None]) -> None:
    """Swap a parked task in as current and out again, as a first step does."""
    try:
        checked.set_result(_swap_round_trip(loop))
    except Exception as exc:
        checked.set_exception(exc)


def _swap_round_trip(loop: AbstractEventLoop) -> str | None:
    release = loop.create_future()

    async def parked() -> None:
        await release

    async def first_step() -> None:
        seen.append(asyncio.current_task())
        await asyncio.sleep(0)

    owner = loop.create_task(parked())
    quiet_when_destroyed(owner)
    seen: list[Task[Any] | None] = [asyncio.current_task(loop)]
    swap_current_task(loop, None, owner)
    try:
        seen.append(asyncio.current_task(loop))
        step = first_step()
        step.send(None)  # runs up to its bare yield, as `do` runs a first step
        step.close()
    finally:
        swap_current_task(loop, owner, None)
    seen.append(asyncio.current_task(loop))
    release.set_result(None)
    if seen != [None, owner, owner, None]:
        return f"current_task() did not follow the swap ({seen!r})"
    if owner._log_destroy_pending:  # type: ignore[attr-defined]
        return "Task._log_destroy_pending cannot be cleared"
    return None


FALLBACK_REASON: str | None = (
    f"{FORCE_FALLBACK_ENV} is set"
    if os.environ.get(FORCE_FALLBACK_ENV, "") not in ("", "0")
    else _self_test()
)
#: Whether a call's first step may run inline (see the module docstring).
INLINE_FIRST_STEP: bool = FALLBACK_REASON is None
