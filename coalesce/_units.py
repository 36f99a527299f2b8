"""Durations, addresses and counts as people type them: one parser each, for every command.

Errors are `BadValue`, both a `ValueError` (for configuration code) and an
`argparse.ArgumentTypeError` (so argparse prints the message as it is).
"""

from __future__ import annotations

import argparse
import re

__all__ = ["BadValue", "parse_address", "parse_duration", "positive_int"]

_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|ms|us|µs|ns)?\s*")
_UNITS = {None: 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


class BadValue(ValueError, argparse.ArgumentTypeError):
    """A value that does not parse; the message says what was expected."""


def parse_duration(text: str) -> float:
    """Seconds from ``"1ms"``, ``"250us"``, ``"0.5s"``, ``"100ns"`` or bare seconds."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise BadValue(
            f"invalid duration {text!r}: use a number with s, ms, us or ns (e.g. 1ms, 250us)"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_address(text: str, *, default_port: int | None = 9042) -> tuple[str, int]:
    """``"host:port"``, ``"host"`` (with a default port) or ``"[v6]:port"``."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise BadValue(f"no host in address {text!r}")
    if not port_text:
        if default_port is None:
            raise BadValue(f"invalid address {text!r}: expected HOST:PORT")
        return host, default_port
    if not port_text.isdigit():
        raise BadValue(f"port {port_text!r} is not a number in {text!r}")
    if not 0 <= int(port_text) <= 65535:
        raise BadValue(f"port {port_text} out of range in {text!r} (0..65535)")
    return host, int(port_text)


def positive_int(text: str) -> int:
    """An integer >= 1; ``_`` and ``,`` may group digits (``10_000``, ``10,000``)."""
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise BadValue(f"not an integer: {text!r}") from None
    if value < 1:
        raise BadValue(f"must be >= 1, got {value}")
    return value
