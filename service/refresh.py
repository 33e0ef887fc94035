"""Debounced refresh: at most one profile-refresh job per space per ``REFRESH_DEBOUNCE``.

The receiver calls ``touch`` after it changed profiles. A Redis ``SET NX PX`` marker makes the debounce hold
across every web process; the job is enqueued by its dotted path so that ``service/`` never imports ``workers/``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

import redis
import redis.asyncio as aredis
from rq import Queue

from service.keys import Keys
from service.logs import event as log_event

log = logging.getLogger("refresh")
REFRESH_JOB = "workers.jobs.refresh"
PURGE_JOB = "service.ops.purge_job"
QUEUE_NAME = "persona-sync"


class RefreshScheduler:
    def __init__(self, state: aredis.Redis, queue_url: str, debounce: float) -> None:
        self.state = state
        self.queue_url = queue_url
        self.debounce = debounce
        self._queue: Queue | None = None
        self._touched: dict[str, float] = {}

    def queue(self) -> Queue:
        if self._queue is None:
            self._queue = Queue(QUEUE_NAME, connection=redis.Redis.from_url(self.queue_url))
        return self._queue

    async def touch(self, space: str) -> None:
        """Enqueue one refresh for ``space`` unless one is already due within the debounce interval.

        The process-local clock check keeps the hot path free of a Redis round trip per request; the Redis
        marker then makes the debounce hold across every web process."""
        now = time.monotonic()
        if now - self._touched.get(space, -1e9) < self.debounce:
            return
        self._touched[space] = now
        try:
            first = await self.state.set(Keys(space).refresh_pending, b"1", nx=True, px=int(self.debounce * 1000))
            if first and self.queue_url:
                await asyncio.to_thread(self._enqueue, space)
        except (redis.RedisError, OSError) as exc:  # the scheduled full recompute catches up; never fail intake
            log_event(log, "refresh not scheduled", logging.WARNING, space=space, error=type(exc).__name__)

    def _enqueue(self, space: str) -> None:
        self.queue().enqueue_in(timedelta(seconds=self.debounce), REFRESH_JOB, space,
                                description=f"refresh dirty profiles of {space}")

    async def purge(self, space: str) -> None:
        """After a GDPR delete: purge the erased profile's logged events in a job, not in the request."""
        if not self.queue_url:
            return
        try:
            await asyncio.to_thread(self.queue().enqueue, PURGE_JOB, space, description=f"purge forgotten ({space})")
        except (redis.RedisError, OSError) as exc:
            log_event(log, "purge not scheduled", logging.WARNING, space=space, error=type(exc).__name__)
