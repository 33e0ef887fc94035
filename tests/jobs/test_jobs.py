"""The RQ entry points (workers/jobs.py) over real Redis and a real queue: what happens when a space is busy."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from rq import Queue
from rq.registry import ScheduledJobRegistry

from service.config import Settings
from service.spec.keys import Keys
from service.state.queue import CRON_CONFIG, QUEUE_NAME
from service.state.refresh import RefreshWatchdog
from tests.helpers import apply, mixed_stream
from tests.mavera_server import API_KEY, MaveraServer
from workers import jobs, recompute


@pytest.fixture
def env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.delenv("QUEUE_REDIS_URL", raising=False)
    monkeypatch.setattr(recompute, "LOCK_WAIT", 0.3)
    monkeypatch.setattr(jobs, "REFRESH_LOCK_WAIT", 0.3)


def test_a_refresh_that_finds_the_space_locked_steps_aside_and_the_watchdog_brings_it_back(
        env: None, r: redis.Redis) -> None:
    apply(r, mixed_stream(200, users=10, seed=3))
    queue = Queue(QUEUE_NAME, connection=r)
    watchdog = RefreshWatchdog(r, queue, debounce=0.05)
    with recompute.space_lock(r, "default"):  # a long full recompute is running
        assert "deferred" in jobs.refresh("default")
        assert watchdog.check() == []  # a live holder's space is left alone
    assert r.scard(Keys("default").dirty) == 10  # nothing was lost: the dirty marks wait
    assert watchdog.check() == ["default"] and watchdog.check() == []  # queued once, not on every pass
    [job] = queue.get_jobs()
    assert job.func_name == "workers.jobs.refresh" and not ScheduledJobRegistry(queue=queue).get_job_ids()
    assert jobs.refresh(*job.args)["profiles"] == 10  # the queued run does the work


def test_the_watchdog_leaves_a_queued_refresh_alone_and_replaces_a_lost_one(env: None, r: redis.Redis) -> None:
    apply(r, mixed_stream(100, users=4, seed=3))
    queue = Queue(QUEUE_NAME, connection=r)
    watchdog = RefreshWatchdog(r, queue, debounce=0.05)
    assert watchdog.check() == ["default"]
    time.sleep(0.1)  # its debounce marker expired; the job still waits behind a long one in the queue
    assert watchdog.check() == []
    [job] = queue.get_jobs()
    job.delete()  # lost (a Redis restart from an older snapshot, a flushed queue)
    assert watchdog.check() == ["default"]


def test_a_failing_refresh_is_retried_with_back_off(env: None, r: redis.Redis,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    apply(r, mixed_stream(100, users=4, seed=3))
    keys = Keys("default")
    watchdog = RefreshWatchdog(r, Queue(QUEUE_NAME, connection=r), debounce=0.05)

    def broken(*args: object, **kwargs: object) -> dict:
        raise RuntimeError("a bug in the recompute")

    working = recompute.refresh
    monkeypatch.setattr(recompute, "refresh", broken)
    for failures, backoff in ((1, 5), (2, 10), (3, 20)):
        with pytest.raises(RuntimeError):
            jobs.refresh("default")
        assert int(r.get(keys.refresh_failures)) == failures and abs(r.ttl(keys.refresh_backoff) - backoff) <= 1
        time.sleep(0.1)
        assert watchdog.check() == []  # no retry while backing off
    monkeypatch.setattr(recompute, "refresh", working)
    r.delete(keys.refresh_backoff)  # the back-off ran out
    assert jobs.refresh("default")["profiles"] == 4
    assert not r.exists(keys.refresh_failures, keys.refresh_backoff)


def test_a_refresh_killed_mid_run_is_resumed_within_the_lock_ttl(env: None, r: redis.Redis) -> None:
    """A worker SIGKILLed inside a refresh leaves its lock and its taken dirty marks: the lock lapses within
    LOCK_TTL (nobody renews it), and the watchdog then queues a refresh that merges the marks back."""
    import multiprocessing

    apply(r, mixed_stream(300, users=12, seed=5))
    keys = Keys("default")
    ready = multiprocessing.get_context("fork").Event()

    def crash_inside_refresh() -> None:
        client = redis.Redis.from_url(os.environ["REDIS_URL"])
        with recompute.space_lock(client, "default"):
            client.rename(keys.dirty, keys.dirty_work)  # what a refresh does first
            ready.set()
            time.sleep(60)

    child = multiprocessing.get_context("fork").Process(target=crash_inside_refresh)
    child.start()
    assert ready.wait(10)
    child.kill()
    child.join()
    queue = Queue(QUEUE_NAME, connection=r)
    watchdog = RefreshWatchdog(r, queue, debounce=0.05)
    assert watchdog.check() == []  # the dead holder's lock has not lapsed yet
    deadline = time.monotonic() + recompute.LOCK_TTL + 5
    while not watchdog.check():
        assert time.monotonic() < deadline, "the dead holder's lock never lapsed"
        time.sleep(0.2)
    [job] = queue.get_jobs()
    assert jobs.refresh(*job.args)["profiles"] == 12
    assert not r.exists(keys.dirty_work) and r.hlen(keys.contributions) == 12


def test_full_recompute_skips_a_locked_space_and_does_the_others(env: None, r: redis.Redis) -> None:
    apply(r, mixed_stream(200, users=10, seed=3))
    apply(r, [dict(e, messageId="b-" + e["messageId"]) for e in mixed_stream(100, users=5, seed=4)], space="spa_b")
    with recompute.space_lock(r, "default"):
        reports = jobs.full_recompute()
    assert [("skipped" in rep, rep["space"]) for rep in reports] == [(True, "default"), (False, "spa_b")]
    assert reports[1]["profiles"] == 5
    syncs = [j for j in Queue(QUEUE_NAME, connection=r).get_jobs() if j.func_name == "workers.jobs.sync"]
    assert [j.args for j in syncs] == [("spa_b",)] and syncs[0].timeout >= 5 * 120


def test_rq_cron_runs_the_full_recompute_on_the_configured_schedule(env: None, r: redis.Redis,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import timedelta

    from rq.cron import CronScheduler


    monkeypatch.setenv("FULL_RECOMPUTE_CRON", "*/5 * * * *")
    scheduler = CronScheduler(connection=r)
    scheduler.load_config_from_file(CRON_CONFIG)  # what `persona-sync cron` hands to `rq cron`
    [cron_job] = scheduler.get_jobs()
    assert (cron_job.func_name, cron_job.cron, cron_job.queue_name) == (
        "workers.jobs.full_recompute_each_space", "*/5 * * * *", QUEUE_NAME)
    cron_job.next_enqueue_time -= timedelta(minutes=5)  # it is due
    assert scheduler.enqueue_jobs() == [cron_job]
    queue = Queue(QUEUE_NAME, connection=r)
    [job] = queue.get_jobs()
    assert job.func_name == "workers.jobs.full_recompute_each_space"
    # it queues one full recompute per space, each with an hour of its own (one job for all spaces ran them in
    # turn within one hour, and never reached the last spaces of a deployment that needed more)
    apply(r, mixed_stream(100, users=4, seed=3))
    apply(r, [dict(e, messageId="b-" + e["messageId"]) for e in mixed_stream(100, users=4, seed=4)], space="spa.b")
    job.delete()
    assert jobs.full_recompute_each_space() == ["default", "spa.b"]  # a '.' is no letter of an RQ job id
    per_space = queue.get_jobs()
    assert [(j.func_name, j.args, j.timeout) for j in per_space] == [
        ("workers.jobs.full_recompute", ("default",), 3600), ("workers.jobs.full_recompute", ("spa.b",), 3600)]
    assert jobs.full_recompute_each_space() == []  # still waiting: not queued twice
    queue.remove(per_space[0])  # a worker took it and ran it
    reports = jobs.full_recompute(*per_space[0].args)
    assert reports[0]["space"] == "default" and reports[0]["profiles"] == 4
    assert jobs.full_recompute_each_space() == ["default"]  # done: the next tick queues it again


@pytest.fixture
def mavera_env(env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[MaveraServer]:
    with MaveraServer() as server:
        monkeypatch.setenv("MAVERA_API_KEY", API_KEY)
        monkeypatch.setenv("MAVERA_BASE_URL", server.url)
        monkeypatch.setenv("MAVERA_TIMEOUT", "1s")
        yield server


def customers(r: redis.Redis, tag: str, n: int, ltv: float, churn: float, ts: str = "2026-03-01T00:00:00Z") -> None:
    apply(r, [{"type": "identify", "userId": f"{tag}-{i}", "messageId": f"{tag}-{i}-{ts}", "timestamp": ts,
               "traits": {"ltv": ltv, "churn_risk": churn}} for i in range(n)])


def test_a_sync_that_finds_another_running_leaves_a_note_and_the_running_one_goes_round_again(
        mavera_env: MaveraServer, r: redis.Redis) -> None:
    customers(r, "hv", 4, 900, 0.05)
    recompute.refresh(r, Settings(), "default")
    mavera_env.fault("GET", "/personas", sleep=0.8)  # the first sync is slow to list
    first: dict = {}
    runner = threading.Thread(target=lambda: first.update(jobs.sync("default")))
    runner.start()
    time.sleep(0.3)
    customers(r, "hv2", 1, 1500, 0.01, ts="2026-03-02T00:00:00Z")  # changes while the first sync runs
    recompute.refresh(r, Settings(), "default")
    second = jobs.sync("default")
    assert second.get("coalesced")  # returned at once: no second sync of the space in parallel
    runner.join(30)
    assert len(mavera_env.calls("POST", "/personas")) == 1  # one create, never two
    [patch] = mavera_env.calls("PATCH")  # the first sync went round again and sent the change
    assert "5 customers" in patch["json"]["description"]
    assert not r.exists(Keys("default").sync_wanted)


def test_a_sync_that_only_needs_time_queues_another(mavera_env: MaveraServer, r: redis.Redis) -> None:
    customers(r, "hv", 4, 900, 0.05)
    recompute.refresh(r, Settings(), "default")
    # the connection drops before Mavera creates anything: the lookup right after finds nothing, so the create
    # must wait out its grace period (a create that Mavera did perform is adopted at once: tests/test_sync.py)
    mavera_env.fault("POST", "/personas", status=503, lose=True)
    with pytest.raises(RuntimeError, match="may exist|RemoteProtocolError|POST"):
        jobs.sync("default")
    [job_id] = ScheduledJobRegistry(queue=Queue(QUEUE_NAME, connection=r)).get_job_ids()
    assert Queue(QUEUE_NAME, connection=r).fetch_job(job_id).func_name == "workers.jobs.sync"


def scheduled_syncs(r: redis.Redis) -> list[str]:
    queue = Queue(QUEUE_NAME, connection=r)
    return [queue.fetch_job(i).func_name for i in ScheduledJobRegistry(queue=queue).get_job_ids()]


def test_a_persona_that_meets_mavera_s_5xx_past_the_client_s_retries_gets_another_sync(
        mavera_env: MaveraServer, r: redis.Redis) -> None:
    """A PATCH answered 503 on every attempt (or a gateway's 502) leaves the persona stale: the job fails, for
    the operator to see, and queues another sync for later, as it does for a rate limit."""
    customers(r, "hv", 4, 900, 0.05)
    recompute.refresh(r, Settings(), "default")
    jobs.sync("default")
    customers(r, "hv2", 1, 1500, 0.01, ts="2026-03-02T00:00:00Z")
    recompute.refresh(r, Settings(), "default")
    mavera_env.fault("PATCH", None, status=502)
    with pytest.raises(RuntimeError, match="502"):
        jobs.sync("default")
    assert scheduled_syncs(r) == ["workers.jobs.sync"]


def test_a_narrative_that_meets_a_long_rate_limit_gets_another_sync(mavera_env: MaveraServer,
                                                                   r: redis.Redis) -> None:
    apply(r, [{"type": "identify", "userId": f"mob-{i}", "messageId": f"mob-{i}", "timestamp": "2026-11-20T10:00:00Z",
               "traits": {"ltv": 300}, "context": {"library": {"name": "analytics-ios"}}} for i in range(4)])
    recompute.refresh(r, Settings(), "default")
    mavera_env.fault("POST", "/mave/chat", status=429, retry_after=120)
    with pytest.raises(RuntimeError, match="narrative: .*wait 120s"):
        jobs.sync("default")
    assert scheduled_syncs(r) == ["workers.jobs.sync"]


def test_a_sync_killed_mid_run_is_queued_again_once_its_lock_lapsed(mavera_env: MaveraServer, r: redis.Redis,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker SIGKILLed inside a sync (OOM, a deploy) leaves the sync's note: the worker's watchdog queues the
    sync again once the dead one's lock lapsed, and that sync creates the persona. Before, the note was taken at
    the start of the round and nothing remembered the sync."""
    import multiprocessing

    customers(r, "hv", 4, 900, 0.05)
    recompute.refresh(r, Settings(), "default")
    keys = Keys("default")
    monkeypatch.setattr(jobs, "SYNC_LOCK_TTL", 4.0)  # 60 s in production; longer than the create lock (3 s)
    mavera_env.fault("GET", "/personas", sleep=30)  # the sync lists personas before it creates one
    child = multiprocessing.get_context("fork").Process(target=jobs.sync, args=("default",))
    child.start()
    deadline = time.monotonic() + 10
    while not mavera_env.calls("GET", "/personas"):
        assert time.monotonic() < deadline, "the sync never asked Mavera"
        time.sleep(0.05)
    child.kill()
    child.join()
    queue = Queue(QUEUE_NAME, connection=r)
    watchdog = RefreshWatchdog(r, queue, debounce=0.05, mave_chat_timeout=1)
    assert r.exists(keys.sync_wanted) and watchdog.check_syncs() == []  # the dead sync's lock still holds
    deadline = time.monotonic() + 10
    while not watchdog.check_syncs():
        assert time.monotonic() < deadline, "the dead sync was never queued again"
        time.sleep(0.2)
    [job] = queue.get_jobs()
    assert job.func_name == "workers.jobs.sync"
    # every worker runs a watchdog: the others do not queue it again while it waits behind long jobs
    others = [RefreshWatchdog(r, queue, debounce=0.05, mave_chat_timeout=1) for _ in range(2)]
    for _ in range(3):
        assert [w.check_syncs() for w in [watchdog, *others]] == [[], [], []]
    assert len(queue.get_jobs()) == 1
    mavera_env.state.faults.clear()
    assert jobs.sync(*job.args)["personas"]["created"] == ["high_value"]
    assert not r.exists(keys.sync_wanted) and watchdog.check_syncs() == [] and watchdog.check_syncs() == []


def test_a_refresh_waits_for_its_own_debounce_marker_only(env: None, r: redis.Redis) -> None:
    apply(r, mixed_stream(100, users=5, seed=2))
    r.set(Keys("default").refresh_pending, "tok-1", px=700)  # the job came due a little early
    started = time.monotonic()
    assert jobs.refresh("default", "tok-1")["profiles"] == 5
    assert time.monotonic() - started >= 0.6
    apply(r, [dict(e, messageId="n-" + e["messageId"]) for e in mixed_stream(100, users=5, seed=2)])
    r.set(Keys("default").refresh_pending, "tok-2", px=5000)  # a newer marker belongs to the next refresh
    started = time.monotonic()
    jobs.refresh("default", "tok-1")
    assert time.monotonic() - started < 2


def test_a_refresh_under_other_rules_than_the_last_recompute_warns_that_workers_may_differ(
        env: None, r: redis.Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Two workers with different feature settings make every refresh a full recompute: say so in the log."""
    apply(r, mixed_stream(200, users=10, seed=3))
    recompute.refresh(r, Settings(), "default")
    monkeypatch.setenv("ANALYSIS_WINDOW_DAYS", "90")  # this worker's settings differ from the last recompute's
    for n in range(2):
        apply(r, [{"type": "identify", "userId": "user-1", "messageId": f"later-{n}", "traits": {"ltv": n}}])
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="jobs"):
            report = jobs.refresh("default")
        warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
        if n == 0:  # the first refresh under the new settings recomputes everything, and says why
            assert report["full"] and report["reason"] == recompute.RULES_MOVED
            assert len(warnings) == 1 and "ANALYSIS_WINDOW_DAYS" in warnings[0].getMessage()
        else:  # the same settings again: an ordinary refresh, no warning
            assert not report.get("full") and report["profiles"] == 1 and not warnings
