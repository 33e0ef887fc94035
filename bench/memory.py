"""Redis bytes per remembered messageId and per profile, measured with MEMORY USAGE on a real redis-server.

Dedupe is measured through the real apply script at production density: with DEDUPE_SHARDS shards and two
buckets per window, 1,000 events/s for 24 h puts ~43.2M ids in a bucket, ~660 per shard; the run below uses fewer
shards so that its ids reach that density too.
"""

from __future__ import annotations

import tempfile
import time

import orjson
import redis

from service.config import Settings
from service.devstack.redis_server import EmbeddedRedis
from service.spec.events import normalise
from service.spec.identity import IdentityRules
from service.spec.keys import Keys
from service.state.store import SyncStore

RATE, WINDOW_S, BUCKETS = 1000, 86400, 2
PER_SHARD = RATE * WINDOW_S // BUCKETS // 65536  # ids per shard at the default DEDUPE_SHARDS


def _usage(client: redis.Redis, pattern: str) -> tuple[int, int]:
    total = n = 0
    for key in client.scan_iter(match=pattern, count=5000):
        total += client.memory_usage(key, samples=0) or 0
        n += 1
    return total, n


def dedupe_bytes(client: redis.Redis, n: int = 60_000) -> dict:
    shards = max(1, n // PER_SHARD)
    settings = Settings(dedupe_shards=shards)
    rules = IdentityRules.from_settings(settings)
    store = SyncStore(client, settings)
    now = int(time.time() * 1000)
    events = [{"type": "track", "event": "x", "userId": "one-user", "messageId": f"ajs-{i:012d}-bench"}
              for i in range(n)]
    for i in range(0, n, 1000):
        store.apply("mem", [(normalise(e, now, rules), b"{}") for e in events[i:i + 1000]], now=now)
    total, keys = _usage(client, Keys("mem").prefix + "ds:*")
    per_id = total / n
    # the usual alternative: one SET key with EX per messageId
    for e in events[:10_000]:
        client.set(f"dedupe:{e['messageId']}", 1, ex=WINDOW_S)
    naive, _ = _usage(client, "dedupe:*")
    naive_per_id = naive / 10_000
    peak_ids = RATE * WINDOW_S * (BUCKETS + 1) / BUCKETS  # the older bucket lives until it ends: up to 1.5 windows
    return {"ids": n, "ids_per_shard": round(n / shards), "bytes_per_id": round(per_id, 1),
            "gb_at_1000_per_s_24h": round(peak_ids * per_id / 1e9, 2),
            "naive_set_bytes_per_id": round(naive_per_id, 1),
            "naive_gb_at_1000_per_s_24h": round(RATE * WINDOW_S * naive_per_id / 1e9, 2)}


def profile_bytes(client: redis.Redis, events: int = 40_000, users: int = 2_000) -> dict:
    from tests.helpers import apply, mixed_stream
    from workers.recompute import refresh

    stream = mixed_stream(events, users=users, seed=5)
    apply(client, stream)
    k = Keys("default")
    profiles, n = _usage(client, k.prefix + "p:*")
    index, _ = _usage(client, k.prefix + "i:*")
    accounts, _ = _usage(client, k.prefix + "acct:*")
    log, _ = _usage(client, k.log)
    events_index, _ = _usage(client, k.prefix + "ev:*")
    account_users, _ = _usage(client, k.prefix + "au:*")
    refresh(client, Settings(), "default")
    contrib, _ = _usage(client, k.contributions)
    return {"profiles": n, "events": events, "profile_hash_bytes": round(profiles / n),
            "identifier_index_bytes": round(index / n), "account_bytes": round((accounts + account_users) / n),
            "contribution_bytes": round(contrib / n),
            "total_bytes_per_profile": round((profiles + index + accounts + account_users + contrib) / n),
            "log_bytes_per_event": round(log / events),
            # the Profile API's /events index: one sorted-set member per logged event, kept EVENT_LOG_RETENTION
            "events_index_bytes_per_event": round(events_index / events)}


def measure() -> dict:
    with tempfile.TemporaryDirectory(prefix="sps-mem-") as d, EmbeddedRedis(d, persistent=False) as server:
        client = redis.Redis.from_url(server.url)
        out = {"dedupe": dedupe_bytes(client)}
        client.flushall()
        out["profiles"] = profile_bytes(client)
        out["encoding_check"] = orjson.loads(orjson.dumps(
            client.config_get("hash-max-ziplist-entries") | client.config_get("set-max-intset-entries")))
        return out


if __name__ == "__main__":
    print(orjson.dumps(measure(), option=orjson.OPT_INDENT_2).decode())
