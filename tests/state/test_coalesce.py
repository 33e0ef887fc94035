"""Concurrent small requests of a space share round trips to Redis (``AsyncStore``), each keeping its own outcomes."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
import redis

from service.config import Settings
from service.devstack.redis_server import EmbeddedRedis
from service.spec.events import normalise
from service.spec.identity import IdentityRules
from service.spec.keys import Keys
from service.state.connect import connect_async
from service.state.store import AsyncStore, Outcome, StoreUnavailable

SETTINGS = Settings()
RULES = IdentityRules.from_settings(SETTINGS)


def one(user: str, mid: str) -> list:
    raw = {"type": "track", "event": "Page Viewed", "userId": user, "messageId": mid,
           "timestamp": "2026-03-01T00:00:00Z", "context": {"library": {"name": "analytics.js"}}}
    return [(normalise(raw, int(time.time() * 1000), RULES), orjson.dumps(raw))]


def evalsha_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def test_concurrent_single_events_share_script_calls_and_keep_their_outcomes(redis_server: EmbeddedRedis) -> None:
    admin = redis.Redis.from_url(redis_server.url)
    admin.flushall()

    async def go() -> list[list[Outcome]]:
        client = connect_async(redis_server.url)
        store = AsyncStore(client, SETTINGS)
        try:
            await store.apply("default", one("warm", "warm-1"))  # the space known, the script loaded
            admin.config_resetstat()
            requests = [store.apply("default", one(f"u{i % 20}", f"m-{i}")) for i in range(60)]
            requests.append(store.apply("default", one("u0", "m-0")))  # the same messageId again, in the same trip
            return await asyncio.gather(*requests)
        finally:
            await client.aclose()

    results = asyncio.run(go())
    calls = evalsha_calls(admin)
    assert [len(r) for r in results] == [1] * 61
    assert [r[0].status for r in results[:60]] == ["ok"] * 60 and results[60][0].status == "duplicate"
    by_user: dict[str, set[str]] = {}
    for i, r in enumerate(results[:60]):
        by_user.setdefault(f"u{i % 20}", set()).add(r[0].profile_id)
    assert all(len(pids) == 1 for pids in by_user.values()) and len({p for s in by_user.values() for p in s}) == 20
    assert admin.xlen(Keys("default").log) == 61  # the warm-up and 60, once each
    assert 1 <= calls < 30, calls  # 61 requests in a few round trips, not one script call each


def test_a_failed_round_trip_fails_every_request_in_it(tmp_path) -> None:
    async def go() -> list:
        client = connect_async("redis://127.0.0.1:1/0", socket_connect_timeout=1)
        store = AsyncStore(client, SETTINGS)
        try:
            return await asyncio.gather(*(store.apply("default", one("u", f"x-{i}")) for i in range(5)),
                                        return_exceptions=True)
        finally:
            await client.aclose()

    results = asyncio.run(go())
    assert all(isinstance(r, StoreUnavailable) for r in results), results


@pytest.mark.parametrize("events", [100, 250])
def test_a_request_that_fills_script_calls_applies_whole(redis_server: EmbeddedRedis, events: int) -> None:
    admin = redis.Redis.from_url(redis_server.url)
    admin.flushall()

    async def go() -> list[Outcome]:
        client = connect_async(redis_server.url)
        store = AsyncStore(client, SETTINGS)
        try:
            items = [item for i in range(events) for item in one(f"b{i}", f"big-{i}")]
            return await store.apply("default", items)
        finally:
            await client.aclose()

    outcomes = asyncio.run(go())
    assert [o.status for o in outcomes] == ["ok"] * events
    assert admin.xlen(Keys("default").log) == events
