"""Redis CPU per event of the apply script alone: no web, no wrk, so two script versions compare side by side.

Events like the `batch` scenario's (track calls of 50,000 known users, with receivedAt and a web channel) are
applied through ``SyncStore`` in bodies of 1,000, as the receiver does, to an embedded redis-server (AOF on or off).
Redis CPU (``INFO cpu``, user + sys) over the measured events, divided by their number, is the figure; the wall
time gives the events/s one client achieves. Run: ``python -m bench.apply_cost --runs 3 [--aof]``.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import tempfile
import time

import orjson
import redis

from service.config import Settings
from service.devstack.redis_server import EmbeddedRedis
from service.spec.events import iso_ms, normalise
from service.spec.identity import IdentityRules
from service.spec.keys import Keys
from service.state import store
from service.state.store import Applier, SyncStore

USERS = 50_000
BODY = 1_000
FILL_SHARDS = 2_048  # with --dedupe-fill: fewer shards than the default, at the same density (ids per shard)
DAY_OF_IDS = 659  # ids per dedupe set of a full bucket: 1,000 events/s for 12 h over the default 65,536 sets


def events(start: int, n: int, now: int, rules: IdentityRules, traits: bool = False, new: bool = False) -> list:
    """``n`` track calls as bench/batch.lua writes them, numbered from ``start``; (Event, raw) pairs. ``traits``:
    identify calls with two traits instead (last-write-wins per trait, on top of what a page view does); ``new``:
    each the first event of a new anonymous visitor (a new profile: the script's general path)."""
    out = []
    for c in range(start, start + n):
        at = now - 2_000 - (c % 60) * 1_000  # live data: a few seconds old (see bench/report.lua's event_times)
        raw = {"type": "track", "event": "Page Viewed", "userId": f"u{c % USERS}", "messageId": f"m-{c}",
               "timestamp": iso_ms(at), "receivedAt": iso_ms(at + 1_250),
               "properties": {"path": "/p"}, "context": {"library": {"name": "analytics.js"}}}
        if traits:
            raw.update(type="identify", traits={"plan": f"plan-{c % 3}", "visits": c})
            del raw["event"], raw["properties"]
        if new:
            del raw["userId"]
            raw["anonymousId"] = f"visitor-{c}"
        out.append((normalise(raw, now, rules), orjson.dumps(raw)))
    return out


def fill_dedupe(client: redis.Redis, settings: Settings, space: str, per_shard: int, now: int) -> int:
    """Remember ``per_shard`` random ids in every dedupe shard of the window's two older buckets and half as many in
    the current one: the state a space reaches after a day of traffic (the default 65,536 shards hold 659 ids each
    at 1,000 events/s), which is what a lookup's cost depends on. Returns the ids written."""
    rng = random.Random(per_shard)
    keys, bucket = Keys(space), now // 1000 // Applier(settings).bucket_width
    pipe, written = client.pipeline(transaction=False), 0
    for b, n in ((bucket - 2, per_shard), (bucket - 1, per_shard), (bucket, per_shard // 2)):
        for shard in range(settings.dedupe_shards):
            if n:  # sorted, so that each one is appended
                pipe.sadd(keys.dedupe(b, shard), *sorted(rng.getrandbits(64) - 2**63 for _ in range(n)))
                written += n
            if len(pipe) >= 256:
                pipe.execute()
    pipe.execute()
    return written


def cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def use_script(path: str) -> None:
    """Apply with another version of apply.lua (to compare two side by side)."""
    text = open(path).read()
    store.SCRIPT, store.SCRIPT_SHA = text, hashlib.sha1(text.encode()).hexdigest()


def run(aof: bool, measured: int, url: str | None = None, pause: bool = False, body: int = BODY,
        traits: bool = False, new: bool = False, deletions: int = 0, fill: int = 0) -> dict[str, float]:
    """Known users first (not measured), then ``measured`` events of the same users. ``url``: a running Redis to
    use (flushed first; e.g. one under ``valgrind --tool=callgrind``, for instruction counts); ``pause``: wait for
    Enter before and after the measured events (to zero and dump such counts)."""
    if url:
        return measure(redis.Redis.from_url(url), measured, pause, body, traits, new, deletions, fill)
    with tempfile.TemporaryDirectory(prefix="sps-apply-") as tmp, EmbeddedRedis(tmp, persistent=aof) as server:
        return measure(redis.Redis.from_url(server.url), measured, pause, body, traits, new, deletions, fill)


def measure(client: redis.Redis, measured: int, pause: bool, body: int = BODY,
            traits: bool = False, new: bool = False, deletions: int = 0, fill: int = 0) -> dict[str, float]:
    client.flushall()
    settings = Settings(dedupe_shards=FILL_SHARDS) if fill else Settings()
    rules = IdentityRules.from_settings(settings)
    now = int(time.time() * 1000)
    store = SyncStore(client, settings)
    warm = events(0, USERS, now, rules)
    for i in range(0, len(warm), BODY):
        store.apply("default", warm[i:i + BODY], now=now)
    gone = [{"type": "delete", "userId": f"gone-{n}", "messageId": f"gone-{n}", "timestamp": iso_ms(now - 86_400_000)}
            for n in range(deletions)]  # GDPR deletions of other people, a day earlier
    if gone:
        store.apply("default", [(normalise(raw, now, rules), orjson.dumps(raw)) for raw in gone], now=now)
    if fill:
        fill_dedupe(client, settings, "default", fill, now)
    todo = events(USERS, measured, now, rules, traits, new)
    if pause:
        input("warmed up: press Enter to apply the measured events")
    before, t0 = cpu(client), time.perf_counter()
    for i in range(0, len(todo), body):
        out = store.apply("default", todo[i:i + body], now=now)
        assert all(o.status == "ok" for o in out), out[0]
    wall, used = time.perf_counter() - t0, cpu(client) - before
    if pause:
        input("applied: press Enter to finish")
    return {"redis_us_per_event": used / measured * 1e6, "events_per_s": measured / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--events", type=int, default=50_000, help="measured events per run")
    p.add_argument("--aof", action="store_true", help="append-only file on (appendfsync everysec), as in production")
    p.add_argument("--body", type=int, default=BODY, help="events per apply (1: as single-event requests)")
    p.add_argument("--url", help="a running Redis to use instead of an embedded one (it is flushed)")
    p.add_argument("--pause", action="store_true", help="wait for Enter around the measured events")
    p.add_argument("--script", help="another apply.lua to measure instead of the package's")
    p.add_argument("--traits", action="store_true", help="identify calls with two traits")
    p.add_argument("--new", action="store_true", help="first events of new visitors (the script's general path)")
    p.add_argument("--deletions", type=int, default=0,
                   help="GDPR deletions of other users a day earlier (as a space in production has)")
    p.add_argument("--dedupe-fill", type=int, default=0, metavar="IDS",
                   help="ids per dedupe shard remembered before measuring (659: a day at 1,000 events/s)")
    args = p.parse_args(argv)
    if args.script:
        use_script(args.script)
    runs = [run(args.aof, args.events, args.url, args.pause, args.body, args.traits, args.new, args.deletions,
                args.dedupe_fill) for _ in range(args.runs)]
    for r in runs:
        print(f"  {r['redis_us_per_event']:.1f} µs/event Redis, {r['events_per_s']:,.0f} events/s (one client)")
    print(f"median: {statistics.median(r['redis_us_per_event'] for r in runs):.1f} µs/event Redis CPU, "
          f"{statistics.median(r['events_per_s'] for r in runs):,.0f} events/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
