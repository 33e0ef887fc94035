"""What `persona-sync status` and `GET /admin/status` report, read the same way by both (sync and async).

Every figure comes from a key that already holds it (counters, lengths, a few small hashes): no scan, so the
status answers in milliseconds at any number of profiles, often enough for a page that refreshes itself.
The reads are queued on a pipeline (``queue_space``, ``queue_deployment``) and their replies turned into the
report by pure functions; ``problems`` (``service/state/problems.py``) says what needs doing and what to run.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import orjson
import redis
import redis.asyncio as aredis
from rq import Queue
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from service.config import Settings
from service.spec.clock import now_ms as now
from service.spec.keys import MAVERA_BLOCKED_KEY, MAVERA_PAUSED_KEY, REFUSALS_KEY, SPACES_KEY, Keys
from service.spec.rates import HOUR_MINUTES, REPLAY, rates, window
from service.state.connect import is_cluster
from service.state.problems import problems
from service.state.queue import QUEUE_NAME
from service.state.rates import BUCKET_READS, buckets, queue_buckets

SPACE_READS = 16  # replies of ``queue_space`` before its rate buckets
PERSONA_FIELDS = ("state", "error", "last_sync_ms", "mavera_id", "note")


def spaces(client: redis.Redis) -> list[str]:
    """Every space that has received an event, sorted."""
    return sorted(s.decode() for s in client.smembers(SPACES_KEY))


def queue_space(pipe: Any, keys: Keys, now_ms: int) -> None:
    """Queue one space's reads on a (sync or async) pipeline; ``space_row`` reads the replies in this order.
    ``keys`` are the space's current generation's (``state_keys``): the profile counter is per generation."""
    pipe.mget(keys.seq, keys.seq_base)
    pipe.hlen(keys.contributions)
    pipe.scard(keys.dirty)
    pipe.scard(keys.dirty_work)
    pipe.scard(keys.dirty_full)
    pipe.xlen(keys.log)
    pipe.xrange(keys.log, count=1)
    pipe.xlen(keys.dead_letters)
    pipe.get(keys.dead_letter_bytes)
    pipe.scard(keys.suppressed)
    pipe.hlen(keys.clusters)
    pipe.hgetall(keys.personas)
    pipe.hmget(keys.narrative, "state", "error")
    pipe.hgetall(keys.recompute_runs)
    pipe.get(keys.refresh_failures)
    pipe.exists(keys.recompute_lock)
    queue_buckets(pipe, keys.space, now_ms)


def _text(raw: bytes | None) -> str | None:
    return raw.decode(errors="replace") if raw is not None else None


def _json(raw: bytes | None) -> dict | None:
    try:
        doc = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def space_row(space: str, replies: list, now_ms: int) -> dict[str, Any]:
    """One space's part of the report, from the replies of ``queue_space``."""
    (seq, profiles, dirty, dirty_work, dirty_full, log_len, oldest, dlq, dlq_bytes, suppressed, clusters, personas,
     narrative, runs, failures, locked) = replies[:SPACE_READS]
    counts = buckets(replies[SPACE_READS:SPACE_READS + BUCKET_READS], now_ms)
    replayed = window(counts, now_ms, HOUR_MINUTES, prefix=REPLAY)
    runs = {k.decode(): _json(v) for k, v in runs.items()}
    narrative_state, narrative_error = (_text(v) for v in narrative)
    return {
        "space": space,
        "events": rates(counts, now_ms),
        "replayed_last_hour": {k: round(v) for k, v in replayed.items()},
        "profiles": profiles,  # live profiles as of the last refresh; merged and erased ones are not counted
        "profiles_created": int(seq[0] or 0) - int(seq[1] or 0),  # in this generation (see Keys.seq_base)
        "dirty_profiles": dirty,
        "dirty_being_refreshed": dirty_work + dirty_full,
        "recompute_running": bool(locked),
        "last_refresh": runs.get("refresh"),
        "last_full_recompute": runs.get("full"),
        "refresh_failures_in_a_row": int(failures or 0),
        "clusters": clusters,
        "personas": {k.decode(): {f: doc.get(f) for f in PERSONA_FIELDS}
                     for k, v in sorted(personas.items()) if (doc := _json(v)) is not None},
        "narrative": {"state": narrative_state, "error": narrative_error or None} if narrative_state else None,
        "dead_letters": dlq,
        "dead_letter_bytes": int(dlq_bytes or 0),
        "suppressed_user_ids": suppressed,
        "event_log": {"entries": log_len, "oldest_ms": int(oldest[0][0].split(b"-")[0]) if oldest else None},
    }


