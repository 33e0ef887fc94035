"""Drill: slow and idle clients do not stop the receiver serving everyone else.

300 sockets that connect and send nothing, 50 that send half a request line, 10 requests whose body trickles in
3 bytes every 0.25 s, and one request with a 100 KB header, all open at once against one uvicorn worker; meanwhile a
normal client's signed events (keep-alive, and one new connection per request) must all get their 200.
"""

from __future__ import annotations

import time

from tests.drills.slowclients import Adversaries, normal_requests


def test_slow_idle_and_oversized_clients_do_not_stop_service(start_redis, start_web) -> None:
    redis_server = start_redis(persistent=False)
    web = start_web(redis_server.url, concurrency=1)
    with Adversaries("127.0.0.1", web.port) as bad:
        keep_alive = normal_requests(web.url, 200, clients=2, timeout=10, tag="keepalive")
        fresh = normal_requests(web.url, 100, clients=2, fresh_connections=True, timeout=10, tag="fresh")
        oversized = bad.wait_oversized(60)
        held = bad.still_open()
        trickle_dropped = bad.trickle_closed_early
    ms = 1000
    print(f"\nwhile {bad.idle} idle, {bad.partial} partial and {bad.trickle} trickling connections were open: "
          f"keep-alive p50 {keep_alive.p50 * ms:.1f} ms p99 {keep_alive.p99 * ms:.1f} ms; "
          f"new connection p50 {fresh.p50 * ms:.1f} ms p99 {fresh.p99 * ms:.1f} ms; "
          f"oversized header: {oversized!r} after {bad.oversized_seconds:.2f} s; "
          f"idle/partial sockets still held by the server: {held}; trickled requests cut off: {trickle_dropped}")
    assert keep_alive.failures == [] and len(keep_alive.latencies) == 200
    assert fresh.failures == [] and len(fresh.latencies) == 100
    # the 100 KB header was answered, not left hanging, and did not break the server
    assert oversized and oversized != "timeout", oversized
    assert not oversized.startswith("HTTP/1.1 5"), oversized
    assert web.proc is not None and web.proc.poll() is None
    assert web.healthy()


def test_oversized_header_is_refused(start_redis, start_web) -> None:
    redis_server = start_redis(persistent=False)
    web = start_web(redis_server.url, concurrency=1)
    with Adversaries("127.0.0.1", web.port, idle=0, partial=0, trickle=0) as bad:
        outcome = bad.wait_oversized(60)
    assert outcome.startswith("HTTP/1.1 431"), outcome  # refused while reading (service/http/protocol.py)


IDLE_SHED_SECONDS = 30  # room for an idle or request-head timeout of up to ~25 s


def test_idle_connections_past_the_fd_limit_do_not_lock_clients_out(start_redis, start_web) -> None:
    """300 idle sockets against a web limited to 256 file descriptors (a small stand-in for a real limit and a larger
    flood): within 30 s the server must shed idle connections and serve a normal client again."""
    redis_server = start_redis(persistent=False)
    web = start_web(redis_server.url, concurrency=1, nofile=256)
    with Adversaries("127.0.0.1", web.port, idle=300, partial=0, trickle=0, oversized=False):
        deadline = time.monotonic() + IDLE_SHED_SECONDS
        outcomes = []
        while time.monotonic() < deadline:
            result = normal_requests(web.url, 1, clients=1, timeout=3, tag=f"fd{len(outcomes)}")
            outcomes.append(result.failures[0] if result.failures else "200")
            if outcomes[-1] == "200":
                break
            time.sleep(0.5)
    print(f"\nnormal requests while 300 idle sockets held a 256-fd web: {outcomes}")
    assert outcomes[-1] == "200", f"no request served within {IDLE_SHED_SECONDS} s: {outcomes[-5:]}"
