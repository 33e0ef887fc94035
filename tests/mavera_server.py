"""A Mavera-compatible HTTP server for the tests, on loopback, with switchable faults.

Mavera's documented behaviour: Bearer auth, ``{"error": {"message", "type", "code", "param"}}``,
cursor paging on ``GET /personas``, ``POST /personas`` (300 credits), ``PATCH /personas/{id}``, ``POST /mave/chat``
(at most 10 concurrent), and ``X-RateLimit-*`` headers. Faults are queued and consumed by the next matching request:

    server.fault("POST", "/personas", status=429, retry_after=1)
    server.fault("POST", "/personas", lose=True)      # create the persona, then drop the connection
    server.fault("POST", "/personas", status=503, lose=True)  # drop the connection before creating anything
    server.fault("PATCH", None, sleep=3)               # answer too late
    server.fault("GET", "/personas", status=503, skip=1, times=5)  # let one through, then fail the next five
    server.fault("POST", "/personas", lose=True, times=None)       # every create, for as long as the server runs
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from tests.conftest import LiveServer

API_KEY = "mvra_live_test_key"


@dataclass
class Fault:
    method: str
    path: str | None  # prefix; None matches any path
    status: int | None = None
    retry_after: float | None = None
    sleep: float = 0.0
    lose: bool = False
    message: str = "injected fault"
    skip: int = 0  # matching requests let through untouched before the fault applies
    times: int | None = 1  # matching requests it applies to; None: all of them
    page: bytes | None = None  # the work is done, then answered 200 with this (a gateway's HTML page), not JSON


@dataclass
class State:
    personas: dict[str, dict] = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    credits: int = 0
    chats_in_flight: int = 0
    max_chats_seen: int = 0
    chat_delay: float = 0.0
    threads: set[str] = field(default_factory=set)  # Mave chat threads: a chat naming another one is a 404
    ids: Any = field(default_factory=lambda: itertools.count(1))


def _error(status: int, message: str, kind: str, code: str, param: str | None = None) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": kind, "code": code, "param": param}}


class MaveraServer:
    def __init__(self, rate_limit: int = 600) -> None:
        self.state = State()
        self.lock = threading.Lock()
        self.rate_limit = rate_limit
        self.live = LiveServer(self.app, log_level="error", interface="asgi3")

    @property
    def url(self) -> str:
        return self.live.url + "/api/v1"

    def fault(self, method: str, path: str | None = None, **kw: Any) -> None:
        with self.lock:
            self.state.faults.append(Fault(method, path, **kw))

    def calls(self, method: str | None = None, path: str | None = None) -> list[dict]:
        with self.lock:
            return [r for r in self.state.requests
                    if (method is None or r["method"] == method) and (path is None or r["path"].startswith(path))]

    def named(self, name: str) -> list[dict]:
        with self.lock:
            return [p for p in self.state.personas.values() if p["name"] == name]

    def __enter__(self) -> MaveraServer:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(*exc)

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for i, f in enumerate(self.state.faults):
                if f.method == method and (f.path is None or path.startswith(f.path)):
                    if f.skip:
                        f.skip -= 1
                        return None
                    if f.times is not None:
                        f.times -= 1
                        if f.times <= 0:
                            self.state.faults.pop(i)
                    return f
        return None

    async def app(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        method, path = scope["method"], scope["path"].removeprefix("/api/v1")
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        try:
            doc = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            doc = None
        with self.lock:
            self.state.requests.append({"method": method, "path": path, "json": doc, "at": time.time(),
                                        "query": scope["query_string"].decode()})
            remaining = max(0, self.rate_limit - len(self.state.requests))
        extra = {"x-ratelimit-limit": str(self.rate_limit), "x-ratelimit-remaining": str(remaining),
                 "x-ratelimit-reset": str(int(time.time()) + 60)}
        fault = self._take_fault(method, path)
        if fault and fault.sleep:
            await asyncio.sleep(fault.sleep)
        if headers.get("authorization") != f"Bearer {API_KEY}":
            status, out = _error(401, "Invalid API key", "authentication_error", "invalid_api_key")
        elif fault and fault.status:
            kind = {429: "rate_limit_error", 402: "insufficient_credits"}.get(fault.status, "api_error")
            status, out = _error(fault.status, fault.message, kind, kind)
            if fault.retry_after is not None:
                extra["retry-after"] = str(fault.retry_after)
        else:
            status, out = await self._handle(method, path, scope["query_string"].decode(), doc)
        if fault and fault.lose:  # the work above happened; the client never hears about it
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")]})
            raise ConnectionAbortedError("test server drops the connection on purpose")
        if fault and fault.page is not None:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/html")]})
            await send({"type": "http.response.body", "body": fault.page})
            return
        payload = orjson.dumps(out)
        hdrs = [(b"content-type", b"application/json")] + [(k.encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": payload})

    async def _handle(self, method: str, path: str, query: str, doc: Any) -> tuple[int, Any]:
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        if method == "GET" and path == "/personas":
            limit = min(100, int(params.get("limit", "20")))
            with self.lock:
                items = list(self.state.personas.values())
            start = int(params["cursor"].removeprefix("c")) if params.get("cursor") else 0
            page = items[start:start + limit]
            more = start + limit < len(items)
            return 200, {"object": "list", "data": page, "has_more": more,
                         "next_cursor": f"c{start + limit}" if more else None}
        if method == "POST" and path == "/personas":
            problem = _validate(doc, partial=False)
            if problem:
                return _error(400, problem, "invalid_request_error", "invalid_parameter")
            with self.lock:
                pid = f"per_{next(self.state.ids)}"
                persona = {"id": pid, "object": "custom_persona", **doc, "credits_charged": 300}
                self.state.personas[pid] = persona
                self.state.credits += 300
            return 200, persona
        if method == "PATCH" and path.startswith("/personas/"):
            pid = path.rsplit("/", 1)[1]
            problem = _validate(doc, partial=True)
            if problem:
                return _error(400, problem, "invalid_request_error", "invalid_parameter")
            with self.lock:
                if pid not in self.state.personas:
                    return _error(404, f"Persona {pid} not found", "invalid_request_error", "not_found")
                self.state.personas[pid].update(doc)
                return 200, self.state.personas[pid]
        if method == "POST" and path == "/mave/chat":
            with self.lock:
                if self.state.chats_in_flight >= 10:
                    return _error(429, "Too many concurrent chats", "rate_limit_error", "concurrency_limit")
                self.state.chats_in_flight += 1
                self.state.max_chats_seen = max(self.state.max_chats_seen, self.state.chats_in_flight)
            try:
                await asyncio.sleep(self.state.chat_delay)
                thread = (doc or {}).get("thread_id") or f"thr_{next(self.state.ids)}"
                with self.lock:
                    if (doc or {}).get("thread_id") and thread not in self.state.threads:
                        return _error(404, f"Thread {thread} not found", "invalid_request_error", "not_found")
                    self.state.threads.add(thread)
                return 200, {"id": f"msg_{next(self.state.ids)}", "thread_id": thread, "role": "assistant",
                             "content": "Unified persona framework: " + str((doc or {}).get("message", ""))[:80],
                             "sources": [], "personas_used": [], "usage": {"credits_used": 5}}
            finally:
                with self.lock:
                    self.state.chats_in_flight -= 1
        return _error(404, f"No route {method} {path}", "invalid_request_error", "not_found")


def _validate(doc: Any, partial: bool) -> str | None:
    if not isinstance(doc, dict):
        return "body must be a JSON object"
    name = doc.get("name")
    if (not partial or name is not None) and not (isinstance(name, str) and 2 <= len(name) <= 100):
        return "name must be 2-100 characters"
    if "pipeline_type" in doc and doc["pipeline_type"] not in ("north_star", "intermediate", "advanced"):
        return "pipeline_type must be north_star, intermediate or advanced"
    if "type" in doc and doc["type"] not in ("B2B", "B2C"):
        return "type must be B2B or B2C"
    return None
