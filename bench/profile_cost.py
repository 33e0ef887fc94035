"""CPU cost of one profile in a full recompute, without Redis: decode → features → cluster, pattern, contribution →
aggregates → stored JSON, over N synthetic profiles fetched once the way the recompute's connection fetches them
(replies decoded by hiredis).

    python -m bench.profile_cost --profiles 20000 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import orjson
import redis

from bench.recompute import load
from service.config import Settings
from service.devstack.redis_server import EmbeddedRedis
from service.spec.keys import Keys
from service.spec.profile import decode_profile
from workers.compute.features import TRAITS_USED
from workers.recompute import _encode, _move, entry_of, profile_ids, rules_for


def run(n: int, runs: int) -> dict:
    settings, keys, now_ms = Settings(), Keys("bench"), int(time.time() * 1000)
    with tempfile.TemporaryDirectory(prefix="sps-pc-") as d, EmbeddedRedis(d, persistent=False) as server:
        load(redis.Redis.from_url(server.url), keys, n, now_ms)
        pids = [pid for chunk in profile_ids(redis.Redis.from_url(server.url), keys) for pid in chunk]
        pipe = redis.Redis.from_url(server.url, decode_responses=True, encoding_errors="replace").pipeline(False)
        for pid in pids:
            pipe.hgetall(keys.profile(pid))
        raws = list(zip(pids, pipe.execute(), strict=True))
    rules, times = rules_for(settings), []
    for _ in range(runs):
        started = time.perf_counter()
        clusters: dict = {}
        patterns: dict = {}
        for pid, raw in raws:
            entry = entry_of(decode_profile(pid, raw, TRAITS_USED, detail=False), {}, rules, settings, now_ms)
            _move(clusters, patterns, None, entry)
            _encode(entry)
        times.append((time.perf_counter() - started) / n * 1e6)
    return {"profiles": n, "us_per_profile": round(statistics.median(times), 1), "runs": [round(t, 1) for t in times]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", type=int, default=20_000, help="synthetic profiles (default 20,000)")
    p.add_argument("--runs", type=int, default=5, help="timed passes; the median is reported (default 5)")
    args = p.parse_args(argv)
    print(orjson.dumps(run(args.profiles, args.runs)).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
