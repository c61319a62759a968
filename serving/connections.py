"""A uvicorn HTTP protocol that closes connections which never complete their request headers.

uvicorn times out idle keep-alive connections only after a first response; a client that
connects and sends nothing (or half a header) holds its socket for ever. Each connection here
arms a timer when it opens and after each response; if no new request's headers have
arrived when it fires, the connection is closed. Body reads are timed by `BodyLimit`.
"""

from __future__ import annotations

import asyncio

try:  # the C parser of uvicorn[standard]; h11 otherwise
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _BaseProtocol
except ImportError:  # pragma: no cover - depends on the installed extras
    from uvicorn.protocols.http.h11_impl import H11Protocol as _BaseProtocol


def header_timeout_protocol(timeout_s: float) -> type:
    """The uvicorn protocol class to pass as `http=`, with a `timeout_s` header deadline."""

    class HeaderTimeoutProtocol(_BaseProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            self._armed_cycle = self.cycle  # a new request replaces `cycle` once its headers are in
            self._header_timer = self.loop.call_later(timeout_s, self._header_deadline)

        def _header_deadline(self) -> None:
            self._header_timer = None
            if self.cycle is self._armed_cycle and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
