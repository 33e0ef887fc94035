"""Reading request bodies within limits (sizes enforced while reading, decompression bounded).

What a body means is ``service/spec/bodies.py``'s job."""

from __future__ import annotations

import zlib

from starlette.requests import ClientDisconnect, Request

from service.spec.bodies import BodyError


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, stopping as soon as it passes ``limit`` bytes (decompressed size for gzip bodies)."""
    raw_length = request.headers.get("content-length", "").strip()
    # at most 18 digits: int() of a few thousand digits raises ValueError (and longer is over any limit anyway)
    declared = (int(raw_length) if len(raw_length) <= 18 else 10**18) if raw_length.isdigit() else 0
    if declared > limit:
        raise BodyError(413, f"body is {declared} bytes; the limit here is {limit}", declared)
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip", "deflate"):  # refused before a byte is read
        raise BodyError(400, "this Content-Encoding is not supported; send gzip, deflate or plain JSON", declared)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyError(413, f"body exceeds {limit} bytes", size)
            chunks.append(chunk)
    except ClientDisconnect:  # the client left, or its body ran out of time (BODY_TIMEOUT): nothing to apply
        raise BodyError(408, "the connection closed before the request body was complete", size) from None
    body = b"".join(chunks)
    if encoding in ("gzip", "x-gzip", "deflate"):
        body = inflate(body, limit, encoding)
    return body


MAX_GZIP_MEMBERS = 16  # a concatenation of a few gzip files; SDKs and Segment send one


def inflate(body: bytes, limit: int, encoding: str) -> bytes:
    """Decompress without ever holding more than ``limit`` bytes: a small gzip bomb cannot exhaust memory."""
    wbits = 16 + zlib.MAX_WBITS if encoding != "deflate" else zlib.MAX_WBITS
    out, rest, members = b"", body, 0
    while True:  # gzip allows members one after the other (RFC 1952 2.2): they decompress as one
        members += 1
        if members > MAX_GZIP_MEMBERS:  # each one copies the rest of the body: thousands of tiny ones would stall
            raise BodyError(400, f"body is gzip of more than {MAX_GZIP_MEMBERS} members: compress it as one",
                            len(body))
        d = zlib.decompressobj(wbits)
        try:
            out += d.decompress(rest, limit + 1 - len(out))
        except zlib.error as exc:
            raise BodyError(400, f"body is not valid {encoding}: {exc}", len(body)) from None
        if len(out) > limit or d.unconsumed_tail:
            raise BodyError(413, f"decompressed body exceeds {limit} bytes", len(body))
        if not d.eof:  # a body cut short: its checksum was never seen, so nothing of it is trusted
            raise BodyError(400, f"body is not valid {encoding}: it ends before its end (truncated)", len(body))
        rest = d.unused_data
        if not rest.strip(b"\0"):  # zero padding after the last member, as gzip(1) tolerates
            return out
        if encoding == "deflate":
            raise BodyError(400, "body is not valid deflate: bytes follow the end of its stream", len(body))
