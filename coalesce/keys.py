"""Turning calls into keys: the same logical call always gives the same key."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["CallKey", "types_of"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_NO_DEFAULT = inspect.Parameter.empty


def types_of(values: tuple[Any, ...]) -> tuple[type, ...]:
    """``tuple(map(type, values))``, several times faster for the short tuples keys hold.

    (`map` calls `type` through its generic call path; a direct ``type(v)`` does not.)
    """
    n = len(values)
    if n == 1:
        return (type(values[0]),)
    if n == 2:
        return (type(values[0]), type(values[1]))
    if n == 3:
        return (type(values[0]), type(values[1]), type(values[2]))
    if n == 4:
        return (type(values[0]), type(values[1]), type(values[2]), type(values[3]))
    return tuple(map(type, values))


class _Kwargs(tuple[tuple[str, Any], ...]):
    """The frozen ``**kwargs`` of a call: never equal to a plain tuple argument."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Kwargs) and tuple.__eq__(self, other)

    def __hash__(self) -> int:
        return hash((_Kwargs, tuple(self)))


class _Identity:
    """Hashes and compares an object by identity, holding it alive while keyed."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.obj is self.obj

    def __repr__(self) -> str:
        return f"<{type(self.obj).__name__} at {id(self.obj):#x}>"


class CallKey:
    """The default key of a call: its arguments bound to the signature, defaults applied.

    ``f(1)``, ``f(x=1)`` and ``f(1, limit=50)`` (where 50 is the default) give the same
    key. Keys are typed, as with ``functools.lru_cache(typed=True)``: ``f(1)``,
    ``f(1.0)`` and ``f(True)`` are different calls, since they may well give different
    answers. A first parameter named ``self`` or ``cls`` is keyed by identity, so two
    instances never share a call even if they compare equal. Arguments must be hashable:
    an unhashable one raises `TypeError` naming it; pass ``key=`` to say what matters.
    """

    __slots__ = (
        "_by_identity", "_defaults", "_exact", "_fill", "_names", "_qualname", "_signature",
    )

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._signature = inspect.signature(fn)
        params = list(self._signature.parameters.values())
        self._qualname = getattr(fn, "__qualname__", repr(fn))
        self._names = tuple(p.name for p in params)
        self._defaults = tuple(p.default for p in params)
        # Fast paths: an exact positional call of positional parameters, and filling
        # in keywords and defaults when every parameter may be passed by keyword.
        self._exact = all(p.kind in _POSITIONAL for p in params)
        self._fill = all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
        self._by_identity = bool(params) and params[0].name in ("self", "cls")

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        names = self._names
        if self._exact and not kwargs and len(args) == len(names):
            values: tuple[Any, ...] = args
        elif self._fill and len(args) <= len(names):
            values = self._filled(args, kwargs)
        else:
            bound = self._signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = tuple(
                _Kwargs(sorted(value.items())) if kind is inspect.Parameter.VAR_KEYWORD else value
                for value, kind in zip(
                    bound.arguments.values(),
                    (self._signature.parameters[n].kind for n in bound.arguments),
                    strict=True,
                )
            )
        if self._by_identity and values:
            values = (_Identity(values[0]), *values[1:])
        key = (values, types_of(values))
        try:
            hash(key)
        except TypeError:
            raise self._unhashable(values) from None
        return key

    def _filled(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        names, defaults = self._names, self._defaults
        values = list(args)
        used = 0
        for i in range(len(args), len(names)):
            name = names[i]
            if name in kwargs:
                values.append(kwargs[name])
                used += 1
            elif defaults[i] is not _NO_DEFAULT:
                values.append(defaults[i])
            else:
                self._signature.bind(*args, **kwargs)  # raises the usual TypeError
        if used != len(kwargs):
            self._signature.bind(*args, **kwargs)
        return tuple(values)

    def _unhashable(self, values: tuple[Any, ...]) -> TypeError:
        for name, value in zip(self._names, values, strict=False):
            try:
                hash(value)
            except TypeError:
                return TypeError(
                    f"{self._qualname}: argument {name!r} is an unhashable "
                    f"{type(value).__name__}; pass a hashable value or give "
                    f"@coalesced a key= function"
                )
        return TypeError(f"{self._qualname}: arguments are unhashable; give @coalesced a key=")
