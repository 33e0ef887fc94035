"""The web's HTTP protocol (``service/http/protocol.py``): a request head past 64 KB is refused while it is read,
and nothing else changes — large bodies and keep-alive connections are served as before."""

from __future__ import annotations

import re
import socket
import sys

import orjson

from service.config import Settings
from service.http.app import create_app
from service.http.protocol import MAX_HEAD_BYTES, BoundedHttpToolsProtocol
from tests.conftest import LiveServer


def exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def _until_closed(s: socket.socket, reply: bytes = b"", timeout: float = 10) -> bytes:
    """``reply`` and what the server sends after it until it closes the connection (a reset counts as closed)."""
    s.settimeout(timeout)
    try:
        while chunk := s.recv(65536):
            reply += chunk
    except ConnectionResetError:
        pass
    return reply


def test_an_oversized_head_is_refused_with_431_and_json(redis_url: str) -> None:
    with LiveServer(create_app(Settings(), redis_url, ""), http=BoundedHttpToolsProtocol) as server:
        big = b"x" * (MAX_HEAD_BYTES + 1)
        reply = exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + big + b"\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431")
        assert orjson.loads(body)["error"]["code"] == "request_header_fields_too_large"


def test_malformed_framing_is_refused_with_400_and_json(redis_url: str) -> None:
    """A negative Content-Length, two of them, or one beside chunked: the JSON error every other refusal has (it
    was the server's plain-text 'Invalid HTTP request received.')."""
    with LiveServer(create_app(Settings(), redis_url, ""), http=BoundedHttpToolsProtocol) as server:
        for framing in (b"Content-Length: -5\r\n", b"Content-Length: 2\r\nContent-Length: 3\r\n",
                        b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n"):
            reply = exchange(server.port, b"POST /segment HTTP/1.1\r\nHost: a\r\n" + framing + b"\r\n{}")
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, reply[:200]
            assert orjson.loads(body)["error"]["code"] == "bad_request"


def test_large_bodies_and_keep_alive_requests_are_served(redis_url: str) -> None:
    with LiveServer(create_app(Settings(), redis_url, ""), http=BoundedHttpToolsProtocol) as server:
        events = [{"type": "track", "event": "Big", "userId": f"u{i}", "messageId": f"m{i}",
                   "properties": {"pad": "y" * 900}} for i in range(200)]
        body = orjson.dumps(events)
        assert len(body) > 3 * MAX_HEAD_BYTES  # a body is not a head
        post = (b"POST /segment HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body)
        last = b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        reply = exchange(server.port, post + post + last)  # three requests on one connection
        assert reply.count(b"HTTP/1.1 200") == 3, reply[:300]
        assert b'"accepted":200' in reply and b'"duplicate":200' in reply


def test_a_header_that_never_ends_is_refused_before_it_ends(redis_url: str) -> None:
    import time

    with LiveServer(create_app(Settings(), redis_url, ""), http=BoundedHttpToolsProtocol) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Endless: ")
            reply = b""
            for _ in range(40):  # up to 40 x 16 KB, never ending the header
                try:
                    s.sendall(b"x" * 16384)
                except (BrokenPipeError, ConnectionResetError):
                    break
                time.sleep(0.01)
            reply = _until_closed(s, reply)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]


def slow_app() -> object:
    """A bare app with a response that takes longer than the (shortened) head timeout."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def slow(request: object) -> PlainTextResponse:
        await asyncio.sleep(1.0)
        return PlainTextResponse("done")

    async def fast(request: object) -> PlainTextResponse:
        return PlainTextResponse("done")

    return Starlette(routes=[Route("/slow", slow), Route("/fast", fast)])


def test_a_connection_without_a_complete_head_is_closed_with_408(monkeypatch) -> None:
    import time

    from service.http import protocol

    monkeypatch.setattr(protocol, "HEAD_TIMEOUT", 0.3)
    with LiveServer(slow_app(), http=BoundedHttpToolsProtocol) as server:
        for opening in (b"", b"GET /slow HT"):  # nothing at all; half a request line
            started = time.monotonic()
            reply = exchange(server.port, opening)
            assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
            assert orjson.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
            assert time.monotonic() - started < 5
        # a response that takes longer than the head timeout is never cut, nor is the keep-alive request after it
        slow = b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
        reply = exchange(server.port, slow + b"GET /slow HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert reply.count(b"HTTP/1.1 200") == 2 and reply.count(b"done") == 2, reply[:300]


def _data_segments_received(s: socket.socket) -> int:
    """Linux's ``tcpi_data_segs_in`` (TCP_INFO): segments with data this socket has received."""
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
    return int.from_bytes(info[152:156], sys.byteorder)


def _response(s: socket.socket) -> bytes:
    out = b""
    while b"\r\n\r\n" not in out:
        out += s.recv(65536)
    head, _, body = out.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += s.recv(65536)
    return head


def test_each_response_leaves_in_one_tcp_segment_and_pipelined_answers_keep_their_order(redis_url: str) -> None:
    """uvicorn writes a response's head and its body apart; the protocol joins them into one send (a system call
    and a segment fewer per request). Answers still leave whole and in order, and a closing one is sent before
    the connection closes."""
    with LiveServer(create_app(Settings(), redis_url, ""), http=BoundedHttpToolsProtocol) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            before = _data_segments_received(s)
            for _ in range(20):
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
                assert _response(s).startswith(b"HTTP/1.1 200")
            assert _data_segments_received(s) - before == 20
        # two requests in one packet (pipelined), then one that closes: three whole answers, in order
        reply = exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
                                      b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n"
                                      b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", reply) == [b"200", b"404", b"200"]


def test_a_keep_alive_connection_gets_a_fresh_head_timeout_after_each_response(monkeypatch) -> None:
    """The head timeout counts from the connection, then from each response: requests sent every 0.2 s on one
    connection are all served well past the first 0.3 s, and the same connection left idle after its last response
    gets its 408."""
    import time

    from service.http import protocol

    monkeypatch.setattr(protocol, "HEAD_TIMEOUT", 0.3)
    with LiveServer(slow_app(), http=BoundedHttpToolsProtocol) as server, \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        for _ in range(6):  # 1.2 s in all, four head timeouts' worth
            s.sendall(b"GET /fast HTTP/1.1\r\nHost: a\r\n\r\n")
            assert _response(s).startswith(b"HTTP/1.1 200")
            time.sleep(0.2)
        started = time.monotonic()
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        assert out.startswith(b"HTTP/1.1 408"), out[:100]
        assert time.monotonic() - started < 2


def test_a_body_that_trickles_past_its_deadline_is_refused_with_408_and_its_connection_closed(
        monkeypatch, redis_url: str, caplog) -> None:
    """A body that keeps coming a byte at a time would hold its connection for as long as its client likes: past
    BODY_TIMEOUT it is answered 408 (JSON) and the connection closed; nothing of it is applied or kept for replay,
    and nothing is logged as a server error. A body sent in pieces within the bound is served as ever."""
    import logging
    import time

    import redis

    from service.http import protocol
    from service.spec.keys import Keys

    monkeypatch.setattr(protocol, "BODY_TIMEOUT", 0.5)
    caplog.set_level(logging.INFO)
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    body = orjson.dumps([{"type": "track", "event": "Slow", "userId": "u1", "messageId": "slow-1"}])
    head = (b"POST /segment HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n")
    with LiveServer(create_app(Settings(), redis_url, ""), http=BoundedHttpToolsProtocol) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            started = time.monotonic()
            s.sendall(head + body[:5])
            s.settimeout(0.1)
            reply = b""
            for byte in body[5:-1]:  # never the last byte
                try:
                    s.sendall(bytes([byte]))
                    reply += s.recv(65536)
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
                if reply:
                    break
            reply = _until_closed(s, reply, 5)
            elapsed = time.monotonic() - started
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert orjson.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
        assert 0.4 < elapsed < 3
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:  # in pieces, in time
            s.sendall(head + body[:5])
            time.sleep(0.15)
            s.sendall(body[5:20])
            time.sleep(0.15)
            s.sendall(body[20:])
            assert _response(s).startswith(b"HTTP/1.1 200")
    assert client.xlen(Keys("default").log) == 1  # only the body that arrived whole
    assert client.xlen(Keys("default").dead_letters) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
