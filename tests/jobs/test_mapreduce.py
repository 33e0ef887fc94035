"""The full recompute shared out as RQ jobs (workers/mapreduce.py), over real Redis and real ``persona-sync worker``
processes: the same result as the local recompute, a chunk counted once however often it is done, and a run
whose owner died finished by whoever takes it over."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry

from bench.recompute import load
from service.config import Settings
from service.spec.keys import Keys
from service.state.connect import state_client
from service.state.queue import FULL_RECOMPUTE_JOB, QUEUE_NAME
from service.state.refresh import RefreshWatchdog
from tests.drills.stack import wait_until
from tests.helpers import NOW, apply, big_if_ltv_above, mixed_stream, recomputed
from workers import jobs, mapreduce, recompute

BOTH_BACKENDS = True  # each test runs on a standalone Redis and on a Redis Cluster (tests/conftest.py)
EXE = str(Path(sys.executable).with_name("persona-sync"))
K = Keys("default")


def burst_worker(redis_env: dict[str, str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("QUEUE_REDIS_URL", "MAVERA_API_KEY", "REDIS_CLUSTER")}
    env.update(redis_env, LOG_LEVEL="WARNING", RECOMPUTE_MODE="jobs")
    return subprocess.Popen([EXE, "worker", "--burst"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def env(redis_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The job functions, called here, read their Redis from the environment as a worker's do."""
    for name in ("QUEUE_REDIS_URL", "REDIS_CLUSTER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in redis_env.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def queue(queue_url: str) -> Queue:
    return Queue(QUEUE_NAME, connection=redis.Redis.from_url(queue_url))


def test_chunk_jobs_on_another_worker_give_the_local_result(r: redis.Redis, redis_env: dict[str, str],
                                                           queue: Queue) -> None:
    """The scheduled job in a real worker owns the run; a second worker, started once the chunk jobs are queued,
    computes chunks from the front while the owner works from the back."""
    load(r, K, 30_000, NOW)
    job = queue.enqueue(FULL_RECOMPUTE_JOB, "default", job_timeout=600)
    owner = burst_worker(redis_env)
    wait_until(lambda: r.hget(K.recompute_run, "state") == b"mapping", 60, "the run was planned")
    helper = burst_worker(redis_env)
    assert owner.wait(120) == 0 and helper.wait(120) == 0
    [report] = job.return_value()
    assert report["mode"] == "jobs" and report["profiles"] == 30_000 and report["chunks"] == 6
    assert report["workers"] == 2 and 0 < report["chunks_here"] < report["chunks"]  # both computed chunks
    shared = recomputed(r)
    assert not r.exists(K.recompute_run, K.recompute_lock, K.dirty_full) and not r.keys("*:w:run:*")
    assert not queue.get_job_ids() and not FailedJobRegistry(queue=queue).get_job_ids()
    local = recompute.full_recompute(r, Settings(), "default", now_ms=report["now_ms"])
    assert local["changed_clusters"] == [] and recomputed(r) == shared


def test_a_chunk_done_twice_counts_once(env: None, r: redis.Redis) -> None:
    """Two processes may both finish a chunk (a lease lapsed under a slow one) and RQ may run a chunk job again:
    the first write wins, the others change nothing, and a process of another run writes nothing at all."""
    s = Settings()
    apply(r, mixed_stream(3000, users=150, seed=11))
    expected = (recompute.full_recompute(r, s, "default", now_ms=NOW), recomputed(r))[1]
    seen = {}

    def meanwhile(space: str, run_id: str, chunks: list[int]) -> None:  # called once the chunk jobs would be queued
        run = mapreduce.Run.load(r, K)
        assert run is not None and run.id == run_id and chunks == [0]
        decoded = recompute.connect_decoded(r)
        ids = r.hget(K.recompute_plan(run_id), "0")
        part = recompute.chunk_result(recompute.chunk_entries(decoded, K, orjson.loads(ids), recompute.rules_for(s), s,
                                                              run.now_ms))
        seen["first"] = mapreduce.store_chunk(r, K, run_id, 0, *part)
        seen["second"] = mapreduce.store_chunk(r, K, run_id, 0, *part)  # another process computed it too
        seen["other run"] = mapreduce.store_chunk(r, K, "0" * 32, 1, *part)
        seen["job again"] = mapreduce.run_chunk(r, s, space, run_id, 0, meanwhile)["computed"]
        decoded.close()

    report = mapreduce.full_recompute(r, s, "default", meanwhile, now_ms=NOW)
    assert seen == {"first": True, "second": False, "other run": False, "job again": []}
    assert report["chunks"] == 1 and report["chunks_here"] == 0 and report["changed_clusters"] == []
    assert recomputed(r) == expected


def _die_owning_a_run(planned: multiprocessing.synchronize.Event) -> None:
    """A run's owner that dies once it planned the run and queued its chunk jobs (as a worker killed there would)."""

    def die(*args: object) -> None:
        planned.set()
        time.sleep(60)

    mapreduce._drive = die  # type: ignore[assignment]  # in this forked process only
    mapreduce.full_recompute(state_client(Settings.from_env()), Settings(), "default", lambda *a: None, now_ms=NOW)


def test_a_run_whose_owner_died_is_finished_by_the_refresh_the_watchdog_queues(
        env: None, r: redis.Redis, queue: Queue) -> None:
    """No chunk job is left to take the run over (none was queued): once the dead owner's lock lapses the
    watchdog queues a refresh, and the refresh finishes the run before it refreshes."""
    apply(r, mixed_stream(3000, users=150, seed=11))
    expected = (recompute.full_recompute(r, Settings(), "default", now_ms=NOW), recomputed(r))[1]
    ctx = multiprocessing.get_context("fork")
    planned = ctx.Event()
    owner = ctx.Process(target=_die_owning_a_run, args=(planned,))
    owner.start()
    assert planned.wait(30)
    owner.kill()
    owner.join()
    watchdog = RefreshWatchdog(r, queue, debounce=0.05)
    assert watchdog.check() == []  # the dead owner's lock has not lapsed yet
    wait_until(watchdog.check, recompute.LOCK_TTL + 5, "the watchdog queued a refresh")
    [job] = queue.get_jobs()
    report = jobs.refresh(*job.args)
    assert report["mode"] == "jobs" and report["resumes"] == 1 and report["chunks_here"] == report["chunks"]
    assert recomputed(r) == expected and not r.exists(K.recompute_run, K.dirty_full)


def _planning(r: redis.Redis) -> None:
    raise SystemExit  # the owner dies before its plan is complete


def _taken_over_too_often(r: redis.Redis) -> None:
    if r.hget(K.recompute_run, "state") == b"mapping":
        r.hset(K.recompute_run, "resumes", mapreduce.MAX_RESUMES)
        raise SystemExit


@pytest.mark.parametrize("death", [_planning, _taken_over_too_often])
def test_a_run_that_cannot_be_resumed_is_given_up_and_its_marks_refreshed(env: None, r: redis.Redis,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          death) -> None:  # type: ignore[no-untyped-def]
    s = Settings()
    apply(r, mixed_stream(600, users=30, seed=3))
    recompute.refresh(r, s, "default", now_ms=NOW)
    apply(r, [{"type": "identify", "userId": "user-1", "messageId": "late", "traits": {"ltv": 1}}])
    monkeypatch.setattr(mapreduce, "_drive", lambda *args: death(r))
    with pytest.raises(SystemExit):
        mapreduce.full_recompute(r, s, "default", lambda *args: death(r), now_ms=NOW)
    assert r.exists(K.recompute_run) and r.scard(K.dirty_full) == 1 and r.hlen(K.contributions) == 30
    report = jobs.refresh("default")  # resumes nothing: gives the run up and refreshes the marks it had taken
    assert "mode" not in report and report["profiles"] == 1
    assert not r.exists(K.recompute_run, K.dirty_full) and not r.keys("*:w:run:*")


def test_the_owner_drops_the_chunk_jobs_no_worker_started(r: redis.Redis, redis_env: dict[str, str],
                                                          queue: Queue) -> None:
    """One worker: it owns the run and computes every chunk; the chunk jobs it queued are taken off the queue."""
    apply(r, mixed_stream(3000, users=150, seed=11))
    job = queue.enqueue(FULL_RECOMPUTE_JOB, "default", job_timeout=600)
    assert burst_worker(redis_env).wait(120) == 0
    [report] = job.return_value()
    assert report["chunks"] == report["chunks_here"] == 1 and report["workers"] == 1
    assert not Job.exists(f"recompute-{report['run']}-0", connection=queue.connection) and not queue.get_job_ids()


def test_in_jobs_mode_a_new_days_refresh_shares_its_full_recompute_out(env: None, r: redis.Redis,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """RECOMPUTE_MODE=jobs is for spaces one machine is too slow for: the full recompute a refresh owes to a new
    UTC day (or new rules) is shared out as chunk jobs too, not run by the one worker that took the refresh."""
    from service.spec.keys import DAY_MS

    monkeypatch.setenv("RECOMPUTE_MODE", "jobs")
    apply(r, mixed_stream(600, users=30, seed=5))
    recompute.refresh(r, Settings(), "default", now_ms=NOW - 2 * DAY_MS)  # the stored basis: two days ago
    apply(r, [{"type": "identify", "userId": "user-1", "messageId": "today", "traits": {"ltv": 1}}])
    report = jobs.refresh("default")
    assert report["mode"] == "jobs" and "new UTC day" in report["reason"] and report["profiles"] == 30
    assert not r.exists(K.recompute_run, K.dirty, K.dirty_full)
    assert recompute.refresh(r, Settings(), "default")["profiles"] == 0  # today's basis now: incremental again


def test_a_shared_run_records_the_rules_it_started_with(env: None, r: redis.Redis, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rules edited while a shared run computes: the run records the rules it started with, so the next refresh
    sees that the rules changed and recomputes, rather than take the old rules' result for the new ones'."""
    rules = tmp_path / "rules.json"

    def write(threshold: int) -> None:
        big_if_ltv_above(rules, threshold)

    write(500)
    s = Settings(cluster_rules_file=str(rules))
    apply(r, mixed_stream(200, users=10, seed=6))
    started = recompute.basis(s, recompute.as_of(NOW))
    drive = mapreduce._drive

    def edit_then_drive(*args, **kwargs):  # type: ignore[no-untyped-def]
        write(1000)
        return drive(*args, **kwargs)

    monkeypatch.setattr(mapreduce, "_drive", edit_then_drive)
    mapreduce.full_recompute(r, s, "default", lambda *args: None, now_ms=NOW)
    assert r.get(K.recompute_basis).decode() == started
    assert "rules" in recompute.refresh(r, s, "default", now_ms=NOW)["reason"]
