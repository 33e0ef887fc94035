"""`persona-sync recompute`: an operator's full recompute now, run by a real worker, past a dead holder's lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from rq import Queue, Worker

from service.spec.keys import Keys
from service.state.holders import clear_if_gone, holder_token
from service.state.queue import QUEUE_NAME
from tests.helpers import apply, mixed_stream

EXE = str(Path(sys.executable).with_name("persona-sync"))


def env_for(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("QUEUE_REDIS_URL", "MAVERA_API_KEY")}
    env.update(REDIS_URL=redis_url, LOG_LEVEL="WARNING")
    return env


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def worker(redis_url: str) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen([EXE, "worker"], env=env_for(redis_url), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    queue = Queue(QUEUE_NAME, connection=redis.Redis.from_url(redis_url))
    deadline = time.monotonic() + 60
    while not Worker.count(queue=queue):  # registered: the command would otherwise say no worker runs
        assert time.monotonic() < deadline and proc.poll() is None, "the worker did not start"
        time.sleep(0.1)
    yield proc
    proc.terminate()
    proc.wait(20)


def test_recompute_clears_a_dead_holders_lock_and_rebuilds_now(worker: subprocess.Popen, r: redis.Redis,
                                                                redis_url: str) -> None:
    apply(r, mixed_stream(300, users=12, seed=7))
    keys = Keys("default")
    dead = holder_token().replace(f":{os.getpid()}:", f":{dead_pid()}:")  # a lock no one will renew
    r.set(keys.recompute_lock, dead, ex=3600)
    out = subprocess.run([EXE, "recompute", "--space", "default"], env=env_for(redis_url), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cleared the recompute lock" in out.stdout and "default: 12 profiles" in out.stdout
    assert r.hlen(keys.contributions) == 12 and r.hlen(keys.clusters) > 0


def test_recompute_waits_for_a_live_holder_rather_than_clearing_it(r: redis.Redis, redis_url: str) -> None:
    apply(r, mixed_stream(50, users=3, seed=1))
    keys = Keys("default")
    r.set(keys.recompute_lock, holder_token(), ex=3600)  # this test process: alive
    out = subprocess.run([EXE, "recompute"], env=env_for(redis_url), capture_output=True, text=True, timeout=60)
    assert r.exists(keys.recompute_lock)  # never cleared under a live holder
    assert "a recompute is running" in out.stdout
    assert out.returncode == 1 and "no worker is running" in out.stderr  # and says what to do next


def test_only_a_lock_whose_process_is_gone_here_is_cleared(r: redis.Redis) -> None:
    mine = holder_token()
    dead = mine.replace(f":{os.getpid()}:", f":{dead_pid()}:")
    elsewhere = "another-host" + dead[dead.index(":"):]
    for token, cleared in ((mine, False), (elsewhere, False), ("an-old-style-token", False), (dead, True)):
        r.set("lock", token)
        assert (clear_if_gone(r, "lock") is not None) == cleared, token
        assert r.exists("lock") != cleared


def test_recompute_of_a_space_without_data_is_refused_rather_than_creating_it(r: redis.Redis,
                                                                              redis_url: str) -> None:
    apply(r, mixed_stream(20, users=2, seed=1))
    out = subprocess.run([EXE, "recompute", "--space", "defualt"], env=env_for(redis_url), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "no space 'defualt' has any data" in out.stderr, out.stderr
    from service.state.status import spaces
    assert spaces(r) == ["default"]


def test_recompute_counts_only_live_workers(r: redis.Redis, redis_url: str) -> None:
    """A worker killed outright stays in rq's set of workers until someone cleans it up: counted as running, the
    command queued its job and waited for it without end."""
    from rq.worker_registration import WORKERS_BY_QUEUE_KEY

    apply(r, mixed_stream(20, users=2, seed=1))
    r.sadd(WORKERS_BY_QUEUE_KEY % QUEUE_NAME, "rq:worker:killed-outright")  # its own key has expired
    out = subprocess.run([EXE, "recompute"], env=env_for(redis_url), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no worker is running" in out.stderr, out.stderr
    assert Queue(QUEUE_NAME, connection=r).count == 0  # nothing left queued for nobody
