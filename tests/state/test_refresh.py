"""Debounced refresh scheduling across several web processes (each its own ``RefreshScheduler``), real Redis and
a real RQ queue (refresh jobs are queued at once and wait out their debounce marker themselves)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis
import redis.asyncio as aredis
from rq import Queue

from service.state.queue import QUEUE_NAME, REFRESH_JOB
from service.state.refresh import RefreshScheduler

BOTH_BACKENDS = True  # each test runs on a standalone Redis and on a Redis Cluster (tests/conftest.py)

DEBOUNCE = 0.6
Clients = Callable[[], aredis.Redis]


def scheduled(queue_url: str) -> list[str]:
    return [j.id for j in Queue(QUEUE_NAME, connection=redis.Redis.from_url(queue_url)).get_jobs()
            if j.func_name == REFRESH_JOB]


def run_refresh(queue_url: str) -> None:
    """What the worker does with a queued refresh: take the job off the queue."""
    queue = Queue(QUEUE_NAME, connection=redis.Redis.from_url(queue_url))
    for job_id in scheduled(queue_url):
        queue.remove(job_id)


def test_one_refresh_per_interval_across_processes(async_state_client: Clients, queue_url: str) -> None:
    async def go() -> list[int]:
        a = RefreshScheduler(async_state_client(), queue_url, DEBOUNCE)
        b = RefreshScheduler(async_state_client(), queue_url, DEBOUNCE)
        counts = []
        for _ in range(2):  # two intervals of steady traffic from both processes
            for _ in range(10):
                await a.touch("default")
                await b.touch("default")
                await asyncio.sleep(DEBOUNCE / 20)
            counts.append(len(scheduled(queue_url)))
            await asyncio.sleep(DEBOUNCE)
            run_refresh(queue_url)
        return counts

    assert asyncio.run(go()) == [1, 1]


def test_a_process_that_lost_the_race_schedules_once_the_marker_expired(async_state_client: Clients,
                                                                        queue_url: str) -> None:
    """B schedules; A sees B's marker. Once B's refresh has run, a profile A dirties must get a refresh of its own
    (A must not keep trusting a marker that has expired)."""
    async def go() -> tuple[int, int]:
        a = RefreshScheduler(async_state_client(), queue_url, DEBOUNCE)
        b = RefreshScheduler(async_state_client(), queue_url, DEBOUNCE)
        await b.touch("default")
        await asyncio.sleep(DEBOUNCE / 2)
        await a.touch("default")  # covered by B's refresh
        first = len(scheduled(queue_url))
        await asyncio.sleep(DEBOUNCE / 2 + 0.1)  # B's marker expired; its refresh ran
        run_refresh(queue_url)
        await a.touch("default")  # a profile dirtied after that refresh
        return first, len(scheduled(queue_url))

    assert asyncio.run(go()) == (1, 1)


def test_redis_down_never_fails_intake() -> None:
    async def go() -> None:
        down = RefreshScheduler(aredis.Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.2), "", 5.0)
        await down.touch("default")  # logs and returns: the hourly full recompute catches up

    asyncio.run(go())
