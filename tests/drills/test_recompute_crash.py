"""Crash drill of the full recompute shared out as RQ jobs (``RECOMPUTE_MODE=jobs``): real ``persona-sync worker``
processes SIGKILLed — the worker and the job process it forked — in the middle of the map phase. The run still
completes, with the result a local full recompute of the same profiles gives:

- a worker computing a chunk dies: the run's owner computes that chunk once the dead worker's lease is gone;
- the only worker, owning the run, dies: a worker started afterwards takes the run over from a queued chunk job
  and finishes it, computing only the chunks the dead owner had not stored.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry

from bench.recompute import load
from service.config import Settings
from service.spec.keys import Keys
from service.state.queue import FULL_RECOMPUTE_JOB, QUEUE_NAME
from tests.drills.stack import wait_until
from tests.helpers import NOW, recomputed
from workers import recompute

EXE = str(Path(sys.executable).with_name("persona-sync"))
K = Keys("default")
PROFILES = 60_000  # 12 chunks of 5,000 profiles: each takes long enough to be caught in the middle


def start_worker(redis_url: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("QUEUE_REDIS_URL", "MAVERA_API_KEY")}
    env.update(REDIS_URL=redis_url, LOG_LEVEL="WARNING", RECOMPUTE_MODE="jobs")
    return subprocess.Popen([EXE, "worker", "--burst"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, process_group=0)


def kill(worker: subprocess.Popen, job_process: int) -> None:
    """SIGKILL the worker and the job process it forked (RQ puts that one in a process group of its own)."""
    for group in (worker.pid, job_process):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    worker.wait()


def pid_of(token: bytes | None) -> int | None:
    """The process named by a lock or lease token (``service.state.holders.holder_token``)."""
    return int(token.decode().split(":")[2]) if token else None


def until(check: Callable[[], object], seconds: float, what: str) -> object:
    """Asked every 2 ms: the drill kills a process at a moment that may last only a little longer."""
    return wait_until(check, seconds, what, every=0.002)


@pytest.fixture
def workers(redis_url: str) -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_id(r: redis.Redis) -> str:
    return until(lambda: r.hget(K.recompute_run, "state") == b"mapping" and r.hget(K.recompute_run, "id"),
                 120, "the run was planned").decode()  # type: ignore[union-attr]


def test_a_worker_killed_in_the_middle_of_a_chunk_leaves_it_to_the_owner(
        r: redis.Redis, redis_url: str, workers: list[subprocess.Popen]) -> None:
    load(r, K, PROFILES, NOW)
    queue = Queue(QUEUE_NAME, connection=r)
    job = queue.enqueue(FULL_RECOMPUTE_JOB, "default", job_timeout=600)
    workers.append(start_worker(redis_url))
    run = run_id(r)
    owner = pid_of(r.get(K.recompute_lock))
    workers.append(helper := start_worker(redis_url))

    def helper_busy() -> tuple[int, int] | None:  # (chunk, job process) once the helper stored a chunk and holds one
        for key in r.scan_iter(match=K.recompute_claim(run, 0)[:-1] + "*", count=1000):
            holder = pid_of(r.get(key))
            index = int(key.decode().rsplit(":", 1)[1])
            if holder and holder != owner and 0 < index == r.exists(*(K.recompute_part(run, i) for i in range(index))):
                return index, holder
        return None

    index, job_process = until(helper_busy, 60, "the helper was computing a chunk")  # type: ignore[misc]
    kill(helper, job_process)
    assert not r.exists(K.recompute_part(run, index)), "the kill landed after the chunk was stored"
    assert workers[0].wait(120) == 0
    [report] = job.return_value()
    assert report["profiles"] == PROFILES and report["workers"] == 2  # the helper's stored chunks count
    shared = recomputed(r)
    assert recompute.full_recompute(r, Settings(), "default", now_ms=report["now_ms"])["changed_clusters"] == []
    assert recomputed(r) == shared
    # RQ finds the killed job abandoned once the worker's heartbeat lapses (here: now) and retries it; the retry
    # finds the run over and does nothing
    [killed] = StartedJobRegistry(queue=queue).get_job_ids()
    StartedJobRegistry(queue=queue).cleanup(timestamp=time.time() + 3600)
    [retried] = queue.get_jobs()
    assert retried.id == killed and retried.id.startswith(f"recompute-{run}-") and retried.retries_left == 1
    workers.append(start_worker(redis_url))
    assert workers[-1].wait(60) == 0
    assert Job.fetch(retried.id, connection=r).return_value()["skipped"] == "the run is over"
    assert not FailedJobRegistry(queue=queue).get_job_ids()


def test_the_only_worker_killed_while_it_owns_the_run_is_taken_over_by_the_next(
        r: redis.Redis, redis_url: str, workers: list[subprocess.Popen]) -> None:
    load(r, K, PROFILES, NOW)
    queue = Queue(QUEUE_NAME, connection=r)
    queue.enqueue(FULL_RECOMPUTE_JOB, "default", job_timeout=600)
    workers.append(owner := start_worker(redis_url))
    run = run_id(r)
    now_ms = int(r.hget(K.recompute_run, "now_ms"))  # type: ignore[arg-type]
    parts = [K.recompute_part(run, i) for i in range(12)]
    until(lambda: r.exists(*parts) >= 3, 60, "the owner stored some chunks")
    kill(owner, pid_of(r.get(K.recompute_lock)))  # type: ignore[arg-type]
    stored = r.exists(*parts)
    assert 3 <= stored < 12 and r.exists(K.recompute_lock)  # caught in the middle, its lock not lapsed yet

    workers.append(start_worker(redis_url))  # a worker again: it runs the chunk jobs the dead owner queued
    assert workers[-1].wait(120) == 0
    # a chunk job found the owner gone (its process no longer exists here, else its lock lapsed) and took over;
    # it dropped the chunk jobs still queued
    results = [Job.fetch(f"recompute-{run}-{i}", connection=r).return_value()
               for i in range(12) if Job.exists(f"recompute-{run}-{i}", connection=r)]
    [taken] = [result["resumed"] for result in results if "resumed" in result]
    computed_first = sum(len(result["computed"]) for result in results)  # by the chunk jobs before the takeover
    assert taken["resumes"] == 1 and taken["profiles"] == PROFILES and taken["now_ms"] == now_ms
    assert taken["chunks_here"] == 12 - stored - computed_first  # what the dead owner stored was kept
    assert not r.exists(K.recompute_run, K.recompute_lock, K.dirty_full)
    # no plan or part left; only a lease of the dead owner may still wait to lapse (killed between storing its
    # chunk and letting go of it)
    assert not [key for key in r.keys("*:w:run:*") if b":claim:" not in key]
    assert not queue.get_job_ids()
    shared = recomputed(r)
    assert recompute.full_recompute(r, Settings(), "default", now_ms=now_ms)["changed_clusters"] == []
    assert recomputed(r) == shared
