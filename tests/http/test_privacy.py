"""Privacy by any identifier: forget by email or anonymousId (CLI and POST /admin/forget), and suppressions
(list, lift), against a real Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import redis
from starlette.testclient import TestClient

from service.spec.keys import Keys
from tests.conftest import ADMIN_TOKEN
from tests.helpers import apply, find

BOTH_BACKENDS = True  # each test runs on a standalone Redis and on a Redis Cluster (tests/conftest.py)

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
EXE = str(Path(sys.executable).with_name("persona-sync"))
T = "2026-03-01T10:00:00Z"


def ada(r: redis.Redis) -> None:
    """Ada: a userId, an email, and an anonymous visit merged into her profile."""
    apply(r, [{"type": "page", "anonymousId": "ada-anon", "messageId": "a1", "timestamp": T},
              {"type": "identify", "userId": "x2", "anonymousId": "ada-anon", "messageId": "a2", "timestamp": T,
               "traits": {"email": "Ada@Example.com", "plan": "pro"}},
              {"type": "identify", "userId": "bob", "messageId": "b1", "timestamp": T}])


def test_forget_by_email_erases_the_merged_profile_and_suppresses_its_user_id(redis_env: dict[str, str],
                                                                              r: redis.Redis) -> None:
    ada(r)
    env = {"PATH": "/usr/bin:/bin", **redis_env}
    out = subprocess.run([EXE, "forget", "email:ada@example.com "], capture_output=True, text=True, timeout=60,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert "erased" in out.stdout and "userId x2's events up to now are suppressed" in out.stdout
    for kind, value in (("user_id", "x2"), ("email", "ada@example.com"), ("anonymous_id", "ada-anon")):
        assert find(r, kind, value) is None
    assert [f[b"p"] for _, f in r.xrange(Keys("default").log)] == [find(r, "user_id", "bob").id.encode()]
    late = apply(r, [{"type": "identify", "userId": "x2", "messageId": "a3", "timestamp": T}])
    assert late[0].status == "suppressed"
    again = subprocess.run([EXE, "forget", "email:ada@example.com"], capture_output=True, text=True, timeout=60,
                           env=env)
    assert again.returncode == 1 and "no profile has email:ada@example.com" in again.stderr


def test_forget_a_profile_without_user_id_and_an_identifier_of_nobody(client: TestClient, r: redis.Redis) -> None:
    apply(r, [{"type": "page", "anonymousId": "visitor", "messageId": "v1", "timestamp": T,
               "context": {"traits": {"email": "v@example.com"}}}])
    resp = client.post("/admin/forget", json={"id": "anonymous_id:visitor"}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    assert resp.json()["erased_profile"] and resp.json()["suppressed_user_id"] is None
    assert find(r, "email", "v@example.com") is None and r.xlen(Keys("default").log) == 0
    nobody = client.post("/admin/forget", json={"id": "email:nobody@example.com"}, headers=ADMIN)
    assert nobody.status_code == 404 and "no profile has email:nobody@example.com" in nobody.json()["error"]["message"]
    assert client.post("/admin/forget", json={"id": ""}, headers=ADMIN).status_code == 400
    assert client.post("/admin/forget", json={"id": "x"}).status_code == 401


def test_forget_refuses_what_no_profile_can_be_identified_by(client: TestClient, r: redis.Redis) -> None:
    """An empty userId or a blocked placeholder ('null', 'anonymous', '0') identifies nobody: erasing it is a 400,
    not a 500, and never a deletion that would suppress every sender of that placeholder (a Segment delete of one
    is an invalid event: tests/spec/test_events.py)."""
    ada(r)
    for ident in ("user_id:", "user_id: ", "null", "user_id:anonymous", "email:undefined"):
        resp = client.post("/admin/forget", json={"id": ident}, headers=ADMIN)
        assert resp.status_code == 400 and "identifies nobody" in resp.json()["error"]["message"], (ident, resp.text)
    assert client.get("/admin/suppressions", headers=ADMIN).json()["total"] == 0
    assert not r.exists(Keys("default").deleted)
    assert apply(r, [{"type": "page", "userId": "null", "anonymousId": "a7", "messageId": "p7",
                      "timestamp": T}])[0].status == "ok"
    assert find(r, "anonymous_id", "a7") is not None


def test_forget_takes_a_profile_id_as_the_profile_api_does(client: TestClient, r: redis.Redis) -> None:
    apply(r, [{"type": "identify", "userId": "sid", "anonymousId": "sid-anon", "messageId": "s1", "timestamp": T}])
    pid = find(r, "user_id", "sid").id
    erased = client.post("/admin/forget", json={"id": f"segment_id:{pid}"}, headers=ADMIN)
    assert erased.status_code == 200 and erased.json()["suppressed_user_id"] == "sid"
    assert find(r, "anonymous_id", "sid-anon") is None
    assert client.post("/admin/forget", json={"id": f"segment_id:{pid}"}, headers=ADMIN).status_code == 404


def test_a_user_id_with_a_slash_is_lifted_over_http(client: TestClient, r: redis.Redis) -> None:
    """``DELETE /admin/suppressions/team%2F42``: the router sees the id decoded, slash and all."""
    apply(r, [{"type": "identify", "userId": "team/42", "messageId": "t1", "timestamp": T}])
    assert client.post("/admin/forget", json={"id": "user_id:team/42"}, headers=ADMIN).status_code == 200
    lifted = client.delete("/admin/suppressions/team%2F42", headers=ADMIN)
    assert lifted.status_code == 200 and lifted.json()["lifted"] == "team/42"
    assert client.get("/admin/suppressions", headers=ADMIN).json()["data"] == []
    assert client.delete("/admin/suppressions/team%2F42", headers=ADMIN).status_code == 404  # not suppressed now
    # an empty id names nobody: it must not lift the erasures by profile id, which record an empty userId
    apply(r, [{"type": "page", "anonymousId": "anon-e", "messageId": "e1", "timestamp": T}])
    assert client.post("/admin/forget", json={"id": "anonymous_id:anon-e"}, headers=ADMIN).status_code == 200
    before = client.get("/admin/suppressions", headers=ADMIN).json()["data"]
    for path in ("/admin/suppressions/", "/admin/suppressions/%20"):
        refused = client.delete(path, headers=ADMIN)
        assert refused.status_code == 400 and "userId" in refused.json()["error"]["message"], path
    assert client.get("/admin/suppressions", headers=ADMIN).json()["data"] == before != []


def test_suppressions_are_listed_and_lifted(client: TestClient, redis_env: dict[str, str], r: redis.Redis) -> None:
    ada(r)
    assert client.post("/admin/forget", json={"id": "x2"}, headers=ADMIN).json()["suppressed_user_id"] == "x2"
    # a profile without a userId, erased by its anonymousId: listed with the identifiers it had
    apply(r, [{"type": "page", "anonymousId": "cat-anon", "messageId": "c1", "timestamp": T}])
    assert client.post("/admin/forget", json={"id": "anonymous_id:cat-anon"}, headers=ADMIN).status_code == 200
    listed = client.get("/admin/suppressions", headers=ADMIN).json()
    assert [(row["user_id"], row["identifiers"]) for row in listed["data"]] == [
        ("x2", ["anonymous_id:ada-anon", "email:ada@example.com"]), (None, ["anonymous_id:cat-anon"])]
    assert all(row["until_ms"] > 0 for row in listed["data"])
    env = {"PATH": "/usr/bin:/bin", **redis_env}
    out = subprocess.run([EXE, "suppressions", "list"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and "x2  events up to" in out.stdout
    assert "also anonymous_id:ada-anon, email:ada@example.com" in out.stdout
    assert "1 suppressed userId(s) and 1 erased profile(s) without one" in out.stdout
    # Ada's visit before she logged in stays out while she is suppressed, and applies again once lifted
    visit = {"type": "page", "anonymousId": "ada-anon", "messageId": "a5", "timestamp": T}
    assert apply(r, [visit])[0].status == "suppressed"
    lifted = subprocess.run([EXE, "suppressions", "lift", "x2"], capture_output=True, text=True, timeout=60, env=env)
    assert lifted.returncode == 0 and "lifted" in lifted.stdout
    assert [row["user_id"] for row in client.get("/admin/suppressions", headers=ADMIN).json()["data"]] == [None]
    assert apply(r, [{"type": "identify", "userId": "x2", "messageId": "a4", "timestamp": T}])[0].status == "ok"
    assert apply(r, [dict(visit, messageId="a6")])[0].status == "ok"
    assert client.delete("/admin/suppressions/x2", headers=ADMIN).status_code == 404
    # the profile without a userId is lifted by an identifier it had, as listed (there was no way to before)
    cat = {"type": "page", "anonymousId": "cat-anon", "messageId": "c2", "timestamp": T}
    assert apply(r, [cat])[0].status == "suppressed"
    lift_cat = subprocess.run([EXE, "suppressions", "lift", "anonymous_id:cat-anon"], capture_output=True,
                              text=True, timeout=60, env=env)
    assert lift_cat.returncode == 0, lift_cat.stderr
    assert client.get("/admin/suppressions", headers=ADMIN).json()["data"] == []
    assert apply(r, [dict(cat, messageId="c3")])[0].status == "ok"


def test_with_a_queue_the_purge_is_a_job(settings, redis_url: str, queue_url: str, r: redis.Redis) -> None:
    from rq import Queue

    from service.http.app import create_app

    ada(r)
    with TestClient(create_app(settings, redis_url, queue_url)) as c:
        resp = c.post("/admin/forget", json={"id": "email:ada@example.com"}, headers=ADMIN)
    assert resp.status_code == 200 and resp.json()["events_purge"] == "queued"
    jobs = [j.func_name for j in Queue("persona-sync", connection=redis.Redis.from_url(queue_url)).get_jobs()]
    assert "service.state.ops.purge_job" in jobs and "workers.jobs.refresh" in jobs
    assert find(r, "email", "ada@example.com") is None


def test_forget_purges_the_dead_letters_of_the_erased_user_and_keeps_everyone_elses(r: redis.Redis) -> None:
    """Dead letters hold authenticated events that could not be applied, with their personal data: a GDPR erasure
    removes the erased user's from them (by userId or anonymousId) and keeps everyone else's, a body of several
    events rewritten without the erased user's."""
    import orjson

    from service.config import Settings
    from service.state.ops import forget
    from service.state.store import SyncStore

    ada(r)
    k = Keys("default")
    store = SyncStore(r, Settings())
    bad = "not a time"
    batch = [{"type": "track", "event": "Viewed", "anonymousId": "ada-anon", "messageId": f"ab{i}"} for i in range(3)]
    batch += [{"type": "track", "event": "Viewed", "userId": "bob", "messageId": f"bb{i}"} for i in range(2)]
    store.dead_letters("default", [
        ("invalid timestamp", orjson.dumps({"type": "identify", "userId": "x2", "timestamp": bad, "messageId": "d1"})),
        ("invalid timestamp", orjson.dumps({"type": "identify", "userId": "bob", "timestamp": bad, "messageId": "d2"})),
        ("batch of 4001 events", orjson.dumps(batch)),
        ("tracking batch", orjson.dumps({"batch": batch[:1], "writeKey": "w"})),
        ("malformed JSON", b'{"userId": "x2", "traits": {"email": "Ada@Example.com"'),
    ], "webhook")
    before = r.xrange(k.dead_letters)

    forget(r, Settings(), "default", "email:ada@example.com")

    left = r.xrange(k.dead_letters)
    raws = [orjson.loads(f[b"raw"]) for _, f in left]
    assert raws == [{"type": "identify", "userId": "bob", "timestamp": bad, "messageId": "d2"}, batch[3:]]
    assert left[0][0] == before[1][0]  # untouched where it was
    rewritten = left[1][1]
    assert rewritten[b"reason"] == b"batch of 4001 events" and rewritten[b"source"] == b"webhook"
    assert rewritten[b"at"] == before[2][1][b"at"]
    assert int(r.get(k.dead_letter_bytes)) == sum(int(f[b"n"]) for _, f in left)
    assert b"ada" not in b"".join(f[b"raw"] for _, f in left).lower()


