"""Recompute at scale: full recompute of N synthetic profiles, then refreshes with 1 % and 10 % of them dirty.

Profiles are written straight in the stored layout (service/spec/keys.py) with pipelined HSETs — the apply path has its
own benchmark — so that a million of them load in seconds. Reports time, the worker's peak RSS and Redis bytes per
profile (profile hash + identifier index + contribution).

    python -m bench.recompute --profiles 100000 1000000
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time

import orjson
import redis

from service.config import Settings
from service.devstack.redis_server import EmbeddedRedis
from service.spec.keys import DAY_MS, Keys
from workers.recompute import full_recompute, refresh

PLANS, INDUSTRIES, CATS = ["free", "pro", "enterprise"], ["SaaS", "Retail", "Media", "Health"], ["books", "toys",
                                                                                                  "tech", "garden"]


def profile_fields(rnd: random.Random, i: int, now_ms: int) -> dict:
    ts = now_ms - rnd.randint(0, 200) * DAY_MS
    f = {"m:fs": ts, "m:ls": ts, "m:fm": f"m{i}", "m:lm": f"m{i}", "m:ca": ts, "m:ua": ts, "m:merges": 0,
         "m:n": '{"user_id":1,"email":1}', f"x:user_id:user-{i}": f"{ts}|m{i}",
         f"x:email:user{i}@example.com": f"{ts}|m{i}",
         "t:plan": orjson.dumps(rnd.choice(PLANS)), "T:plan": ts,
         "t:industry": orjson.dumps(rnd.choice(INDUSTRIES)), "T:industry": ts}
    if rnd.random() < 0.7:
        f["t:ltv"], f["T:ltv"] = rnd.randint(0, 3000), ts
        f["t:churn_risk"], f["T:churn_risk"] = round(rnd.random() * 0.6, 3), ts
    for k in range(rnd.randint(0, 4)):
        f[f"o:o{i}-{k}"] = f"{ts - k * DAY_MS}|{rnd.randint(5, 400)}.{rnd.randint(0, 99):02d}|{rnd.choice(CATS)}"
    for ch in ("web", "mobile", "email"):
        if rnd.random() < 0.5:
            f[f"a:{ch}:{now_ms // DAY_MS - rnd.randint(0, 20)}"] = rnd.randint(1, 2**20)
    return f


def load(client: redis.Redis, keys: Keys, n: int, now_ms: int) -> None:
    rnd = random.Random(1)
    for start in range(0, n, 5000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(n, start + 5000)):
            pid = f"use_{i + 1}"
            pipe.hset(keys.profile(pid), mapping=profile_fields(rnd, i, now_ms))
            pipe.set(keys.ident("user_id", f"user-{i}"), pid)
            pipe.set(keys.ident("email", f"user{i}@example.com"), pid)
        pipe.execute()


def touch(client: redis.Redis, keys: Keys, n: int, fraction: float, now_ms: int) -> int:
    """Change ``fraction`` of the profiles (new ltv) and mark them dirty, as the receiver would."""
    rnd = random.Random(int(fraction * 1000))
    chosen = rnd.sample(range(n), int(n * fraction))
    for start in range(0, len(chosen), 5000):
        pipe = client.pipeline(transaction=False)
        for i in chosen[start:start + 5000]:
            pid = f"use_{i + 1}"
            pipe.hset(keys.profile(pid), mapping={"t:ltv": rnd.randint(0, 3000), "T:ltv": now_ms})
            pipe.sadd(keys.dirty, pid)
        pipe.execute()
    return len(chosen)


def run(n: int, processes: int | None = None) -> dict:
    settings = Settings()
    keys = Keys("bench")
    now_ms = int(time.time() * 1000)
    with tempfile.TemporaryDirectory(prefix="sps-rc-") as d, EmbeddedRedis(d, persistent=False) as server:
        client = redis.Redis.from_url(server.url)
        base = client.info("memory")["used_memory"]
        t = time.perf_counter()
        load(client, keys, n, now_ms)
        loaded = time.perf_counter() - t
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        full = full_recompute(client, settings, "bench", now_ms=now_ms, processes=processes)
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the forked recompute processes
        used = client.info("memory")["used_memory"] - base
        out = {"profiles": n, "load_s": round(loaded, 1), "full_recompute_s": full["seconds"],
               "processes": full["processes"], "peak_rss_mb": round(rss_after / 1024),
               "peak_child_rss_mb": round(child_rss / 1024), "rss_growth_mb": round((rss_after - rss_before) / 1024),
               "redis_bytes_per_profile": round(used / n)}
        for fraction in (0.01, 0.10):
            dirty = touch(client, keys, n, fraction, now_ms)
            report = refresh(client, settings, "bench", now_ms=now_ms)
            assert report["profiles"] == dirty
            out[f"refresh_{int(fraction * 100)}pct_s"] = report["seconds"]
            out[f"refresh_{int(fraction * 100)}pct_profiles"] = dirty
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.recompute", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", type=int, nargs="+", default=[100_000], help="profile counts to measure")
    p.add_argument("--processes", type=int, help="processes of the full recompute (default: one per core, up to 4)")
    args = p.parse_args(argv)
    for n in args.profiles:
        print(orjson.dumps(run(n, args.processes)).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
