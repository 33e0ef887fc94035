"""Worker crash drill: a real ``persona-sync worker`` SIGKILLed (with its job process) in the middle of a refresh of
thousands of dirty profiles is restarted, and within 30 s of the restart the clusters, KPI cards, aggregates and
contributions equal what a fresh full recompute of the same profiles gives."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import redis
from rq import Queue

from service.config import Settings
from service.spec.keys import Keys
from service.state.queue import QUEUE_NAME
from service.state.refresh import schedule_refresh
from tests.drills.stack import Redis
from tests.helpers import apply, mixed_stream
from workers import recompute

EXE = str(Path(sys.executable).with_name("persona-sync"))
USERS = 4000  # above PARALLEL_REFRESH_FROM: the refresh forks, as it does in production at this size


def start_worker(url: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("QUEUE_REDIS_URL", "MAVERA_API_KEY")}
    env.update(REDIS_URL=url, LOG_LEVEL="WARNING", REFRESH_DEBOUNCE="0.2s")
    return subprocess.Popen([EXE, "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            process_group=0)


def events() -> list[dict]:
    """Every kind of call for USERS people, and each with an explicit churn risk: derived churn depends on the
    clock, and the comparison below is between two runs seconds apart."""
    stream = mixed_stream(USERS * 4, users=USERS, seed=11)
    rnd = random.Random(5)
    return stream + [{"type": "identify", "userId": f"user-{u}", "messageId": f"churn-{u}",
                      "timestamp": "2026-01-01T00:00:00Z", "traits": {"churn_risk": round(rnd.random(), 3)}}
                     for u in range(USERS)]


def computed(client: redis.Redis) -> dict[str, dict]:
    """Clusters, KPI cards, patterns, aggregates and per-profile contributions, decoded (key order aside)."""
    keys = Keys("default")
    return {key: {k: orjson.loads(v) for k, v in client.hgetall(key).items()}
            for key in (keys.clusters, keys.patterns, keys.cluster_aggregates, keys.pattern_aggregates,
                        keys.contributions)}


def until(check: Callable[[], bool], seconds: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < seconds, f"{what}: not within {seconds} s"
        time.sleep(0.01)
    return time.monotonic() - start


def test_a_worker_killed_mid_refresh_leaves_aggregates_equal_to_a_full_recompute(
        start_redis: Callable[..., Redis]) -> None:
    server = start_redis(persistent=False)
    client = server.client()
    apply(client, events(), batch=2000)
    keys = Keys("default")
    worker = start_worker(server.url)
    try:
        schedule_refresh(client, Queue(QUEUE_NAME, connection=client), "default", 0.2)
        until(lambda: bool(client.exists(keys.recompute_lock) and client.exists(keys.dirty_work)), 60,
              "the refresh started")
        os.killpg(worker.pid, signal.SIGKILL)  # the worker, its job process and the refresh's forked helpers
        worker.wait()
        assert client.exists(keys.dirty_work) and not client.exists(keys.dirty)  # caught in the middle
        worker = start_worker(server.url)
        until(lambda: not client.exists(keys.dirty_work, keys.dirty, keys.recompute_lock)
              and client.hlen(keys.contributions) == USERS, 30, "refresh resumed after the restart")
        after_crash = computed(client)
        recompute.full_recompute(client, Settings(), "default")
        assert computed(client) == after_crash
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