def test_a_late_event_that_links_a_browser_to_a_deleted_user_erases_it_and_queues_the_purge(
        settings, redis_url: str, queue_url: str, r: redis.Redis) -> None:
    """The identify that tied a browser to a userId arrives after the userId's deletion: the browser's profile is
    erased as the deletion would have erased it, and the receiver queues the purge of its logged and archived
    events."""
    from rq import Queue

    from service.http.app import create_app
    from tests.http.test_receiver import post

    apply(r, [{"type": "page", "anonymousId": "pre-login", "messageId": "p1", "timestamp": T},
              {"type": "delete", "userId": "x2", "messageId": "d1", "timestamp": "2026-04-01T00:00:00Z"}])
    late = {"type": "identify", "userId": "x2", "anonymousId": "pre-login", "messageId": "i1", "timestamp": T}
    with TestClient(create_app(settings, redis_url, queue_url)) as c:
        resp = post(c, orjson.dumps(late))
    assert resp.status_code == 200 and resp.json()["suppressed"] == 1
    assert find(r, "anonymous_id", "pre-login") is None
    jobs = [j.func_name for j in Queue("persona-sync", connection=redis.Redis.from_url(queue_url)).get_jobs()]
    assert "service.state.ops.purge_job" in jobs and "workers.jobs.refresh" in jobs


