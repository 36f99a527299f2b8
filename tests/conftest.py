"""Fixtures shared by every test module."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import settings

from coalesce import SingleFlight, _asyncio_compat

pytest_plugins = ["tests.fixtures_emulator"]

# Bounded property tests in CI; `HYPOTHESIS_PROFILE=fuzz` multiplies every budget by
# FUZZ_FACTOR for a long fuzzing run (tests that set their own budget use `examples`).
FUZZ_FACTOR = 100 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 1
settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("fuzz", max_examples=60 * FUZZ_FACTOR, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(n: int) -> int:
    """A property test's example budget: `n` in CI, `n` x FUZZ_FACTOR when fuzzing."""
    return n * FUZZ_FACTOR


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """When fuzzing, scale every test's timeout by FUZZ_FACTOR along with its budget.

    A test's timeout is its closest ``timeout`` marker, else the ini ``timeout``; the
    scaled one is put in front of the test's own markers, so it is the closest.
    """
    if FUZZ_FACTOR == 1:
        return
    default = float(config.getini("timeout") or 0)
    for item in items:
        marker = item.get_closest_marker("timeout")
        kwargs = dict(marker.kwargs) if marker is not None else {}
        if marker is not None and marker.args:
            seconds = float(marker.args[0])
        else:
            seconds = float(kwargs.pop("timeout", default))
        kwargs.pop("timeout", None)
        if seconds > 0:  # 0 already means no timeout
            item.add_marker(pytest.mark.timeout(seconds * FUZZ_FACTOR, **kwargs), append=False)
@pytest.fixture(autouse=True, scope="session")
def _sigint_reaches_children() -> None:
    """A run started in the background (``cmd &``) ignores SIGINT, and so would every
    process the tests start: the Ctrl-C tests need it delivered as a terminal does."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(params=["inline", "task"])
def first_step(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the inline first step, then again under the plain-task fallback.

    The single-flight contract holds either way; see `coalesce._asyncio_compat`.
    """
    if request.param == "task":
        monkeypatch.setattr(_asyncio_compat, "INLINE_FIRST_STEP", False)
    elif not _asyncio_compat.INLINE_FIRST_STEP:
        pytest.skip(f"no inline first step here: {_asyncio_compat.FALLBACK_REASON}")
    return str(request.param)


@pytest.fixture
def inline_only(first_step: str) -> None:
    """Skip under the fallback a test that pins how the inline first step works."""
    if first_step == "task":
        pytest.skip("pins the inline first step, which the plain-task fallback does without")


@pytest.fixture
def groups() -> Iterator[Callable[..., SingleFlight[Any]]]:
    """Make `SingleFlight` groups; after the test every one of them must be empty.

    Empty means no key in the table and no upstream call still running: whatever the
    test did (cancel, time out, raise, forget), nothing was left behind.
    """
    made: list[SingleFlight[Any]] = []

    def make(*args: Any, **kwargs: Any) -> SingleFlight[Any]:
        kwargs.setdefault("metrics", False)
        group: SingleFlight[Any] = SingleFlight(*args, **kwargs)
        made.append(group)
        return group

    make.track = made.append  # type: ignore[attr-defined]
    yield make
    for group in made:
        assert len(group) == 0, f"{group!r} left keys in flight"
        assert group.running == 0, f"{group!r} left upstream calls running"


class Backend:
    """An upstream whose calls block until the test releases them."""

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = 0
        self.gates: list[asyncio.Future[Any]] = []

    async def __call__(self, value: Any = "answer") -> Any:
        self.calls += 1
        gate = asyncio.get_running_loop().create_future()
        self.gates.append(gate)
        try:
            await gate
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return value

    def release(self, index: int = -1, exc: BaseException | None = None) -> None:
        gate = self.gates[index]
        if exc is None:
            gate.set_result(None)
        else:
            gate.set_exception(exc)


async def settle(turns: int = 8) -> None:
    """Let every ready task run until it blocks (loop turns, not wall-clock time)."""
    for _ in range(turns):
        await asyncio.sleep(0)
