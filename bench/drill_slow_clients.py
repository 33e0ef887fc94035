"""Latency of normal requests with and without slow and idle clients (the slow-clients drill, measured).

    python -m bench.drill_slow_clients [--runs 3] [--requests 1000] [--web-workers 2]

Each run starts a fresh stack (embedded redis-server with AOF everysec, `persona-sync web`), warms it up, then times
``--requests`` signed single-event posts from 2 keep-alive clients and as many on a new connection per request:
first alone, then while 300 idle sockets, 50 half-sent request lines, 10 bodies trickled 3 bytes every 0.25 s and
one 100 KB header are open (tests/drills/slowclients.py). Prints p50/p99 of each, the median over the runs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics

from tests.drills.slowclients import Adversaries, Timed, normal_requests
from tests.drills.stack import Redis, Web, short_tmpdir


def one_run(requests: int, web_workers: int, run: int) -> dict[str, float]:
    d = short_tmpdir("sps-bench-slow-")
    redis_server = Redis(d, persistent=True).start()
    web = Web(redis_server.url, concurrency=web_workers)
    try:
        web.start()
        normal_requests(web.url, 200, tag=f"warm{run}")
        out: dict[str, float] = {}

        def record(name: str, timed: Timed) -> None:
            if timed.failures:
                raise SystemExit(f"{name}: {len(timed.failures)} failed requests: {timed.failures[:5]}")
            out[f"{name} p50"] = timed.p50 * 1000
            out[f"{name} p99"] = timed.p99 * 1000

        record("alone keep-alive", normal_requests(web.url, requests, tag=f"a{run}"))
        record("alone new-conn", normal_requests(web.url, requests, fresh_connections=True, tag=f"b{run}"))
        with Adversaries("127.0.0.1", web.port) as bad:
            record("slow+idle keep-alive", normal_requests(web.url, requests, tag=f"c{run}"))
            record("slow+idle new-conn", normal_requests(web.url, requests, fresh_connections=True, tag=f"d{run}"))
            bad.wait_oversized(60)
            print(f"  run {run}: 100 KB header answered {bad.oversized_outcome!r}; "
                  f"{bad.still_open()} of {bad.idle + bad.partial} idle/partial sockets still held", flush=True)
        return out
    finally:
        web.stop()
        redis_server.stop()
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--requests", type=int, default=1000, help="normal requests per phase and connection mode")
    p.add_argument("--web-workers", type=int, default=2, help="WEB_CONCURRENCY (default 2, the product default)")
    args = p.parse_args()
    runs = []
    for i in range(args.runs):
        runs.append(one_run(args.requests, args.web_workers, i + 1))
        print(f"  run {i + 1}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in runs[-1].items()), flush=True)
    print(f"\nnormal requests ({args.requests} per phase, 2 clients, WEB_CONCURRENCY={args.web_workers}), "
          f"median of {args.runs} runs\n")
    print("| clients | p50 | p99 | p99 per run |\n|---|---|---|---|")
    for name in ("alone keep-alive", "slow+idle keep-alive", "alone new-conn", "slow+idle new-conn"):
        p50 = statistics.median(r[f"{name} p50"] for r in runs)
        p99 = statistics.median(r[f"{name} p99"] for r in runs)
        each = " / ".join(f"{r[f'{name} p99']:.1f}" for r in runs)
        print(f"| {name} | {p50:.1f} ms | {p99:.1f} ms | {each} |")


if __name__ == "__main__":
    main()
