"""The HTTP edge: uvicorn's httptools protocol with limits on request headers and idle connections.

uvicorn caps neither the size of request headers nor how long a client may take to send them
(its keep-alive timeout only runs between requests): one client could stall the event loop with
a 100 MB header, or hold a descriptor per connection that never speaks. This subclass adds both
limits, and answers malformed HTTP with the app's JSON error body instead of plain text.
A reverse proxy (nginx's large_client_header_buffers, client_header_timeout) does the same;
this keeps `imgsim serve` safe without one.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("imgsim.server")


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """Headers larger than ``max_header_bytes`` get 431; headers not complete within
    ``header_seconds`` of the connection opening (or of the request's first byte) get 408."""

    max_header_bytes = 64 * 1024
    header_seconds = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn passes a Transport; its base class types a BaseTransport
        super().connection_made(transport)
        self._header_bytes = 0
        self._awaiting_headers = True
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(self.header_seconds, self._too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_headers = True
        self._header_bytes = 0
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_seconds, self._too_slow)

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._stop_timer()
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._awaiting_headers and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._refuse(431, f"request headers larger than {self.max_header_bytes} bytes")

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, msg)

    def _too_slow(self) -> None:
        self._header_timer = None
        if not self._awaiting_headers or self.transport.is_closing():
            return
        if self._header_bytes == 0:  # never said a word: just hang up
            self.transport.close()
        else:
            self._refuse(408, f"request headers not received within {self.header_seconds:g} s")

    def _stop_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _refuse(self, status: int, detail: str) -> None:
        """Answer with the app's error body and close; the request never reaches the app."""
        log.info("refused %s: %s (%s)", status, detail, self.client)
        if self.cycle is None or self.cycle.response_complete:  # not in the middle of another answer
            body = json.dumps({"detail": detail}).encode()
            head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            self.transport.write(STATUS_LINE[status] + head + body)
        self.transport.close()


def guarded_protocol(max_header_bytes: int, header_seconds: float) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for ``uvicorn.run(http=...)`` with these limits."""
    limits = {"max_header_bytes": max_header_bytes, "header_seconds": header_seconds}
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), limits)
