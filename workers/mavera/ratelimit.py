"""One Mavera rate limit for every worker, kept in Redis.

Mavera limits requests per API key over a sliding 60 s window, so the limit is a property of the key, not of a
process: every worker takes a slot from the same sorted set. When Mavera says to slow down (429 with
``Retry-After``, or ``X-RateLimit-Remaining: 0`` with ``X-RateLimit-Reset``) every worker waits until then.
Mave chat calls also hold one of at most ``MAVE_CHAT_CONCURRENCY`` slots (Mavera allows 10 per key).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from service.spec.clock import now_ms
from service.spec.keys import MAVE_CHAT_SLOTS_KEY, MAVERA_BLOCKED_KEY, MAVERA_RATE_KEY

_TAKE = """
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local blocked = tonumber(redis.call('GET', KEYS[2]) or '0')
if blocked > now then return blocked - now end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now)
"""

_BLOCK = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local until_ms = tonumber(ARGV[1])
if until_ms > cur then redis.call('SET', KEYS[1], until_ms, 'PXAT', until_ms) end
return 0
"""

_SLOT = """
local now, limit, expiry = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], expiry, ARGV[4])
  return 1
end
return 0
"""


class RateLimited(RuntimeError):
    """No slot within the longest wait we accept; the job fails and RQ or the next sync tries again."""


class RateLimiter:
    def __init__(self, client: redis.Redis, per_minute: int, window_ms: int = 60_000, max_wait: float = 120.0,
                 key: str = MAVERA_RATE_KEY, blocked_key: str = MAVERA_BLOCKED_KEY) -> None:
        self.client = client
        self.limit = per_minute
        self.window_ms = window_ms
        self.max_wait = max_wait
        self.key, self.blocked_key = key, blocked_key
        self._take = client.register_script(_TAKE)
        self._block = client.register_script(_BLOCK)

    def acquire(self) -> float:
        """Wait for a slot; return the seconds waited."""
        start = time.monotonic()
        while True:
            wait_ms = int(self._take(keys=[self.key, self.blocked_key],
                                     args=[now_ms(), self.window_ms, self.limit, uuid.uuid4().hex]))
            if wait_ms <= 0:
                return time.monotonic() - start
            if time.monotonic() - start + wait_ms / 1000 > self.max_wait:
                raise RateLimited(f"no Mavera request slot within {self.max_wait:.0f}s (limit {self.limit}/min)")
            time.sleep(min(wait_ms / 1000, 5.0))

    def block_for(self, seconds: float) -> None:
        """Every worker waits ``seconds`` (Retry-After, or until X-RateLimit-Reset)."""
        if seconds > 0:
            self._block(keys=[self.blocked_key], args=[now_ms() + int(seconds * 1000)])

    def observe(self, headers: dict[str, str] | object) -> None:
        """Honour X-RateLimit-Remaining / -Reset: at zero remaining, wait until the reset for everyone."""
        get = getattr(headers, "get", None)
        if get is None:
            return
        remaining, reset = get("x-ratelimit-remaining"), get("x-ratelimit-reset")
        try:
            if remaining is not None and int(float(remaining)) <= 0 and reset is not None:
                reset_s = float(reset)
                # Reset is an epoch time in seconds, or (some servers) seconds from now
                delay = reset_s - time.time() if reset_s > 1e9 else reset_s
                self.block_for(min(max(delay, 0.0), 120.0))
        except (ValueError, OverflowError):  # not a number, or an infinite one
            return


class ChatSlots:
    """A distributed semaphore: at most ``limit`` Mave chats in flight; slots expire if a worker dies."""

    def __init__(self, client: redis.Redis, limit: int, hold: float = 300.0, key: str = MAVE_CHAT_SLOTS_KEY) -> None:
        self.client, self.limit, self.hold, self.key = client, limit, hold, key
        self._slot = client.register_script(_SLOT)

    @contextmanager
    def slot(self, max_wait: float = 300.0) -> Iterator[Callable[[], None]]:
        """Hold one slot; yields ``renew``, to call before each attempt of the chat: a chat retried after 429s or
        5xx can outlast ``hold``, and a slot that lapsed under a live chat would let one more in than the limit."""
        token, start = uuid.uuid4().hex, time.monotonic()
        while not self._slot(keys=[self.key], args=[now_ms(), self.limit, now_ms() + int(self.hold * 1000), token]):
            if time.monotonic() - start > max_wait:
                raise RateLimited(f"no Mave chat slot within {max_wait:.0f}s ({self.limit} in flight)")
            time.sleep(0.2)

        def renew() -> None:  # added back if it lapsed meanwhile (a long wait): the chat is in flight either way
            self.client.zadd(self.key, {token: now_ms() + int(self.hold * 1000)})

        try:
            yield renew
        finally:
            self.client.zrem(self.key, token)

    def in_flight(self) -> int:
        self.client.zremrangebyscore(self.key, "-inf", now_ms())
        return self.client.zcard(self.key)
