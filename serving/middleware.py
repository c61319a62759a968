"""HTTP guards as plain ASGI middleware: request metrics, in-flight limit, bearer auth, body limit.

They run before routing, so a rejected request (401, 408, 413, 503) costs no parsing and never
reaches the queue; each still answers the v2 error body `{"error": ...}` and is counted.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Awaitable, Callable, Sequence

from starlette.routing import BaseRoute, Match

from serving import jsoncodec
from serving.errors import BadRequest, Overloaded, PayloadTooLarge, ServingError, SlowClient, Unauthorized
from serving.monitoring import ServingMetrics

ASGIApp = Callable[..., Awaitable[None]]
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
UNLIMITED_PATHS = OPEN_PATHS | {"/metrics"}  # probes and scrapes must answer under any load
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


async def send_error(send, error: ServingError, metrics: ServingMetrics) -> None:
    """Answer a request rejected before routing with the v2 error body, and count its cause."""
    metrics.errors.labels(cause=error.cause).inc()
    body = jsoncodec.dumps({"error": error.message})
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value
    return None


def route_template(scope, routes: Sequence[BaseRoute]) -> str | None:
    """The path template a request matches (`/v2/models/{model_name}/infer`), None if none does.

    Starlette only records `scope["route"]` for FastAPI routes, so plain routes (the raw
    infer route) are matched again here; a few regex matches, only for those.
    """
    route = scope.get("route")
    if getattr(route, "path", None):
        return route.path
    for candidate in routes:
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            return getattr(candidate, "path", None)
    return None


class RequestMetrics:
    """Counts requests and latency by route template (never by raw path: bounded labels)."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics, routes: Sequence[BaseRoute] = ()):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            label = route_template(scope, self.routes) or "unmatched"
            self.metrics.requests.labels(route=label, code=str(status)).inc()
            self.metrics.latency.labels(route=label).observe(time.perf_counter() - started)


class InFlightLimit:
    """At most `limit` requests handled at once (JSON 503 beyond); health and /metrics always pass.

    This replaces uvicorn's `limit_concurrency`, which counts idle connections too and answers
    a plain-text 503 on every route, probes included.
    """

    def __init__(self, app: ASGIApp, limit: int, metrics: ServingMetrics):
        self.app, self.limit, self.metrics = app, limit, metrics
        self.active = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            await send_error(send, Overloaded(f"{self.limit} requests in flight; retry later", cause="in_flight"),
                             self.metrics)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class BearerAuth:
    """With a token configured, every path but the health probes needs `Authorization: Bearer <token>`."""

    def __init__(self, app: ASGIApp, token: str | None, metrics: ServingMetrics):
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.expected is not None and scope["path"] not in OPEN_PATHS:
            given = _header(scope, b"authorization") or b""
            if not hmac.compare_digest(given, self.expected):
                await send_error(send, Unauthorized(), self.metrics)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Reads the body up to `max_bytes` within `timeout_s` (413 / 408 before any parsing), then replays it."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: ServingMetrics, timeout_s: float = 30.0):
        self.app, self.max_bytes, self.metrics, self.timeout_s = app, max_bytes, metrics, timeout_s

    async def _reject(self, send, error: ServingError) -> None:
        error.headers["Connection"] = "close"
        await send_error(send, error, self.metrics)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await self._reject(send, BadRequest("Content-Length is not an integer"))
                return
            if length > self.max_bytes:
                await self._reject(send, PayloadTooLarge(f"request body of {length} bytes exceeds {self.max_bytes}"))
                return
        chunks, size = [], 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await self._reject(send, SlowClient(f"request body not received within {self.timeout_s:g}s"))
                return
            if message["type"] == "http.disconnect":
                return  # the client left; nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send, PayloadTooLarge(f"request body exceeds {self.max_bytes} bytes"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
