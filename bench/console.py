"""The console's overview page at scale: response time with N profiles in Redis (default a million).

Profiles are written straight in the stored layout by a Lua script, 50,000 per call — a profile hash, its two
identifier keys and its contribution — with an hour of per-minute rate counters, dead letters and cluster
documents, so that a million load in well under a minute (the apply path has its own benchmark). Then
`persona-sync web` (two processes, as `make run`) serves the overview to a logged-in client, one request at a
time: median and p95 of ``--requests`` requests, after a warm-up. Redis' command statistics of the run show that
the page never scanned (no SCAN, KEYS or their hash and set kinds).

    python -m bench.console --profiles 1000000 --requests 200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import httpx
import orjson
import redis

from service.devstack.redis_server import EmbeddedRedis
from service.spec.keys import SPACES_KEY, Keys
from service.spec.rates import MINUTE_MS

TOKEN = "bench-admin-token"
SCANS = {"scan", "keys", "hscan", "sscan", "zscan"}
# ARGV: prefix, first index, last index, now ms. Writes what a live profile leaves: its hash, identifiers, and
# the contribution the last refresh recorded for it (what the overview's profile count reads: HLEN).
FILL = """
local P, first, last, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
for i = first, last do
  local pid = 'use_' .. i
  redis.call('HSET', P .. 'p:' .. pid, 'm:fs', now, 'm:ls', now, 'm:ca', now, 'm:ua', now,
             'x:user_id:u-' .. i, now .. '|m' .. i, 'x:email:u' .. i .. '@example.com', now .. '|m' .. i,
             't:plan', '"pro"', 'T:plan', now, 't:ltv', tostring(i % 3000), 'T:ltv', now)
  redis.call('SET', P .. 'i:user_id:u-' .. i, pid)
  redis.call('SET', P .. 'i:email:u' .. i .. '@example.com', pid)
  redis.call('HSET', P .. 'w:contrib', pid, '{"cluster":"new","pattern":"omnichannel"}')
end
return last - first + 1
"""


def fill(client: redis.Redis, space: str, n: int, now_ms: int) -> float:
    """N profiles and what the overview reads; seconds taken."""
    keys = Keys(space)
    started = time.monotonic()
    script = client.register_script(FILL)
    for first in range(1, n + 1, 50_000):
        script(args=[keys.prefix, first, min(n, first + 49_999), now_ms])
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.seq, n)
    pipe.sadd(SPACES_KEY, space)
    for minute in range(now_ms // MINUTE_MS - 60, now_ms // MINUTE_MS + 1):
        pipe.hset(keys.rates(minute), mapping={"accepted": 60_000 + minute % 7 * 900, "duplicate": 300,
                                               "rejected": 2})
    for _ in range(200):
        pipe.xadd(keys.dead_letters, {"reason": "bench", "source": "webhook", "at": now_ms, "raw": b'{"type":"x"}'})
    for cluster in ("high_value", "growth", "at_risk", "new"):
        pipe.hset(keys.clusters, cluster, orjson.dumps({"cluster": cluster, "label": cluster, "n": n // 4}))
        pipe.hset(keys.personas, cluster, orjson.dumps({"state": "synced", "mavera_id": f"p-{cluster}",
                                                        "last_sync_ms": now_ms}))
    pipe.hset(keys.recompute_runs, mapping={"full": orjson.dumps({"at_ms": now_ms, "seconds": 45.0, "profiles": n})})
    pipe.execute()
    return time.monotonic() - started


def measure(url: str, requests: int) -> list[float]:
    """Milliseconds per overview request of a logged-in client, one at a time, after a warm-up."""
    with httpx.Client(base_url=url, timeout=30) as client:
        client.post("/console/login", data={"token": TOKEN})
        assert client.cookies, "login failed"
        for _ in range(10):
            client.get("/console").raise_for_status()
        times = []
        for _ in range(requests):
            started = time.perf_counter()
            resp = client.get("/console")
            times.append((time.perf_counter() - started) * 1000)
            assert resp.status_code == 200 and "Events per second" in resp.text
    return times


def run(profiles: int = 1_000_000, requests: int = 200) -> dict:
    from bench.run import free_port, start_web

    with tempfile.TemporaryDirectory(prefix="sps-bench-console-") as tmp:
        server = EmbeddedRedis(tmp, persistent=False).start()
        web = None
        try:
            client = redis.Redis.from_url(server.url)
            now = int(time.time() * 1000)
            load_s = fill(client, "default", profiles, now)
            used = int(client.info("memory")["used_memory"])
            port = free_port()
            web = start_web(port, 2, REDIS_URL=server.url, ADMIN_TOKEN=TOKEN, SEGMENT_SHARED_SECRETS="",
                            SEGMENT_WRITE_KEYS="")
            client.config_resetstat()
            times = measure(f"http://127.0.0.1:{port}", requests)
            commands = {k.removeprefix("cmdstat_") for k in client.info("commandstats")}
            return {"profiles": profiles, "dbsize": client.dbsize(), "redis_used_mb": round(used / 2**20),
                    "load_seconds": round(load_s, 1), "requests": requests,
                    "median_ms": round(statistics.median(times), 2),
                    "p95_ms": round(statistics.quantiles(times, n=20)[18], 2), "max_ms": round(max(times), 2),
                    "scanned": sorted(commands & SCANS), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
        finally:
            if web is not None:
                web.terminate()
                web.wait(20)
            server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", type=int, default=1_000_000)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--runs", type=int, default=1, help="repeat the whole measurement (a fresh Redis each time)")
    args = p.parse_args(argv)
    for _ in range(args.runs):
        print(json.dumps(run(args.profiles, args.requests)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
