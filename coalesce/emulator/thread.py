"""`EmulatorThread`: an `Emulator` on its own event loop in a background thread.

For code that blocks -- cassandra-driver's synchronous API, cqlsh
subprocess tests -- and must not share a loop with the emulator::

    with EmulatorThread(shards=4) as emu:
        cluster = Cluster([emu.host], port=emu.port)

`__enter__` returns once the emulator listens (or re-raises its start-up
error); `__exit__` stops it, closes its loop and joins the thread, leaving
no socket or thread behind. `call(fn, *args)` runs `fn` on the emulator's
loop and returns its result, which is how to use anything that is not
thread-safe (`forget_prepared`, `stop`, ...). Reading `statements`,
`host`, `port`, `shard_aware_port` and `wrong_shard_requests` from the
caller's thread is safe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

from coalesce.emulator.emulator import DEFAULT_MAX_FRAME, Emulator, EmulatorConfig
from coalesce.emulator.server import ConnectionInfo

__all__ = ["EmulatorThread"]

_T = TypeVar("_T")


class EmulatorThread:
    """Runs `Emulator(**kwargs)` in a daemon thread; see the module docstring."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        shards: int = 4,
        read_latency: float = 0.001,
        write_latency: float | None = None,
        per_row: float = 2e-6,
        auth: bool = False,
        max_frame: int = DEFAULT_MAX_FRAME,
        metrics: tuple[str, int] | None = None,
        shard_aware: bool = False,
        shard_aware_port: int | None = 0,
        cross_shard_latency: float = 0.0,
    ) -> None:
        # Validate now, in the caller's thread, rather than inside the loop thread.
        self.config = EmulatorConfig(
            host=host,
            port=port,
            shards=shards,
            read_latency=read_latency,
            write_latency=write_latency,
            per_row=per_row,
            auth=auth,
            max_frame=max_frame,
            metrics=metrics,
            shard_aware=shard_aware,
            shard_aware_port=shard_aware_port,
            cross_shard_latency=cross_shard_latency,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._emulator: Emulator | None = None

    @property
    def emulator(self) -> Emulator:
        """The emulator itself (touch it only through `call` / `run`)."""
        if self._emulator is None:
            raise RuntimeError("EmulatorThread is not running")
        return self._emulator

    @property
    def host(self) -> str:
        return self.emulator.host

    @property
    def port(self) -> int:
        return self.emulator.port

    @property
    def shard_aware_port(self) -> int | None:
        return self.emulator.shard_aware_port

    @property
    def statements(self) -> dict[str, int]:
        return self.emulator.statements

    @property
    def wrong_shard_requests(self) -> int:
        return self.emulator.wrong_shard_requests

    @property
    def registry(self) -> object:
        return self.emulator.registry

    def start(self) -> None:
        """Start the thread and the emulator; raises what the emulator's start raised."""
        if self._thread is not None:
            raise RuntimeError("EmulatorThread already started")
        ready: concurrent.futures.Future[Emulator] = concurrent.futures.Future()
        loop = asyncio.new_event_loop()
        self._loop = loop

        def main() -> None:
            asyncio.set_event_loop(loop)

            async def boot() -> Emulator:
                emulator = Emulator.from_config(self.config)
                await emulator.start()
                return emulator

            try:
                emulator = loop.run_until_complete(boot())
            except BaseException as exc:
                ready.set_exception(exc)
                loop.close()
                return
            ready.set_result(emulator)
            loop.run_forever()
            try:
                loop.run_until_complete(emulator.aclose())
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

        self._thread = threading.Thread(target=main, name="coalesce-emulator", daemon=True)
        self._thread.start()
        try:
            self._emulator = ready.result(timeout=30)
        except BaseException:
            self._thread.join(timeout=5)
            self._thread = None
            self._loop = None
            raise

    def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run `fn(*args)` on the emulator's loop and return its result (or raise its error)."""
        loop = self._running_loop()

        async def invoke() -> _T:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(invoke(), loop).result(timeout=30)

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Await `coroutine` on the emulator's loop (e.g. `emulator.start()`); return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._running_loop()).result(timeout=30)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._thread is None:
            raise RuntimeError("EmulatorThread is not running")
        return self._loop

    def forget_prepared(self) -> None:
        self.call(self.emulator.forget_prepared)

    def shard_queue_depths(self) -> list[int]:
        return self.call(self.emulator.shard_queue_depths)

    def connections(self) -> list[ConnectionInfo]:
        return self.call(self.emulator.connections)

    def connections_by_shard(self) -> list[int]:
        return self.call(self.emulator.connections_by_shard)

    def close(self) -> None:
        """Stop the emulator and join the thread (idempotent)."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        self._thread = None
        self._loop = None

    def __enter__(self) -> EmulatorThread:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
