"""`@coalesced`: single-flight for async functions."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, cast, overload

from prometheus_client import CollectorRegistry

from coalesce.flight import SingleFlight
from coalesce.keys import CallKey

__all__ = ["Coalesced", "coalesced"]

P = ParamSpec("P")
R = TypeVar("R")


class Coalesced(Protocol, Generic[P, R]):
    """An async function whose concurrent identical calls share one execution."""

    group: SingleFlight[Any]
    __wrapped__: Callable[P, Awaitable[R]]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]: ...


@overload
def coalesced(fn: Callable[P, Awaitable[R]], /) -> Coalesced[P, R]: ...


@overload
def coalesced(
    *,
    key: Callable[..., Hashable] | None = None,
    group: SingleFlight[Any] | None = None,
    timeout: float | None = None,
    linger: float = 0.0,
    max_waiters: int | None = None,
    max_inflight: int | None = None,
    max_queued: int = 0,
    metrics: bool = True,
    registry: CollectorRegistry | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Coalesced[P, R]]: ...


def coalesced(
    fn: Callable[P, Awaitable[R]] | None = None,
    /,
    *,
    key: Callable[..., Hashable] | None = None,
    group: SingleFlight[Any] | None = None,
    timeout: float | None = None,
    linger: float = 0.0,
    max_waiters: int | None = None,
    max_inflight: int | None = None,
    max_queued: int = 0,
    metrics: bool = True,
    registry: CollectorRegistry | None = None,
) -> Coalesced[P, R] | Callable[[Callable[P, Awaitable[R]]], Coalesced[P, R]]:
    """Make concurrent identical calls of an async function share one execution.

    Used bare (``@coalesced``) or with options (``@coalesced(key=..., timeout=...)``).
    Calls are identical when their keys are equal: by default the arguments bound to
    the signature with defaults applied (see `CallKey`); ``key`` is called with the
    same arguments to compute one instead. Calls share the given ``group``, or a new
    `SingleFlight` named after the function built from the remaining options (the
    group contract applies: see `SingleFlight`). ``timeout`` bounds each caller's
    wait. The wrapper keeps the function's signature and exposes ``.group``.
    """

    if group is not None and (
        linger or max_waiters is not None or max_inflight is not None or max_queued
        or not metrics or registry is not None
    ):
        raise TypeError("@coalesced(group=...) takes no group options: set them on the group")

    def decorate(func: Callable[P, Awaitable[R]]) -> Coalesced[P, R]:
        flights = group
        if flights is None:
            flights = SingleFlight(
                getattr(func, "__qualname__", repr(func)),
                linger=linger,
                max_waiters=max_waiters,
                max_inflight=max_inflight,
                max_queued=max_queued,
                metrics=metrics,
                registry=registry,
            )
        call = flights.call
        call_key = CallKey(func)

        if key is None:

            @functools.wraps(func)
            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
                result: R = await call(call_key(args, kwargs), func, args, kwargs, timeout=timeout)
                return result

        else:
            key_fn = key

            @functools.wraps(func)
            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
                k = key_fn(*args, **kwargs)
                result: R = await call(k, func, args, kwargs, timeout=timeout)
                return result

        wrapped = cast(Coalesced[P, R], wrapper)
        wrapped.group = flights
        return wrapped

    if fn is not None:
        return decorate(fn)
    return decorate
