"""Issue 12 §4, a status a person can act on: per-minute outcome counters shared by web processes, the status
report over HTTP and in the CLI, and each problem with what to run next. Real Redis, real RQ, real processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aredis
from rq import Queue
from starlette.testclient import TestClient

from service.config import Settings
from service.http.app import create_app
from service.spec.keys import Keys
from service.state.ops import pause
from service.state.queue import QUEUE_NAME
from service.state.rates import RATE_TTL, RateCounter
from service.state.replay import Options, file_records, run
from service.state.status import collect
from tests.conftest import ADMIN_TOKEN
from tests.http.test_openapi_responses import Checked
from tests.http.test_receiver import post

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
EXE = str(Path(sys.executable).with_name("persona-sync"))


def identify(user: str, mid: str, ts: str = "2026-03-01T10:00:00Z") -> bytes:
    return orjson.dumps({"type": "identify", "userId": user, "messageId": mid, "timestamp": ts})


def test_every_outcome_is_counted_once_whichever_web_process_took_it(settings: Settings, redis_url: str,
                                                                     r: redis.Redis) -> None:
    with TestClient(create_app(settings, redis_url, "")) as a, TestClient(create_app(settings, redis_url, "")) as b:
        assert post(a, identify("u1", "m1")).json()["accepted"] == 1
        assert post(b, identify("u1", "m1")).json()["duplicate"] == 1  # Segment's retry, to the other process
        batch = orjson.dumps([{"type": "identify", "userId": "u2", "messageId": "m2"},
                              {"type": "track", "event": "x", "messageId": "no-ids"}])
        assert post(b, batch).json() | {"errors": None} == {"accepted": 1, "duplicate": 0, "suppressed": 0,
                                                             "rejected": 1, "errors": None}
        delete = orjson.dumps({"type": "delete", "userId": "u1", "messageId": "d1",
                               "timestamp": "2026-03-02T10:00:00Z"})
        assert post(a, delete).json()["accepted"] == 1
        assert post(b, identify("u1", "m3", "2026-03-02T09:00:00Z")).json()["suppressed"] == 1  # before the delete
        assert post(a, b'{"type": "identify", ').status_code == 400  # signed but malformed: rejected whole
        assert a.post("/segment", content=identify("u9", "m9")).status_code == 401  # unsigned: a refusal
        expected = {"accepted": 3, "duplicate": 1, "rejected": 2, "suppressed": 1}
        deadline = time.monotonic() + 10  # both processes flush on their own, about once a second
        while True:
            status = a.get("/admin/status", headers=ADMIN).json()
            if status["spaces"][0]["events"]["last_hour"] == expected or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    row = status["spaces"][0]
    assert row["events"]["last_hour"] == expected  # the last minute's may take less of a minute that has passed
    assert all(0 <= row["events"]["last_minute"][k] <= n for k, n in expected.items())
    assert row["events"]["last_hour_per_second"]["accepted"] == round(3 / 3600, 3)
    assert status["refusals"]["last_hour_by_status"] == {"401": 1}
    minutes = list(r.scan_iter(match=Keys("default").rates(0).replace(":0", ":*")))
    assert 1 <= len(minutes) <= 2 and all(RATE_TTL - 60 < r.ttl(k) <= RATE_TTL for k in minutes)


def test_imports_count_apart_from_live_intake(r: redis.Redis, tmp_path: Path) -> None:
    path = tmp_path / "history.ndjson"
    path.write_bytes(b"".join(identify(f"h{n}", f"h{n}") + b"\n" for n in range(5)) + b'{"type": "track"}\n')
    run(r, Settings(), "default", file_records([str(path)]), Options(), "import")
    row = collect(r, None, Settings())["spaces"][0]
    assert row["replayed_last_hour"] == {"accepted": 5, "duplicate": 0, "rejected": 1, "suppressed": 0}
    assert row["events"]["last_hour"] == {"accepted": 0, "duplicate": 0, "rejected": 0, "suppressed": 0}
    from service.status_text import _events
    assert _events(row).caption == "imports and replays in the last hour: 5 accepted, 1 rejected"  # not "6 applied"


def test_profiles_created_counts_this_generations_profiles_after_a_rebuild(r: redis.Redis) -> None:
    """A rebuilt generation's counter starts a million past the previous one's (ids never repeat): the status
    counts the profiles it created, not that offset."""
    from service.state.rebuild import rebuild
    from tests.helpers import apply

    apply(r, [{"type": "identify", "userId": f"g{n}", "messageId": f"g{n}"} for n in range(3)])
    assert collect(r, None, Settings())["spaces"][0]["profiles_created"] == 3
    rebuild(r, Settings(), "default")
    assert collect(r, None, Settings())["spaces"][0]["profiles_created"] == 3


def test_a_flush_that_fails_is_dropped_not_written_twice(redis_url: str, r: redis.Redis) -> None:
    """It may have been half applied; nothing was accepted while Redis was away anyway."""
    async def go() -> None:
        counter = RateCounter(aredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1))
        counter.add("default", 0, {"accepted": 3})
        with pytest.raises((redis.ConnectionError, OSError)):
            await counter.flush()
        counter.client = aredis.Redis.from_url(redis_url)  # Redis is back
        await counter.flush()
        counter.add("default", 0, {"duplicate": 1})
        await counter.flush()
        await counter.client.aclose()

    asyncio.run(go())
    assert r.hgetall(Keys("default").rates(0)) == {b"duplicate": b"1"}


def _worked(r: redis.Redis, settings: Settings) -> None:
    """A refresh and a full recompute, as the worker runs them."""
    from workers import recompute

    recompute.refresh(r, settings, "default")
    recompute.full_recompute(r, settings, "default")


def test_status_json_reports_every_part_and_the_problems_with_what_to_run(settings: Settings, redis_url: str,
                                                                          r: redis.Redis) -> None:
    with TestClient(create_app(settings, redis_url, redis_url)) as c:
        c.event_hooks = {"request": [], "response": [Checked()]}  # every answer as the OpenAPI document says
        for n in range(4):
            assert post(c, identify(f"s{n}", f"s{n}")).status_code == 200
        invalid = orjson.dumps([{"type": "track", "event": "x", "messageId": "no-ids"}])
        assert post(c, invalid).json()["rejected"] == 1
        _worked(r, Settings())
        assert post(c, identify("s9", "s9")).status_code == 200  # dirty again after the refresh
        keys = Keys("default")
        r.hset(keys.personas, mapping={
            "high_value": orjson.dumps({"state": "failed", "error": "422 name is too long [max 80]", "mavera_id": "p1",
                                        "payload": {"name": "x"}}),
            "new": orjson.dumps({"state": "synced", "last_sync_ms": 1, "mavera_id": "p2"})})
        pause(r, "402 Credits exhausted")
        queue = Queue(QUEUE_NAME, connection=r)
        job = queue.enqueue("workers.jobs.sync", "default")
        queue.failed_job_registry.add(job, ttl=3600, exc_string="RuntimeError: personas: 422")
        used = r.info("memory")["used_memory"]
        r.config_set("maxmemory", int(used * 1.05))  # about 95 % used (noeviction)
        try:
            status = c.get("/admin/status", headers=ADMIN).json()
            one = c.get("/admin/status?space=default", headers=ADMIN).json()
        finally:
            r.config_set("maxmemory", 0)
        assert c.get("/admin/status").status_code == 401
        assert c.get("/admin/status?space=%7Bx", headers=ADMIN).status_code == 400
        typo = c.get("/admin/status?space=defualt", headers=ADMIN)  # as `status --space`: not an all-zero space
        assert typo.status_code == 404 and "no space 'defualt'" in typo.json()["error"]["message"]
    [row] = status["spaces"]
    assert [s["space"] for s in one["spaces"]] == ["default"]
    assert row["profiles"] == 4 and row["profiles_created"] == 5 and row["dirty_profiles"] == 1
    assert row["last_refresh"]["profiles"] == 4 and row["last_refresh"]["seconds"] >= 0
    assert row["last_full_recompute"]["profiles"] == 4 and row["last_full_recompute"]["reason"] == "scheduled"
    assert row["last_full_recompute"]["at_ms"] >= row["last_refresh"]["at_ms"] > status["at_ms"] - 60_000
    assert row["personas"]["high_value"] == {"state": "failed", "error": "422 name is too long [max 80]",
                                             "last_sync_ms": None, "mavera_id": "p1", "note": None}
    assert row["personas"]["new"]["state"] == "synced" and "payload" not in row["personas"]["high_value"]
    assert row["dead_letters"] == 1 and row["event_log"]["entries"] == 5
    assert status["at_ms"] - 60_000 < row["event_log"]["oldest_ms"] <= status["at_ms"]
    assert status["queue"]["failed"] == 1 and status["queue"]["queued"] >= 1 and status["queue"]["workers"] == 0
    assert status["mavera"] == {"paused": True, "reason": "402 Credits exhausted",
                                "since_ms": status["mavera"]["since_ms"], "blocked_until_ms": None}
    assert status["redis"]["used_pct"] >= 80 and status["redis"]["policy"] == "noeviction"
    lines = {f"{p['problem']}: {p['next']}" for p in status["problems"]}
    expect = [
        "Mavera sync PAUSED since", "top up the Mavera credits, then run `persona-sync resume`",
        "1 failed job(s): run `persona-sync jobs` to see why, then `persona-sync requeue --all` once fixed",
        "job(s) wait and no worker is running: start one: `persona-sync worker`",
        "of maxmemory", "1 dead letter(s) in default",
        "`persona-sync dead-letters list --space default`, then `persona-sync replay --dead-letters --space default`",
        "persona high_value of default failed: 422 name is too long [max 80]: run `persona-sync jobs`",
    ]
    for text in expect:
        assert any(text in line for line in lines), (text, lines)
    assert len(lines) == 6  # nothing else: new is synced, the refresh ran, the full recompute is not overdue


def test_cli_status_prints_the_table_and_each_problem_with_what_to_run(redis_url: str, r: redis.Redis) -> None:
    settings = Settings(admin_token=ADMIN_TOKEN)
    with TestClient(create_app(settings, redis_url, "")) as c:
        for n in range(3):
            c.post("/segment", content=identify(f"c{n}", f"c{n}"))
    queue = Queue(QUEUE_NAME, connection=r)
    queue.enqueue("service.state.ops.no_such_job", "default")  # fails in the real worker: no such function
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url}
    worker = subprocess.run([EXE, "worker", "--burst"], env=env, capture_output=True, text=True, timeout=120)
    assert worker.returncode == 0, worker.stderr[-2000:]
    out = subprocess.run([EXE, "status"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "space default" in text and "accepted" in text and "(3)" in text and "3 created" in text
    assert "0 queued, 0 running, 0 scheduled, 0 deferred, 1 failed; 0 worker(s)" in text
    assert ("! 1 failed job(s): run `persona-sync jobs` to see why, then `persona-sync requeue --all` once fixed"
            in text.splitlines())
    as_json = subprocess.run([EXE, "status", "--json", "--space", "default"], capture_output=True, text=True,
                             timeout=60, env=env)
    report = orjson.loads(as_json.stdout)
    assert report["queue"]["failed"] == 1 and report["spaces"][0]["events"]["last_hour"]["accepted"] == 3
    assert [p["problem"] for p in report["problems"]] == ["1 failed job(s)"]
    jobs = subprocess.run([EXE, "jobs"], capture_output=True, text=True, timeout=60, env=env)
    assert "1 failed job(s)" in jobs.stdout  # what the problem line says to run shows the same job


def test_mavera_s_retry_after_wait_shows_in_the_status(r: redis.Redis) -> None:
    """A Retry-After from Mavera makes every worker wait (up to an hour): the status says until when, where it
    said "syncing" while syncs kept failing for it; a wait that has passed is not shown."""
    from io import StringIO

    from service.spec.keys import MAVERA_BLOCKED_KEY
    from service.status_text import render

    now = int(time.time() * 1000)
    r.set(MAVERA_BLOCKED_KEY, now + 600_000)
    report = collect(r, None, Settings(), now_ms=now)
    assert report["mavera"]["blocked_until_ms"] == now + 600_000
    out = StringIO()
    render(report, out)
    assert "waiting: Mavera asked (Retry-After) that no worker call it before" in out.getvalue()
    r.set(MAVERA_BLOCKED_KEY, now - 1)
    assert collect(r, None, Settings(), now_ms=now)["mavera"]["blocked_until_ms"] is None


@pytest.mark.parametrize("policy", ["allkeys-lru"])
def test_an_evicting_redis_is_a_problem(r: redis.Redis, policy: str) -> None:
    r.config_set("maxmemory-policy", policy)
    try:
        report = collect(r, None, Settings())
    finally:
        r.config_set("maxmemory-policy", "noeviction")
    [problem] = report["problems"]
    assert policy in problem["problem"] and "noeviction" in problem["next"]


def test_an_upgrade_keeps_the_known_spaces_and_mavera_pause_under_their_tagged_names(settings: Settings,
                                                                                     redis_url: str,
                                                                                     r: redis.Redis) -> None:
    """Before the Cluster support the deployment's keys had untagged names (``sps:spaces``...): the web renames
    them at start, so the status still lists every space and Mavera stays paused after the upgrade."""
    r.sadd("sps:spaces", "default", "shop")
    r.set("sps:mavera:paused", orjson.dumps({"reason": "402 Credits exhausted", "at_ms": 1}))
    r.set(Keys("default").generation_key, "")  # a space must exist for its row; its keys never changed
    with TestClient(create_app(settings, redis_url, "")) as c:
        status = c.get("/admin/status", headers=ADMIN).json()
    assert [s["space"] for s in status["spaces"]] == ["default", "shop"]
    assert status["mavera"]["paused"] is True and status["mavera"]["reason"] == "402 Credits exhausted"
    assert not r.exists("sps:spaces", "sps:mavera:paused")
    with TestClient(create_app(settings, redis_url, "")) as c:  # a second start changes nothing
        assert [s["space"] for s in c.get("/admin/status", headers=ADMIN).json()["spaces"]] == ["default", "shop"]
