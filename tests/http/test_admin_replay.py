"""Replays, jobs and dead letters through the operator API (Bearer ADMIN_TOKEN), with a real RQ worker."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from rq import Queue
from starlette.testclient import TestClient

from service.config import Settings
from service.http.app import create_app
from service.spec.keys import Keys
from service.state.queue import QUEUE_NAME
from service.state.store import SyncStore
from tests.conftest import ADMIN_TOKEN
from tests.helpers import apply, mixed_stream, snapshot
from tests.state.test_replay import archived

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
EXE = str(Path(sys.executable).with_name("persona-sync"))


@pytest.fixture
def admin(settings: Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("REDIS_URL", redis_url)  # what the worker's job reads, as in production
    with TestClient(create_app(settings, redis_url, redis_url), raise_server_exceptions=False) as c:
        yield c


def work(r: redis.Redis, **env: str) -> None:
    """Run the queued jobs with a real worker process (an in-process rq worker would leave its signal handlers
    installed in the test process, where forked pools inherit them)."""
    url = f"unix://{r.connection_pool.connection_kwargs['path']}"
    subprocess.run([EXE, "worker", "--burst"], env={"PATH": "/usr/bin:/bin", "REDIS_URL": url, **env}, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


def test_a_log_replay_queued_over_http_repairs_profiles(admin: TestClient, r: redis.Redis) -> None:
    apply(r, archived(mixed_stream(1500, users=40, seed=12)))
    right = snapshot(r)
    k = Keys("default")
    for pid in list(r.smembers(k.dirty))[:10]:
        r.hdel(k.profile(pid.decode()), *[f for f in r.hkeys(k.profile(pid.decode())) if f.startswith(b"t:")] or
               [b"none"])
    queued = admin.post("/admin/replay", json={"source": "log", "since": "7d", "rate": 0}, headers=ADMIN)
    assert queued.status_code == 202, queued.text
    job_id = queued.json()["job"]
    assert admin.get(f"/admin/jobs/{job_id}", headers=ADMIN).json()["status"] == "queued"
    work(r)
    view = admin.get(f"/admin/jobs/{job_id}", headers=ADMIN).json()
    assert view["status"] == "finished" and view["result"]["outcomes"] == {"applied": 1500}
    assert view["progress"]["done"] == 1500 and view["result"]["stopped_at"] is None
    assert snapshot(r) == right
    # a look-back to before the epoch (the longest a duration may be) means from the start, not a failed job
    queued = admin.post("/admin/replay", json={"source": "log", "since": "36500d", "rate": 0}, headers=ADMIN)
    assert queued.status_code == 202, queued.text
    work(r)
    view = admin.get(f"/admin/jobs/{queued.json()['job']}", headers=ADMIN).json()
    assert view["status"] == "finished" and view["result"]["outcomes"] == {"applied": 1500}, view
    assert view["result"]["rate"] == 0  # as asked: no limit
    # without a rate, as throttled as the command's replays (it ran unthrottled, against live intake)
    queued = admin.post("/admin/replay", json={"source": "log", "since": "1h", "dry_run": True}, headers=ADMIN)
    work(r)
    assert admin.get(f"/admin/jobs/{queued.json()['job']}", headers=ADMIN).json()["result"]["rate"] == 1000


def test_replay_requests_are_validated_and_need_the_token(admin: TestClient) -> None:
    assert admin.post("/admin/replay", json={}).status_code == 401
    for body, word in (({"source": "files"}, "source"), ({"since": "last tuesday"}, "since"),
                       ({"since": "9" * 400 + "d"}, "since"), ({"until": "1e999"}, "until"),
                       ({"rate": -1}, "rate"), ({"types": "track"}, "types"), ({"bogus": 1}, "unknown"),
                       ({"types": ["track", "bogus"]}, "'bogus' is not a call type"),
                       ({"profile": "ada"}, "TYPE:VALUE"),
                       # options of the other source were ignored: the whole log, or every dead letter, replayed
                       ({"source": "log", "reason": "nothing"}, "reason selects dead letters"),
                       ({"source": "dead-letters", "since": "1m", "types": ["track"]}, "since, types select"),
                       ({"source": "log", "since": "1m", "until": "2h"}, "is after until")):
        resp = admin.post("/admin/replay", json=body, headers=ADMIN)
        assert resp.status_code == 400 and word in resp.json()["error"]["message"], (body, resp.text)
    assert admin.post("/admin/replay", content=b"{nope", headers=ADMIN).status_code == 400
    nobody = admin.post("/admin/replay", json={"profile": "email:Nobody@Example.com"}, headers=ADMIN)
    assert nobody.status_code == 404 and "no profile has" in nobody.json()["error"]["message"]
    assert admin.get("/admin/jobs/no-such-job", headers=ADMIN).status_code == 404
    assert admin.get("/admin/jobs/../../x", headers=ADMIN).status_code in (400, 404)


def test_cancelling_a_queued_job_and_stopping_a_running_one(admin: TestClient, r: redis.Redis,
                                                             redis_url: str) -> None:
    apply(r, archived(mixed_stream(3000, users=60, seed=13)))
    queued = admin.post("/admin/replay", json={"rate": 1000}, headers=ADMIN).json()["job"]
    canceled = admin.delete(f"/admin/jobs/{queued}", headers=ADMIN).json()
    assert canceled["status"] == "canceled" and canceled["cancel"] == "done"
    running = admin.post("/admin/replay", json={"rate": 1000}, headers=ADMIN).json()["job"]
    worker = subprocess.Popen([EXE, "worker", "--burst"], env={"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while admin.get(f"/admin/jobs/{running}", headers=ADMIN).json()["status"] != "started":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    assert admin.delete(f"/admin/jobs/{running}", headers=ADMIN).json()["cancel"] == "requested"
    assert worker.wait(60) == 0
    view = admin.get(f"/admin/jobs/{running}", headers=ADMIN).json()
    assert view["status"] == "finished" and view["result"]["stopped_at"] is not None
    assert 0 < view["result"]["events"] < 3000 and view["progress"]["stopped"] is True
    # the same request with resume: true (any rate) continues where it stopped
    resumed = admin.post("/admin/replay", json={"rate": 0, "resume": True}, headers=ADMIN).json()["job"]
    work(r)
    rest = admin.get(f"/admin/jobs/{resumed}", headers=ADMIN).json()["result"]
    assert rest["events"] == 3000 - view["result"]["events"]


def test_a_log_replay_stops_at_what_was_logged_when_it_started(settings: Settings, r: redis.Redis) -> None:
    from service.state.replay import records_for

    apply(r, archived(mixed_stream(50, users=5, seed=17)))
    records = records_for(r, settings, "default", {"source": "log"}, None)
    apply(r, [{"type": "identify", "userId": "late", "messageId": "late-1", "timestamp": "2026-03-01T00:00:00Z"}])
    assert len(list(records)) == 50  # not the live tail


def test_a_profile_filter_is_normalised_like_the_receiver(admin: TestClient, r: redis.Redis) -> None:
    apply(r, [{"type": "identify", "userId": "ada", "messageId": "a1", "timestamp": "2026-03-01T00:00:00Z",
               "traits": {"email": "ada@example.com"}}])
    queued = admin.post("/admin/replay", json={"profile": "email:Ada@Example.com ", "rate": 0}, headers=ADMIN)
    assert queued.status_code == 202
    job = queued.json()["job"]
    # the job, kept a week and shown by GET /admin/jobs/{id}, holds the profile's id, not the person's email
    stored = b"".join(v for v in r.hgetall(f"rq:job:{job}").values())
    assert b"ada@example.com" not in stored.lower()
    work(r)
    view = admin.get(f"/admin/jobs/{job}", headers=ADMIN).json()
    assert view["result"]["outcomes"] == {"applied": 1}
    assert "ada@example.com" not in str(view).lower()


def test_dead_letters_one_by_one(admin: TestClient, r: redis.Redis) -> None:
    SyncStore(r, Settings()).dead_letters("default", [("unknown type 'x'", b'{"type":"x"}')], "webhook")
    [(entry_id, _)] = r.xrange(Keys("default").dead_letters)
    one = admin.get(f"/admin/dead-letters/{entry_id.decode()}", headers=ADMIN).json()
    assert one["reason"] == "unknown type 'x'" and one["raw"] == '{"type":"x"}' and one["source"] == "webhook"
    assert admin.get("/admin/dead-letters/1-1", headers=ADMIN).status_code == 404
    assert admin.get("/admin/dead-letters/x", headers=ADMIN).status_code == 400
    millisecond = entry_id.decode().partition("-")[0]  # names every entry of that millisecond, not one
    assert admin.delete(f"/admin/dead-letters/{millisecond}", headers=ADMIN).status_code == 400
    assert admin.get(f"/admin/dead-letters?before={millisecond}", headers=ADMIN).status_code == 200  # a bound
    too_big = "99999999999999999999-0"  # the pattern of an id, past what a stream id holds (64 bits)
    for path in (f"/admin/dead-letters/{too_big}", f"/admin/dead-letters?before={too_big}",
                 f"/admin/refusals?before=({too_big}", "/admin/dead-letters?before=1-99999999999999999999"):
        assert admin.get(path, headers=ADMIN).status_code == 400, path
    gone = admin.delete(f"/admin/dead-letters/{entry_id.decode()}", headers=ADMIN).json()
    assert gone["deleted"] == entry_id.decode() and gone["bytes_freed"] > 0
    assert r.xlen(Keys("default").dead_letters) == 0 and int(r.get(Keys("default").dead_letter_bytes)) == 0


def test_failed_jobs_are_listed_and_requeued(redis_url: str, r: redis.Redis) -> None:
    queue = Queue(QUEUE_NAME, connection=r)
    job = queue.enqueue("service.state.replay.cancel_key", None, "too", "many")  # fails: TypeError
    work(r)
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url}
    listed = subprocess.run([EXE, "jobs"], capture_output=True, text=True, timeout=60, env=env)
    assert listed.returncode == 0 and job.id in listed.stdout and "TypeError" in listed.stdout
    assert "service.state.replay.cancel_key" in listed.stdout
    again = subprocess.run([EXE, "requeue", "--function", "service.state.replay.cancel_key"], capture_output=True,
                           text=True, timeout=60, env=env)
    assert again.returncode == 0 and "requeued 1 job(s)" in again.stdout
    assert job.id in queue.job_ids and queue.failed_job_registry.count == 0
    assert subprocess.run([EXE, "requeue"], capture_output=True, text=True, timeout=60, env=env).returncode == 1


def test_dead_letters_command(redis_url: str, r: redis.Redis) -> None:
    SyncStore(r, Settings()).dead_letters("default", [("unknown type 'x'", orjson.dumps({"type": "x"})),
                                                      ("store error: OOM", b"{}")], "webhook")
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url}
    listed = subprocess.run([EXE, "dead-letters", "list", "--reason", "oom"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert listed.returncode == 0 and "store error: OOM" in listed.stdout and "unknown type" not in listed.stdout
    first = r.xrange(Keys("default").dead_letters)[0][0].decode()
    shown = subprocess.run([EXE, "dead-letters", "show", first], capture_output=True, text=True, timeout=60, env=env)
    assert shown.returncode == 0 and '{"type":"x"}' in shown.stdout
    deleted = subprocess.run([EXE, "dead-letters", "delete", first], capture_output=True, text=True, timeout=60,
                             env=env)
    assert deleted.returncode == 0 and r.xlen(Keys("default").dead_letters) == 1
    assert "deleted 1 dead letter(s)" in deleted.stdout
    # a mistyped id is one clear line, not a Redis traceback; an id that is not there (or another --space) is an
    # error, not "deleted", and nothing is deleted with it
    last = r.xrange(Keys("default").dead_letters)[0][0].decode()
    for action, ids, says in (("show", ["123abc"], "not a dead-letter id"), ("delete", ["123abc"], "not a dead-letter"),
                              ("delete", [last, "1-1"], "no dead letter 1-1"), ("show", [first], "no dead letter"),
                              ("delete", [last.partition("-")[0]], "not a dead-letter id")):
        out = subprocess.run([EXE, "dead-letters", action, *ids], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 1 and says in out.stderr and "Traceback" not in out.stderr, (action, ids, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1
    assert r.xlen(Keys("default").dead_letters) == 1


def test_an_archive_replay_over_http(settings: Settings, redis_url: str, r: redis.Redis, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from service.state.archive import archive_space

    archive_dir = str(tmp_path / "archive")
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("EVENT_ARCHIVE_DIR", archive_dir)
    with_archive = settings.replace(event_archive_dir=archive_dir)
    apply(r, archived(mixed_stream(600, users=20, seed=15)), settings=with_archive)
    archive_space(r, with_archive, "default")
    right = snapshot(r)
    for key in r.scan_iter(match=f"{Keys('default').prefix}p:*"):
        r.hdel(key, *[f for f in r.hkeys(key) if f.startswith(b"t:")] or [b"none"])
    with TestClient(create_app(with_archive, redis_url, redis_url)) as c:
        assert c.post("/admin/replay", json={"source": "archive", "profile": "user_id:x"},
                      headers=ADMIN).status_code == 400
        job_id = c.post("/admin/replay", json={"source": "archive", "rate": 0}, headers=ADMIN).json()["job"]
        work(r, EVENT_ARCHIVE_DIR=archive_dir)
        view = c.get(f"/admin/jobs/{job_id}", headers=ADMIN).json()
    assert view["status"] == "finished" and view["result"]["outcomes"] == {"applied": 600}
    assert snapshot(r) == right
    with TestClient(create_app(settings, redis_url, redis_url)) as c:  # no archive configured
        assert c.post("/admin/replay", json={"source": "archive"}, headers=ADMIN).status_code == 400


def test_one_dead_letter_is_replayed_by_its_id(admin: TestClient, r: redis.Redis) -> None:
    """``{"source": "dead-letters", "id": …}``: that one only (what the console's Replay button queues)."""
    good = {"type": "identify", "userId": "one", "messageId": "one-1", "traits": {"plan": "pro"}}
    other = {"type": "identify", "userId": "two", "messageId": "two-1", "traits": {"plan": "pro"}}
    SyncStore(r, Settings()).dead_letters("default", [("fixed since", orjson.dumps(good)),
                                                      ("fixed since", orjson.dumps(other))], "webhook")
    first, second = (e.decode() for e, _ in r.xrange(Keys("default").dead_letters))
    for body, status in (({"source": "log", "id": first}, 400), ({"source": "dead-letters", "id": "x"}, 400),
                         ({"source": "dead-letters", "id": "1-1"}, 404)):
        assert admin.post("/admin/replay", json=body, headers=ADMIN).status_code == status, body
    queued = admin.post("/admin/replay", json={"source": "dead-letters", "id": first}, headers=ADMIN)
    assert queued.status_code == 202, queued.text
    work(r)
    view = admin.get(queued.json()["follow"], headers=ADMIN).json()
    assert view["status"] == "finished" and view["progress"] == {"done": 1, "total": 1, "stopped": False}
    assert [e.decode() for e, _ in r.xrange(Keys("default").dead_letters)] == [second]
