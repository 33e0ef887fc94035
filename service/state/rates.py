"""Per-minute event counters in Redis, shared by every web process (the rates of the status and the console).

Each minute of a space has one hash, ``Keys.rates(minute)``: outcome -> events (``service/spec/rates.py``). The
receiver never writes it on the request path: it adds to a dict in its own process (``RateCounter.add``, about
a microsecond), and a task started with the app (``RateCounter.run``) flushes the sums about once a second
in one pipeline: an HINCRBY per field and an EXPIRE of ``RATE_TTL`` per hash. So the counts are shared by every
web process at the cost of one round trip a second per process, whatever the request rate. The price: a web
process that dies loses up to its last second of counts, and a flush that fails is dropped rather than retried
(it may have been half applied, and while Redis is down nothing is accepted anyway). A status display can afford
both; these counts are never used for anything that must add up.

Imports and replays count under ``replay:`` fields with one pipeline per chunk of events (``count_applied``), so a
backfill does not pass for live intake. Requests refused before authentication are counted per minute for the
deployment (``refusal_rates``), not per claimed space.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import redis
import redis.asyncio as aredis

from service.logs import event as log_event
from service.spec.keys import Keys, refusal_rates
from service.spec.rates import MINUTE_MS, REPLAY, Buckets, decode, minutes_back

log = logging.getLogger("rates")
RATE_TTL = 62 * 60  # seconds a minute's hash outlives its last write: an hour's window reads 61 minutes
FLUSH_INTERVAL = 1.0  # seconds between flushes: what a crash can lose, and one pipeline per this per process
_DEPLOYMENT = ""  # the pending-counts entry of refusals (a space id is never empty)


class RateCounter:
    """One web process's counts not yet in Redis, and the task that flushes them."""

    def __init__(self, client: aredis.Redis, interval: float = FLUSH_INTERVAL) -> None:
        self.client = client
        self.interval = interval
        self._pending: dict[tuple[str, int], dict[str, int]] = {}  # (space, minute) -> field -> n
        self._failing = False

    def add(self, space: str, at_ms: int, counts: Mapping[str, int]) -> None:
        """Count events of ``space`` received at ``at_ms`` (outcome -> n); zeros are skipped."""
        slot = (space, at_ms // MINUTE_MS)
        fields = self._pending.get(slot)
        if fields is None:
            fields = self._pending[slot] = {}
        for field, n in counts.items():
            if n:
                fields[field] = fields.get(field, 0) + n

    def refused(self, status: int, at_ms: int) -> None:
        """Count a request refused before authentication (by HTTP status), for the deployment."""
        self.add(_DEPLOYMENT, at_ms, {str(status): 1})

    async def flush(self) -> None:
        """Write what was counted since the last flush, in one pipeline; on failure it is dropped (see above)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        pipe = self.client.pipeline(transaction=False)
        for (space, minute), fields in pending.items():
            key = Keys(space).rates(minute) if space else refusal_rates(minute)
            for field, n in fields.items():
                pipe.hincrby(key, field, n)
            pipe.expire(key, RATE_TTL)
        await pipe.execute()

    async def run(self) -> None:
        """Flush every ``interval`` until cancelled (the app's lifespan)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
                self._failing = False
            except (redis.RedisError, OSError) as exc:
                if not self._failing:  # once per outage, not once a second
                    log_event(log, "rate counts not written", logging.WARNING, error=type(exc).__name__)
                self._failing = True


def count_applied(client: redis.Redis, space: str, at_ms: int, counts: Mapping[str, int]) -> None:
    """What an import or replay chunk applied (outcome -> n), under ``replay:`` fields: one pipeline."""
    key = Keys(space).rates(at_ms // MINUTE_MS)
    pipe = client.pipeline(transaction=False)
    for field, n in counts.items():
        if n:
            pipe.hincrby(key, REPLAY + field, n)
    pipe.expire(key, RATE_TTL)
    pipe.execute()


def queue_buckets(pipe: Any, space: str | None, now_ms: int) -> None:
    """Queue the reads of the buckets of the hour before ``now_ms`` (a space's, or the refusals' with None) on a
    sync or async pipeline; ``buckets`` reads the replies."""
    for minute in minutes_back(now_ms):
        pipe.hgetall(Keys(space).rates(minute) if space else refusal_rates(minute))


def buckets(replies: list, now_ms: int) -> Buckets:
    """minute -> field -> count, from the replies of ``queue_buckets`` (in its order)."""
    return {minute: decode(raw) for minute, raw in zip(minutes_back(now_ms), replies, strict=True) if raw}


BUCKET_READS = len(minutes_back(0))  # replies ``queue_buckets`` queues
