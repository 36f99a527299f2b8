"""run_inline drives a coroutine like a Task would; Outbox keeps order while batching."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from coalesce.sidecar.inline import InlineRun, run_inline
from coalesce.sidecar.outbox import Outbox

from .conftest import eventually


class _Recorder:
    def __init__(self) -> None:
        self.outcomes: list[tuple[Any, BaseException | None]] = []

    def __call__(self, run: InlineRun[Any], result: Any, error: BaseException | None) -> None:
        assert run.done
        self.outcomes.append((result, error))


async def test_the_first_step_runs_inside_the_call_and_the_rest_from_callbacks() -> None:
    steps: list[str] = []
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def work() -> int:
        steps.append("first")
        value = await gate
        steps.append("second")
        await asyncio.sleep(0)
        return value + 1

    done = _Recorder()
    run = run_inline(work(), done)
    assert steps == ["first"]
    assert not run.done
    gate.set_result(41)
    await eventually(lambda: run.done)
    assert steps == ["first", "second"]
    assert done.outcomes == [(42, None)]


async def test_errors_and_synchronous_results_reach_on_done_once() -> None:
    async def fails() -> None:
        raise KeyError("x")

    async def instant() -> str:
        return "now"

    done = _Recorder()
    assert run_inline(fails(), done).done
    assert run_inline(instant(), done).done
    assert isinstance(done.outcomes[0][1], KeyError)
    assert done.outcomes[1] == ("now", None)


async def test_cancel_is_seen_at_the_await_and_the_coroutine_can_clean_up() -> None:
    cleaned: list[bool] = []
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def waits() -> None:
        try:
            await never
        finally:
            cleaned.append(True)

    done = _Recorder()
    run = run_inline(waits(), done)
    run.cancel()
    await eventually(lambda: run.done)
    assert cleaned == [True]
    assert isinstance(done.outcomes[0][1], asyncio.CancelledError)


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return False


@pytest.mark.parametrize("frames", [1, 2, 5])
async def test_outbox_sends_a_lone_frame_at_once_and_batches_a_busy_turn(frames: int) -> None:
    transport = _Transport()
    out = Outbox(asyncio.get_running_loop(), transport)  # type: ignore[arg-type]
    for i in range(frames):
        out.put(bytes([i]))
    assert transport.writes[:1] == [b"\x00"]  # the first write of a quiet turn goes now
    await asyncio.sleep(0)
    assert b"".join(transport.writes) == bytes(range(frames))  # in order, nothing lost
    assert len(transport.writes) == min(frames, 2)
    # After a busy turn even the first frame waits for the end of the turn.
    if frames > 1:
        out.put(b"x")
        assert b"".join(transport.writes) == bytes(range(frames))
        await asyncio.sleep(0)
        assert transport.writes[-1] == b"x"
