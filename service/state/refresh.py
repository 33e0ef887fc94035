"""Debounced refresh: at most one profile-refresh job per space per ``REFRESH_DEBOUNCE``.

The receiver calls ``touch`` after it changed profiles. A Redis ``SET NX PX`` marker makes the debounce hold
across every web process; the job is enqueued by its dotted path so that ``service/`` never imports ``workers/``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from datetime import timedelta

import redis
import redis.asyncio as aredis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from service.config import Settings
from service.logs import event as log_event
from service.spec.keys import Keys
from service.state.connect import connect
from service.state.queue import QUEUE_NAME, REFRESH_JOB, SYNC_JOB, queue_purge
from service.state.status import spaces

log = logging.getLogger("refresh")
REFRESH_TIMEOUT = 3600  # a refresh that finds the aggregates inconsistent rebuilds the space, like the hourly run
WATCHDOG_INTERVAL = 5.0  # seconds between the worker watchdog's looks for dirty profiles nobody works on
SYNC_RESUME_EVERY = 600.0  # seconds between two syncs the watchdogs queue for one space (``check_syncs``)


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


def queue_refresh(queue: Queue, space: str, marker: str | None = None) -> str:
    """One refresh job for ``space``, queued now; ``marker`` is the debounce marker it waits out before it reads.
    Returns the job's id.

    Queued at once rather than with ``enqueue_in``: a delayed job needs RQ's scheduler, which lives in one worker
    at a time and, when that worker dies (or Redis blinks), is only taken over minutes later. Any live worker
    runs a queued job; the price is a worker that waits out the debounce interval (``REFRESH_DEBOUNCE``, 5 s)
    inside the job."""
    job = queue.enqueue(REFRESH_JOB, space, marker, job_timeout=REFRESH_TIMEOUT,
                        description=f"refresh dirty profiles of {space}")
    return str(job.id)


def schedule_refresh(state: redis.Redis, queue: Queue, space: str, debounce: float) -> bool:
    """Queue one refresh of ``space`` unless one is already due within the debounce interval (workers' twin of
    ``RefreshScheduler.touch``). True when this call queued it."""
    keys, token = Keys(space), uuid.uuid4().hex
    if not state.set(keys.refresh_pending, token, nx=True, px=int(debounce * 1000)):
        return False
    try:
        job_id = queue_refresh(queue, space, token)
    except BaseException:
        state.delete(keys.refresh_pending)
        raise
    state.set(keys.refresh_queued, job_id, ex=REFRESH_TIMEOUT)
    return True


def job_waiting(queue: Queue, job_id: bytes | str | None) -> bool:
    """Whether the RQ job ``job_id`` is still to run or running (not finished, failed, or lost)."""
    if not job_id:
        return False
    try:
        job = Job.fetch(job_id.decode() if isinstance(job_id, bytes) else job_id, connection=queue.connection)
    except NoSuchJobError:
        return False
    return job.get_status(refresh=False) in (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED,
                                             JobStatus.SCHEDULED)


def refresh_due(state: redis.Redis, queue: Queue, space: str) -> bool:
    """Whether dirty profiles of ``space`` wait with nobody on them: no recompute holds the space, the last
    queued refresh is not waiting to run (it finished, failed or was lost), refreshes are not backing off after
    failures, and either a crashed recompute left its taken marks (or a shared run without owner, which the
    refresh finishes) behind or dirty marks wait with no refresh due."""
    keys = Keys(space)
    with state.pipeline(transaction=False) as pipe:
        locked, leftovers, dirty, pending, queued, backoff = (
            pipe.exists(keys.recompute_lock).exists(keys.dirty_work, keys.dirty_full, keys.recompute_run)
            .scard(keys.dirty).exists(keys.refresh_pending).get(keys.refresh_queued).exists(keys.refresh_backoff)
            .execute())
    if locked or backoff or not (leftovers or (dirty and not pending)):
        return False
    return not job_waiting(queue, queued)


class RefreshWatchdog:
    """Runs in every ``persona-sync worker``: every few seconds, queue a refresh for any space whose dirty profiles
    nobody is working on — after a worker died mid-refresh (its lock lapses within seconds), a refresh job was
    lost with a Redis restart, or a refresh stepped aside for a recompute that then crashed — and a persona sync
    for any space whose sync was wanted and that nobody runs (``check_syncs``). Cheap: a handful of reads per
    space."""

    def __init__(self, state: redis.Redis, queue: Queue, debounce: float, interval: float = WATCHDOG_INTERVAL,
                 mave_chat_timeout: float = Settings.mave_chat_timeout) -> None:
        self.state, self.queue, self.debounce, self.interval = state, queue, debounce, interval
        self.mave_chat_timeout = mave_chat_timeout
        self._unsynced: set[str] = set()  # spaces seen with a sync wanted and nobody running it, last pass
        self._stop = threading.Event()

    def check(self) -> list[str]:
        """One pass; returns the spaces it queued a refresh for."""
        queued = []
        for space in spaces(self.state):
            if refresh_due(self.state, self.queue, space) and schedule_refresh(self.state, self.queue, space,
                                                                                   self.debounce):
                log_event(log, "refresh resumed", space=space)
                queued.append(space)
        return queued

    def check_syncs(self) -> list[str]:
        """One pass over the spaces' sync notes; returns the spaces it queued a sync for. A sync job leaves its
        note until it has done the round the note asked for, so a note with no sync holding the space's lock is a
        sync that died (a worker killed mid-sync: its lock lapses within a minute) or a request it never saw. Seen
        so on two passes in a row, not one: a sync job sets its note just before it takes the lock."""
        queued, seen = [], set()
        for space in spaces(self.state):
            keys = Keys(space)
            if self.state.exists(keys.sync_wanted) and not self.state.exists(keys.sync_lock):
                if space not in self._unsynced:
                    seen.add(space)
                    continue
                # one such sync per space per SYNC_RESUME_EVERY, whichever worker's watchdog sees it first: the
                # one queued may wait behind long jobs, and every worker runs a watchdog
                if not self.state.set(keys.sync_resumed, b"1", nx=True, px=int(SYNC_RESUME_EVERY * 1000)):
                    continue
                queue_sync(self.queue, space, self.mave_chat_timeout)
                log_event(log, "sync resumed", space=space)
                queued.append(space)
        self._unsynced = seen
        return queued

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
                self.check_syncs()
            except (redis.RedisError, OSError) as exc:  # Redis down: try again next round
                log_event(log, "refresh watchdog", logging.WARNING, error=type(exc).__name__)

    def start(self) -> RefreshWatchdog:
        threading.Thread(target=self.run, name="refresh watchdog", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()


def enqueue_sync(state: redis.Redis, queue: redis.Redis, mave_chat_timeout: float, only_waiting: bool = False
                 ) -> list[str]:
    """Queue a persona sync for every known space (``only_waiting``: those with personas in the outbox or paused),
    e.g. after ``persona-sync resume`` or when a worker starts with a key for the first time."""
    chosen = spaces(state)
    if only_waiting:
        waiting = (b"outbox", b"paused")
        chosen = [sp for sp in chosen if state.hget(Keys(sp).narrative, "state") in waiting
                  or any(b'"state":"%s"' % w in v for v in state.hvals(Keys(sp).personas) for w in waiting)]
    jobs = Queue(QUEUE_NAME, connection=queue)
    for space in chosen:
        queue_sync(jobs, space, mave_chat_timeout)
    return chosen


class RefreshScheduler:
    def __init__(self, state: aredis.Redis, queue_url: str, debounce: float) -> None:
        self.state = state
        self.queue_url = queue_url
        self.debounce = debounce
        self._queue: Queue | None = None
        self._quiet_until: dict[str, float] = {}  # space -> monotonic time up to which a refresh is known due

    def queue(self) -> Queue:
        if self._queue is None:
            # bounded: a request awaits its enqueue (a Redis or sentinel that hangs must not hold it past Segment's
            # deadline; the scheduled full recompute catches up on a refresh that could not be queued)
            self._queue = Queue(QUEUE_NAME, connection=connect(self.queue_url, socket_timeout=3,
                                                               socket_connect_timeout=1))
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
                    job_id = await asyncio.to_thread(self._enqueue, space, token)
                except BaseException:
                    self._quiet_until.pop(space, None)
                    await self.state.delete(key)  # no refresh is due after all: the next touch tries again
                    raise
                await self.state.set(Keys(space).refresh_queued, job_id, ex=REFRESH_TIMEOUT)
        except (redis.RedisError, OSError) as exc:  # the scheduled full recompute catches up; never fail intake
            log_event(log, "refresh not scheduled", logging.WARNING, space=space, error=type(exc).__name__)

    def _enqueue(self, space: str, token: str) -> str:
        """The job gets the marker's token: it waits until that marker has expired, then reads the dirty set."""
        return queue_refresh(self.queue(), space, token)

    async def purge(self, space: str) -> None:
        """After a GDPR delete: purge the erased profile's logged events in a job, not in the request."""
        if not self.queue_url:
            return
        try:
            await asyncio.to_thread(queue_purge, self.queue(), space)
        except (redis.RedisError, OSError) as exc:
            log_event(log, "purge not scheduled", logging.WARNING, space=space, error=type(exc).__name__)