def queue_deployment(pipe: Any, now_ms: int) -> None:
    """Queue the reads that are not a space's: Mavera's pause and Retry-After block, the refusals (Redis memory is
    read apart: on a Cluster it is every primary's, which a pipeline cannot ask)."""
    pipe.get(MAVERA_PAUSED_KEY)
    pipe.xlen(REFUSALS_KEY)
    pipe.get(MAVERA_BLOCKED_KEY)
    queue_buckets(pipe, None, now_ms)


def fullest(memory: dict[str, Any]) -> dict[str, Any]:
    """INFO memory of one server; of a Cluster (one reply per primary), the primary nearest its limit."""
    if "used_memory" in memory or not memory:
        return memory
    nodes = [m for m in memory.values() if isinstance(m, dict)]
    return max(nodes, key=lambda m: (int(m.get("used_memory", 0)) / int(m.get("maxmemory", 0) or 1 << 62),
                                     int(m.get("used_memory", 0))))


def replication(info: dict[str, Any]) -> dict[str, Any]:
    """What ``INFO replication`` of a STATE server says about its copies: its role, replicas connected and
    online, and how far the furthest behind one is (seconds since its last acknowledgement, and bytes). On a
    Cluster (one reply per primary), the primary with the fewest replicas online, then the furthest behind."""
    if info and "role" not in info:
        nodes = [replication(m) for m in info.values() if isinstance(m, dict)]
        return min(nodes, key=lambda r: (r["online"], -(r["behind_bytes"] or 0))) if nodes else replication({})
    offset = int(info.get("master_repl_offset", 0))
    copies = [v for k, v in info.items() if k.startswith("slave") and k[5:].isdigit() and isinstance(v, dict)]
    online = [c for c in copies if c.get("state") == "online"]
    return {
        "role": "primary" if info.get("role", "master") == "master" else "replica",
        "replicas": len(copies),
        "online": len(online),
        "lag_s": max((int(c.get("lag", 0)) for c in online), default=None),
        "behind_bytes": max((max(0, offset - int(c.get("offset", 0))) for c in online), default=None),
    }


def server_info(client: redis.Redis) -> dict[str, Any]:
    """INFO memory and replication of STATE: one round trip (of each primary, on a Cluster)."""
    if is_cluster(client):
        cluster = cast(Any, client)
        return {"memory": fullest(cluster.info("memory", target_nodes="primaries")),
                "replication": replication(cluster.info("replication", target_nodes="primaries"))}
    with client.pipeline(transaction=False) as pipe:
        memory, repl = pipe.info("memory").info("replication").execute()
    return {"memory": memory, "replication": replication(repl)}


async def server_info_async(client: aredis.Redis) -> dict[str, Any]:
    if is_cluster(client):
        cluster = cast(Any, client)
        return {"memory": fullest(await cluster.info("memory", target_nodes="primaries")),
                "replication": replication(await cluster.info("replication", target_nodes="primaries"))}
    async with client.pipeline(transaction=False) as pipe:
        memory, repl = await pipe.info("memory").info("replication").execute()
    return {"memory": memory, "replication": replication(repl)}


def deployment(replies: list, server: dict[str, Any], now_ms: int) -> dict[str, Any]:
    paused, refusals, blocked = replies[:3]
    counts = buckets(replies[3:3 + BUCKET_READS], now_ms)
    try:
        blocked_ms = int(blocked) if blocked is not None else 0
    except ValueError:
        blocked_ms = 0
    by_status = sorted({f for c in counts.values() for f in c})
    refused = window(counts, now_ms, HOUR_MINUTES, tuple(by_status))
    memory = server["memory"]
    used, limit = int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))
    why = _json(paused) or {}  # {"reason", "at_ms"}, set by a sync that met a 402 (``ops.pause``)
    return {
        "mavera": {"paused": paused is not None, "reason": why.get("reason"), "since_ms": why.get("at_ms"),
                   # Mavera's Retry-After: every worker waits until then (``workers.mavera.ratelimit``)
                   "blocked_until_ms": blocked_ms if blocked_ms > now_ms else None},
        "refusals": {"logged": refusals,  # requests refused before authentication (GET /admin/refusals)
                     "last_hour": round(sum(refused.values())),
                     "last_hour_by_status": {k: round(v) for k, v in refused.items()}},
        "redis": {"used_bytes": used, "max_bytes": limit or None, "policy": memory.get("maxmemory_policy"),
                  "used_pct": round(100 * used / limit, 1) if limit else None,
                  "replication": server["replication"]},
    }


