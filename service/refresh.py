"""Debounced refresh: at most one profile-refresh job per space per ``REFRESH_DEBOUNCE``.

The receiver calls ``touch`` after it changed profiles. A Redis ``SET NX PX`` marker makes the debounce hold
across every web process; the job is enqueued by its dotted path so that ``service/`` never imports ``workers/``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import timedelta

import redis
import redis.asyncio as aredis
from rq import Queue

from service.keys import SPACES_KEY, Keys
from service.logs import event as log_event

log = logging.getLogger("refresh")
REFRESH_JOB = "workers.jobs.refresh"
REFRESH_TIMEOUT = 3600  # a refresh that finds the aggregates inconsistent rebuilds the space, like the hourly run
SYNC_JOB = "workers.jobs.sync"
PURGE_JOB = "service.ops.purge_job"
QUEUE_NAME = "persona-sync"


def sync_timeout(mave_chat_timeout: float) -> int:
    """RQ job timeout of a sync: room for rate-limit and chat-slot waits (120 s + 300 s), the persona calls and
    Mave chat attempts that use their whole read timeout. A sync that still runs out of time stops (its creates
    stay marked uncertain, so none is sent twice) and the next sync carries on."""
    return int(600 + 5 * (mave_chat_timeout + 60))


def queue_sync(queue: Queue, space: str, mave_chat_timeout: float, delay: float = 0.0) -> None:
    """One persona sync job for ``space`` (now, or in ``delay`` seconds), with a timeout that fits it."""
    options = {"job_timeout": sync_timeout(mave_chat_timeout), "description": f"sync personas of {space}"}
    if delay:
        queue.enqueue_in(timedelta(seconds=delay), SYNC_JOB, space, **options)
    else:
        queue.enqueue(SYNC_JOB, space, **options)


def queue_refresh(queue: Queue, space: str, delay: float, marker: str | None = None) -> None:
    """One refresh job for ``space`` in ``delay`` seconds; ``marker`` is the debounce marker it waits out."""
    queue.enqueue_in(timedelta(seconds=delay), REFRESH_JOB, space, marker, job_timeout=REFRESH_TIMEOUT,
                     description=f"refresh dirty profiles of {space}")


def enqueue_sync(state: redis.Redis, queue_url: str, mave_chat_timeout: float, only_waiting: bool = False) -> list[str]:
    """Queue a persona sync for every known space (``only_waiting``: those with personas in the outbox or paused),
    e.g. after ``persona-sync resume`` or when a worker starts with a key for the first time."""
    spaces = sorted(s.decode() for s in state.smembers(SPACES_KEY))
    if only_waiting:
        waiting = (b"outbox", b"paused")
        spaces = [sp for sp in spaces if state.hget(Keys(sp).narrative, "state") in waiting
                  or any(b'"state":"%s"' % w in v for v in state.hvals(Keys(sp).personas) for w in waiting)]
    queue = Queue(QUEUE_NAME, connection=redis.Redis.from_url(queue_url))
    for space in spaces:
        queue_sync(queue, space, mave_chat_timeout)
    return spaces


class RefreshScheduler:
    def __init__(self, state: aredis.Redis, queue_url: str, debounce: float) -> None:
        self.state = state
        self.queue_url = queue_url
        self.debounce = debounce
        self._queue: Queue | None = None
        self._quiet_until: dict[str, float] = {}  # space -> monotonic time up to which a refresh is known due

    def queue(self) -> Queue:
        if self._queue is None:
            self._queue = Queue(QUEUE_NAME, connection=redis.Redis.from_url(self.queue_url))
        return self._queue

    async def touch(self, space: str) -> None:
        """Enqueue one refresh for ``space`` unless one is already due within the debounce interval.

        The Redis marker (``SET NX PX``, expiring when its refresh runs) makes the debounce hold across every web
        process. A process then stays quiet, without a Redis round trip per request, only until that marker
        expires — whichever process set it: a refresh scheduled for then reads every profile dirtied before it.
        """
        now = time.monotonic()
        if not self.queue_url or now < self._quiet_until.get(space, 0.0):
            return  # no queue configured: nothing to schedule
        key, token = Keys(space).refresh_pending, uuid.uuid4().hex
        try:
            async with self.state.pipeline(transaction=True) as pipe:
                first, ttl_ms = await pipe.set(key, token, nx=True, px=int(self.debounce * 1000)).pttl(key).execute()
            self._quiet_until[space] = now + max(0, ttl_ms) / 1000
            if first:
                try:
                    await asyncio.to_thread(self._enqueue, space, token)
                except BaseException:
                    self._quiet_until.pop(space, None)
                    await self.state.delete(key)  # no refresh is due after all: the next touch tries again
                    raise
        except (redis.RedisError, OSError) as exc:  # the scheduled full recompute catches up; never fail intake
            log_event(log, "refresh not scheduled", logging.WARNING, space=space, error=type(exc).__name__)

    def _enqueue(self, space: str, token: str) -> None:
        """The job gets the marker's token: it starts once that marker has expired (RQ may run it a little early)."""
        queue_refresh(self.queue(), space, self.debounce, token)

    async def purge(self, space: str) -> None:
        """After a GDPR delete: purge the erased profile's logged events in a job, not in the request."""
        if not self.queue_url:
            return
        try:
            await asyncio.to_thread(self.queue().enqueue, PURGE_JOB, space, description=f"purge forgotten ({space})")
        except (redis.RedisError, OSError) as exc:
            log_event(log, "purge not scheduled", logging.WARNING, space=space, error=type(exc).__name__)