def test_forget_refuses_fields_it_does_not_take_rather_than_erase_in_the_default_space(client: TestClient,
                                                                                      r: redis.Redis) -> None:
    ada(r)
    resp = client.post("/admin/forget", json={"id": "user_id:bob", "space": "other"}, headers=ADMIN)
    assert resp.status_code == 400 and "?space=" in resp.json()["error"]["message"]
    assert find(r, "user_id", "bob") is not None  # nothing was erased


def test_forget_in_a_space_without_data_or_of_a_bare_profile_id_erases_nothing_and_says_why(
        redis_env: dict[str, str], r: redis.Redis) -> None:
    """Both used to answer "deleted" and exit 0: a misspelled --space (which then existed for good), and a
    profile's id given bare (a bare value is a userId, and nobody had that one)."""
    ada(r)
    env = {"PATH": "/usr/bin:/bin", **redis_env}
    typo = subprocess.run([EXE, "forget", "--space", "defualt", "user_id:bob"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert typo.returncode == 1 and "no space 'defualt' has any data" in typo.stderr and "default" in typo.stderr
    pid = find(r, "user_id", "bob").id
    bare = subprocess.run([EXE, "forget", pid], capture_output=True, text=True, timeout=60, env=env)
    assert bare.returncode == 1 and f"segment_id:{pid}" in bare.stderr, bare.stderr
    assert find(r, "user_id", "bob") is not None and not r.smembers(Keys("default").suppressed)
    by_id = subprocess.run([EXE, "forget", f"segment_id:{pid}"], capture_output=True, text=True, timeout=60, env=env)
    assert by_id.returncode == 0 and find(r, "user_id", "bob") is None


def test_the_purge_rewrites_a_dead_letter_batch_holding_events_too_deep_to_decode_or_write(r: redis.Redis) -> None:
    """A batch kept whole (too many events) may hold elements past 1,024 levels (the parser leaves them undecoded)
    or past 254 (orjson cannot write them again): the erased user's events still leave it, found by their ids
    however written, and everyone else's stay as they were sent."""
    import orjson

    from service.config import Settings
    from service.state.ops import forget
    from service.state.store import SyncStore

    ada(r)

    def deep(levels: int, who: bytes, size: bytes = b"1") -> bytes:
        return b'{"type":"track","userId":' + who + b',"properties":{"size":"' + size + b'","d":' + \
            b'{"d":' * levels + b"1" + b"}" * levels + b"}}"

    ada_event = orjson.dumps({"type": "track", "event": "Viewed", "userId": "x2", "messageId": "a9"})
    bobs = [deep(1100, b'"bob"', b"x2"), deep(300, b'"bob"')]  # past what the parser reads, past what orjson writes
    adas = [deep(1100, b'"x\\u0032"'), deep(1100, b' "x2" ')]  # her deep events, however her id is written
    body = b"[" + b",".join([ada_event, bobs[0], adas[0], bobs[1], adas[1]]) + b"]"
    SyncStore(r, Settings()).dead_letters("default", [("batch of 4001 events", body)], "webhook")
    forget(r, Settings(), "default", "user_id:x2")
    [(_, letter)] = r.xrange(Keys("default").dead_letters)
    assert letter[b"raw"] == b"[" + b",".join(bobs) + b"]"  # bob's, as sent (one even has "x2" among its values)


def test_a_lift_before_the_purge_ran_keeps_what_was_sent_since(r: redis.Redis) -> None:
    """A lift removes the deletion and erasure records that tell the purge up to when to remove an id's events:
    lifted before the queued purge ran, the purge removed every event of the user, those sent since the lift
    (which the state had applied) too. The lift keeps those times for the purge."""
    from service.config import Settings
    from service.state.ops import forget, lift_suppression, purge_erased

    ada(r)
    k = Keys("default")
    forget(r, Settings(), "default", "email:ada@example.com", purge=False)  # the purge is a queued job
    assert lift_suppression(r, "default", "x2")
    again = [{"type": "identify", "userId": "x2", "anonymousId": "ada-anon", "messageId": "back",
              "traits": {"plan": "team"}}]  # no timestamp: now, after the lift
    assert apply(r, again)[0].status == "ok"
    purge_erased(r, Settings(), "default")
    assert sorted(orjson.loads(f[b"e"])["messageId"] for _, f in r.xrange(k.log)) == ["b1", "back"]
    assert not r.exists(k.forgotten_ids) and not r.exists(k.forgotten_until)