def queue_depths(conn: redis.Redis) -> dict[str, Any]:
    """The RQ queue: jobs waiting, running, scheduled, deferred and failed, and live workers. Read straight from
    RQ's keys (without its registry clean-up, which writes) in two round trips; failed and running count only
    entries that have not expired, as ``persona-sync jobs`` lists them."""
    queue = Queue(QUEUE_NAME, connection=conn)
    now = time.time()
    with conn.pipeline(transaction=False) as pipe:
        pipe.llen(queue.key)
        pipe.zcount(queue.started_job_registry.key, now, "+inf")
        pipe.zcard(queue.scheduled_job_registry.key)
        pipe.zcard(queue.deferred_job_registry.key)
        pipe.zcount(queue.failed_job_registry.key, now, "+inf")
        pipe.smembers(WORKERS_BY_QUEUE_KEY % QUEUE_NAME)
        queued, started, scheduled, deferred, failed, workers = pipe.execute()
        for key in workers:  # a worker killed outright stays in the set; its own key expires
            pipe.exists(key)
        alive = sum(pipe.execute())
    return {"queued": queued, "running": started, "scheduled": scheduled, "deferred": deferred, "failed": failed,
            "workers": alive}


def queue_report(conn: redis.Redis | None) -> dict[str, Any] | None:
    """``queue_depths``, or what went wrong; None when this process has no queue configured."""
    if conn is None:
        return None
    try:
        return queue_depths(conn)
    except (redis.RedisError, OSError) as exc:
        return {"unreachable": f"{type(exc).__name__}: {exc}"[:300]}


def report(rows: list[dict], deploy: dict, queue: dict | None, settings: Settings, now_ms: int) -> dict[str, Any]:
    """The whole status: what `persona-sync status --json` prints and `GET /admin/status` answers."""
    return {"at_ms": now_ms, "spaces": rows, "queue": queue, **deploy,
            "problems": problems(rows, deploy, queue, settings, now_ms)}


def _keys(generations: list, chosen: list[str]) -> list[Keys]:
    return [Keys(space, gen.decode() if gen else "") for space, gen in zip(chosen, generations, strict=True)]


def collect(client: redis.Redis, queue_conn: redis.Redis | None, settings: Settings, only: str | None = None,
            now_ms: int | None = None) -> dict[str, Any]:
    """The status, read with blocking clients (the CLI): three round trips to STATE, two to the queue."""
    now_ms = now_ms if now_ms is not None else now()
    chosen = [only] if only else spaces(client)
    pipe = client.pipeline(transaction=False)
    for space in chosen:
        pipe.get(Keys(space).generation_key)
    for keys in _keys(pipe.execute(), chosen):
        queue_space(pipe, keys, now_ms)
    queue_deployment(pipe, now_ms)
    replies = pipe.execute()
    return _report(chosen, replies, server_info(client), queue_report(queue_conn), settings, now_ms)


async def collect_async(client: aredis.Redis, queue_conn: redis.Redis | None, settings: Settings,
                        only: str | None = None, now_ms: int | None = None) -> dict[str, Any]:
    """The same status for the web (``GET /admin/status``); RQ is blocking, so the queue is read in a thread."""
    now_ms = now_ms if now_ms is not None else now()
    chosen = [only] if only else sorted(s.decode() for s in await client.smembers(SPACES_KEY))
    pipe = client.pipeline(transaction=False)
    for space in chosen:
        pipe.get(Keys(space).generation_key)
    for keys in _keys(await pipe.execute(), chosen):
        queue_space(pipe, keys, now_ms)
    queue_deployment(pipe, now_ms)
    replies = await pipe.execute()
    return _report(chosen, replies, await server_info_async(client),
                   await asyncio.to_thread(queue_report, queue_conn), settings, now_ms)


def _report(chosen: list[str], replies: list, server: dict[str, Any], queue: dict | None, settings: Settings,
            now_ms: int) -> dict[str, Any]:
    per = SPACE_READS + BUCKET_READS
    rows = [space_row(space, replies[i * per:(i + 1) * per], now_ms) for i, space in enumerate(chosen)]
    return report(rows, deployment(replies[len(chosen) * per:], server, now_ms), queue, settings, now_ms)
