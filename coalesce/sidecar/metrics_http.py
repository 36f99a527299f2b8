"""A tiny HTTP endpoint: ``/metrics`` (Prometheus text), ``/healthz``, ``/livez`` and
``/readyz`` (JSON).

``/livez`` answers 200 whenever the process serves (its event loop runs), for a
liveness probe: restarting the sidecar cannot fix an unreachable Scylla. ``/readyz``
is 200 when the sidecar should get traffic: some upstream node answers and it is not
draining. ``/healthz`` is 200 when some upstream node answers.

Just enough HTTP/1.1 for scrapers and health checkers: one request per connection,
GET or HEAD, answered and closed. Requests that are too large or too slow are dropped.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["serve_metrics"]

_MAX_REQUEST: Final = 8192
_READ_TIMEOUT: Final = 5.0
_REASONS: Final = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
                   503: "Service Unavailable"}


async def serve_metrics(
    host: str,
    port: int,
    registry: CollectorRegistry,
    health: Callable[[], dict[str, Any]],
) -> asyncio.Server:
    """Start serving; the caller closes the returned server.

    `health()` returns a JSON-able dict whose ``"reachable"`` entry decides the status
    of ``/healthz`` (200 when true, 503 otherwise) and, with ``"draining"`` false,
    of ``/readyz``.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > _MAX_REQUEST:
                return
            method, path, *_ = [*head.split(b"\r\n", 1)[0].decode("latin-1").split(" "), "", ""]
            path = path.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            elif path == "/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest(registry)
            elif path in ("/healthz", "/readyz"):
                report = health()
                ok = report.get("reachable") and (path == "/healthz" or not report.get("draining"))
                status = 200 if ok else 503
                ctype, body = "application/json", json.dumps(report).encode() + b"\n"
            elif path == "/livez":
                status, ctype, body = 200, "application/json", b'{"live": true}\n'
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            header = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode("latin-1")
            writer.write(header if method == "HEAD" else header + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, limit=_MAX_REQUEST)
