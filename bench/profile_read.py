"""Profile API read latency: p50 / p99 of ``/traits`` reads, alone and beside concurrent single-event ingest.

20,000 profiles are written first (the ``single`` scenario's users). Reads come at 100 requests/s, Segment's
Profile API limit per space (one wrk connection, 10 ms apart, PROFILE_API_RATE_LIMIT off so that no read is
refused), each of a random user, while ingest runs beside them: none, paced as `make bench`'s ``paced`` scenario
(~1,800 requests/s), and at full speed (the ``single`` scenario, which leaves no CPU idle on this machine); the
reads go to the web that takes the ingest, then to a web process of their own (as a deployment that routes
``/v1/spaces/`` to its own processes would).

    python -m bench.profile_read [--runs 3] [--seconds 10]
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import threading
import time

from bench.run import Stack, free_port, start_web, wrk

TOKEN = "bench-profile-token"
READ_ENV = {"BENCH_DELAY_MS": "10", "BENCH_PROFILE_AUTH": base64.b64encode(f"{TOKEN}:".encode()).decode()}
INGEST = {"none": None, "paced": {"BENCH_DELAY_MS": "10"}, "full speed": {}}


class ReadWeb:
    """A ``persona-sync web`` of its own for the reads (one worker, another port), beside the stack's two."""

    def __init__(self, stack: Stack) -> None:
        self.stack, self.port = stack, free_port()

    def __enter__(self) -> ReadWeb:
        self.proc = start_web(self.port, 1, REDIS_URL=self.stack.redis.url, PROFILE_API_TOKEN=TOKEN,
                              PROFILE_API_RATE_LIMIT="0")
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def one(stack: Stack, seconds: int, ingest: dict[str, str] | None, read_port: int | None = None) -> dict:
    """One read run of ``seconds``, with ingest (wrk, single.lua) running over the same seconds when asked;
    ``read_port``: the reads go to that web instead of the stack's."""
    side: dict = {}
    if ingest is not None:
        conns = 24 if ingest else 32
        t = threading.Thread(target=lambda: side.update(wrk(stack, "single.lua", 1, conns, seconds + 2,
                                                             f"pr{time.time_ns()}", env=ingest)))
        t.start()
        time.sleep(1)  # ingest is under way before the first read
    reads = wrk(stack, "profile_read.lua", 1, 1, seconds, "read", env=READ_ENV, port=read_port)
    if ingest is not None:
        t.join()
    reads["ingest_rps"] = side.get("rps", 0.0)
    return reads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=int, default=10)
    args = p.parse_args(argv)
    with Stack(2, env={"PROFILE_API_TOKEN": TOKEN, "PROFILE_API_RATE_LIMIT": "0"}) as stack:
        wrk(stack, "single.lua", 1, 32, 8, "seed")  # 20,000 users with traits, orders and activity
        with ReadWeb(stack) as read_web:
            for where, port in (("the same web", None), ("a web of their own", read_web.port)):
                for name, ingest in INGEST.items():
                    runs = [one(stack, args.seconds, ingest, port) for _ in range(args.runs)]
                    med = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50_us", "p99_us", "ingest_rps")}
                    errors = sum(r["status_errors"] + r["socket_errors"] for r in runs)
                    p99s = [round(r["p99_us"] / 1000, 2) for r in runs]
                    print(f"reads on {where}, ingest {name}: reads {med['rps']:.0f}/s, p50 {med['p50_us'] / 1000:.2f} "
                          f"ms, p99 {med['p99_us'] / 1000:.2f} ms (runs {p99s}), ingest {med['ingest_rps']:.0f} req/s, "
                          f"read errors {errors}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
