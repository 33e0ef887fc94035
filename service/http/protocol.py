"""uvicorn's httptools protocol with bounds on the request head (request line and headers): its size and its time.

httptools itself accepts headers of any size and buffers them until they end, so one client could hold megabytes
of a never-ending header in memory; and uvicorn times out only idle keep-alive connections, so sockets that connect
and send nothing, or half a request line, stay open for ever — enough of them use up the process's file
descriptors and lock every other client out. Segment's requests carry a few hundred bytes of headers, sent at once:
a head past ``MAX_HEAD_BYTES`` is answered 431, one not complete within ``HEAD_TIMEOUT`` seconds of the connection
(or of the previous response) 408, both with a JSON error, and the connection is closed. A body that trickles in
(a few bytes at a time, each in time for any per-read timeout) would hold its connection and its buffered bytes
for as long as the client likes: a body not complete within ``BODY_TIMEOUT`` seconds of its head is answered 408
and its connection closed too. Segment itself gives up on a request after 5 s; the bound leaves SDKs on slow
mobile links a minute for their largest batch (500 KB).

It also writes each response in one send rather than two (uvicorn writes the status line and headers, then the
body, each straight to the socket): a system call and a TCP segment fewer per request.
"""

from __future__ import annotations

import asyncio
import http
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT = 15.0
BODY_TIMEOUT = 60.0


class CorkedTransport:
    """The transport a request's cycle writes its response to: what is written in one turn of the event loop
    leaves in one ``write`` at the end of that turn (``call_soon``), in order. Closing sends what is pending
    first; everything else is the socket transport's own."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HeadTooLarge(Exception):
    """Raised from a parser callback: httptools stops parsing, and uvicorn answers through ``send_400_response``."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Two counts, both checked while reading: the head's parts as the parser hands them over (request line and
    complete headers), and the data chunks that are wholly head, for a header that never ends (httptools buffers
    it whole before handing it over). A chunk in which a head or a message ended is not counted by the second
    (part of it may be a body), so that bound holds to within a chunk or two (uvicorn reads 64 KB at a time)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_size = 0  # request line and headers of the current request, as parsed
        self._head_chunks = 0  # bytes of whole chunks received while a head is incomplete
        self._in_head = True  # until a request's headers are complete, and again once its message is complete
        self._boundaries = 0  # heads and messages completed so far on this connection
        self._too_large = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None  # armed only for a body still incomplete after a read

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # every write of the connection (responses, and the protocol's own 400, 408 and 431) goes through it, so
        # that they leave in the order they were written
        self.transport = CorkedTransport(transport, self.loop)  # type: ignore[assignment]
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()  # the next request's head is due within HEAD_TIMEOUT too

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        """Close a connection still waiting for a head, never one whose request is being answered."""
        self._head_timer = None
        answering = self.cycle is not None and not self.cycle.response_complete
        if self._in_head and not answering and not self.transport.is_closing():
            self._refuse(408, "request_timeout", f"no complete request head within {HEAD_TIMEOUT:.0f} s")

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self) -> None:
        """Refuse a body still incomplete: 408 when no response has started (else just close), and the app's
        ``receive`` then sees the disconnect."""
        self._body_timer = None
        if self._in_head or self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()
        else:
            self._refuse(408, "request_timeout", f"request body not complete within {BODY_TIMEOUT:.0f} s of its head")

    def _grow(self, n: int) -> None:
        self._head_size += n
        if self._head_size > MAX_HEAD_BYTES:
            self._too_large = True
            raise HeadTooLarge

    def data_received(self, data: bytes) -> None:
        before = self._boundaries
        super().data_received(data)
        if self._boundaries != before:
            self._head_chunks = 0
        elif self._in_head and not self.transport.is_closing():
            self._head_chunks += len(data)
            if self._head_chunks > MAX_HEAD_BYTES:
                self._refuse_head()
        # a body still coming after this read: its deadline counts from here (a whole request in one read, the
        # common case, never arms a timer)
        if not self._in_head and self._body_timer is None and not self.transport.is_closing():
            self._body_timer = self.loop.call_later(BODY_TIMEOUT, self._body_timed_out)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._grow(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        self._in_head, self._boundaries = False, self._boundaries + 1
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._boundaries = True, self._boundaries + 1
        self._cancel_body_timer()

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            self._refuse_head()
        else:  # malformed framing (a bad Content-Length, both it and chunked, a bad chunk): JSON, as every error
            self._refuse(400, "bad_request", f"malformed HTTP request ({msg.rstrip('.')}): check Content-Length "
                         "and Transfer-Encoding")

    def _refuse_head(self) -> None:
        self._refuse(431, "request_header_fields_too_large", f"request line and headers exceed {MAX_HEAD_BYTES} bytes")

    def _refuse(self, status: int, code: str, message: str) -> None:
        body = orjson.dumps({"error": {"code": code, "message": message}})
        self.transport.write(f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json"
                             f"\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        self.transport.close()
