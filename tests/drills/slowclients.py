"""Misbehaving clients (idle sockets, half-sent request lines, bodies trickled a few bytes at a time, a huge header)
and a well-behaved client timed meanwhile. Shared by ``test_slow_clients.py`` and ``bench/drill_slow_clients.py``."""

from __future__ import annotations

import socket
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx
import orjson

from tests.drills.stack import signed_headers

OVERSIZED_HEADER_BYTES = 100 * 1024


@dataclass
class Adversaries:
    """While open: ``idle`` sockets that send nothing, ``partial`` that send half a request line, ``trickle``
    requests whose declared 4 KB body arrives 3 bytes every 0.25 s, and one request with a 100 KB header."""

    host: str
    port: int
    idle: int = 300
    partial: int = 50
    trickle: int = 10
    oversized: bool = True
    sockets: list[socket.socket] = field(default_factory=list)
    oversized_outcome: str = ""  # "HTTP 431", "closed", "timeout", ... once answered
    oversized_seconds: float = 0.0
    trickle_closed_early: int = 0  # trickled requests the server dropped or answered before their body was sent
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def connect(self) -> socket.socket:
        s = socket.create_connection((self.host, self.port), timeout=30)
        self.sockets.append(s)
        return s

    def __enter__(self) -> Adversaries:
        for _ in range(self.idle):
            self.connect()
        for i in range(self.partial):
            self.connect().sendall(b"POST /segment HTT" if i % 2 else b"POST /segment HTTP/1.1\r\nHost: drill\r\nX-")
        tricklers = []
        for _ in range(self.trickle):
            s = self.connect()
            s.sendall(b"POST /segment HTTP/1.1\r\nHost: drill\r\nContent-Type: application/json\r\n"
                      b"X-Signature: 0\r\nContent-Length: 4096\r\n\r\n")
            tricklers.append(s)
        self._threads.append(threading.Thread(target=self._trickle, args=(tricklers,), daemon=True))
        if self.oversized:
            self._threads.append(threading.Thread(target=self._oversized, daemon=True))
        for t in self._threads:
            t.start()
        return self

    def _trickle(self, sockets: list[socket.socket]) -> None:
        open_ = list(sockets)
        while open_ and not self._stop.wait(0.25):
            for s in list(open_):
                try:
                    s.sendall(b'{"a')
                except OSError:
                    open_.remove(s)
                    self.trickle_closed_early += 1

    def _oversized(self) -> None:
        start = time.monotonic()
        s = socket.create_connection((self.host, self.port), timeout=30)
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: drill\r\nX-Oversized: " + b"a" * OVERSIZED_HEADER_BYTES +
                      b"\r\n\r\n")
            line = s.recv(64)
            self.oversized_outcome = "closed" if not line else line.split(b"\r\n")[0].decode(errors="replace")
        except TimeoutError:
            self.oversized_outcome = "timeout"
        except OSError as exc:  # reset while sending or reading: the server closed it
            self.oversized_outcome = f"closed ({type(exc).__name__})"
        finally:
            self.oversized_seconds = time.monotonic() - start
            s.close()

    def wait_oversized(self, seconds: float = 60.0) -> str:
        for t in self._threads[1:]:
            t.join(seconds)
        return self.oversized_outcome

    def still_open(self) -> int:
        """How many of the idle and partial sockets the server still holds open (a closed one reads EOF)."""
        alive = 0
        for s in self.sockets[: self.idle + self.partial]:
            s.setblocking(False)
            try:
                alive += s.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        return alive

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for s in self.sockets:
            s.close()


@dataclass
class Timed:
    latencies: list[float]
    failures: list[str]

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")

    @property
    def p99(self) -> float:
        return self.quantile(0.99)


def normal_requests(url: str, n: int, clients: int = 2, fresh_connections: bool = False, timeout: float = 30.0,
                    tag: str = "") -> Timed:
    """``n`` signed single events from ``clients`` threads, each timed; ``fresh_connections``: one connection per
    request (so new connections must be accepted too), else keep-alive."""
    tag = tag or uuid.uuid4().hex[:8]
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def run(worker: int) -> None:
        with httpx.Client(timeout=timeout) as client:
            for i in range(worker, n, clients):
                event = {"type": "identify", "userId": f"normal-{i % 50}", "messageId": f"normal-{tag}-{i}",
                         "timestamp": "2026-03-03T00:00:00Z", "traits": {"i": i}}
                body = orjson.dumps(event)
                start = time.perf_counter()
                try:
                    headers = signed_headers(body)
                    if fresh_connections:
                        headers["connection"] = "close"  # the server closes it: the next request connects anew
                    resp = client.post(f"{url}/segment", content=body, headers=headers)
                    outcome = "" if resp.status_code == 200 else f"HTTP {resp.status_code}"
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    if outcome:
                        failures.append(outcome)
                    if len(failures) >= 3:  # the server is not serving: stop here rather than wait out every timeout
                        return

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Timed(latencies, failures)
