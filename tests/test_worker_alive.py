"""`persona-sync worker-alive`, the worker Deployment's liveness probe, against a real Redis and real RQ workers:
a wrong answer either restarts healthy workers or leaves a stuck one running, so each way it can answer is run."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from rq import Queue, Worker
from rq.utils import now, utcformat

from service.state.queue import QUEUE_NAME

EXE = str(Path(sys.executable).with_name("persona-sync"))


def env_for(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("QUEUE_REDIS_URL", "MAVERA_API_KEY")}
    env.update(REDIS_URL=url, LOG_LEVEL="WARNING")
    return env


def alive(url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, "worker-alive", *extra], env=env_for(url), capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def registered(r: redis.Redis) -> Iterator[Worker]:
    """A worker registered through rq's own API, as `Worker.work` does at start, from this host."""
    worker = Worker([Queue(QUEUE_NAME, connection=r)], connection=r)
    worker.register_birth()
    yield worker
    worker.register_death()


def test_a_running_worker_process_is_alive_and_gone_once_stopped(redis_url: str, r: redis.Redis) -> None:
    proc = subprocess.Popen([EXE, "worker"], env=env_for(redis_url), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not Worker.all(queue=Queue(QUEUE_NAME, connection=r)):
            assert proc.poll() is None and time.monotonic() < deadline, "the worker did not register"
            time.sleep(0.1)
        out = alive(redis_url)
        assert out.returncode == 0, out.stderr
        assert "ok, last heartbeat" in out.stdout
    finally:
        proc.terminate()  # SIGTERM, as Kubernetes sends: an idle rq worker registers its death and exits
        proc.wait(30)
    out = alive(redis_url)
    assert out.returncode == 1 and f"no RQ worker of queue {QUEUE_NAME} registered from host" in out.stderr


def test_no_worker_is_not_alive(redis_url: str) -> None:
    out = alive(redis_url)
    assert out.returncode == 1 and socket.gethostname() in out.stderr


def test_a_stale_heartbeat_is_not_alive(redis_url: str, r: redis.Redis, registered: Worker) -> None:
    assert alive(redis_url).returncode == 0
    r.hset(registered.key, "last_heartbeat", utcformat(now() - timedelta(seconds=600)))  # rq's own field and format
    out = alive(redis_url)
    age = re.search(r"is (\d+) s old \(limit 480 s\)", out.stderr)
    assert out.returncode == 1 and age and 600 <= int(age.group(1)) < 660, out.stderr
    assert alive(redis_url, "--max-age", "900").returncode == 0  # the limit is the one asked for


def test_an_idle_workers_heartbeat_gap_is_within_the_default_limit(redis_url: str, r: redis.Redis,
                                                                   registered: Worker) -> None:
    """An idle rq worker heartbeats only once per blocking dequeue (worker_ttl - 15 s): such a gap must pass."""
    gap = registered.dequeue_timeout + 5
    r.hset(registered.key, "last_heartbeat", utcformat(now() - timedelta(seconds=gap)))
    assert alive(redis_url).returncode == 0


def test_a_worker_on_another_host_does_not_count(redis_url: str, r: redis.Redis) -> None:
    other = Worker([Queue(QUEUE_NAME, connection=r)], connection=r)
    other.hostname = "some-other-pod"
    other.register_birth()
    try:
        out = alive(redis_url)
        assert out.returncode == 1 and "no RQ worker" in out.stderr
    finally:
        other.register_death()


def test_an_unreachable_redis_is_not_alive() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = alive(f"redis://127.0.0.1:{port}/0")
    assert out.returncode == 1 and "cannot read the RQ workers" in out.stderr
