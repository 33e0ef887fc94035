"""Issue "Trust": what failed authentication is never stored as replayable, never reaches the state, and cannot
fill Redis; refusals before authentication keep metadata only (GET /admin/refusals)."""

from __future__ import annotations

import base64

import orjson
import redis
from starlette.testclient import TestClient

from service.config import Settings
from service.http.app import create_app
from service.spec.keys import REFUSAL_RATES_PREFIX, REFUSALS_KEY, Keys
from service.state.ops import replay_dead_letters
from service.state.status import collect
from tests.conftest import ADMIN_TOKEN, SECRET
from tests.helpers import profiles
from tests.http.test_receiver import post, sign

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def identify(n: int) -> bytes:
    return orjson.dumps({"type": "identify", "userId": f"forged-{n}", "messageId": f"forged-{n}",
                         "traits": {"email": f"forged{n}@example.com", "plan": "enterprise"}})


def test_wrongly_signed_identifies_never_become_profiles_not_even_by_replay(client: TestClient,
                                                                             r: redis.Redis) -> None:
    for n in range(3):
        resp = post(client, identify(n), **{"X-Signature": sign(identify(n), "not-our-secret")})
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "authentication_error"
    assert r.xlen(Keys("default").dead_letters) == 0  # nothing replayable was kept
    counts = replay_dead_letters(r, Settings(), "default")
    assert counts["events_applied"] == 0 and profiles(r) == []
    refused = client.get("/admin/refusals", headers=ADMIN).json()
    assert refused["total"] == 3
    for entry in refused["data"]:
        assert entry["status"] == 401 and entry["reason"] == "X-Signature does not match"
        assert entry["route"] == "/segment" and entry["space"] == "default" and entry["addr"] == "testclient"
        assert entry["bytes"] == len(identify(0)) and entry["at"] > 0
    assert all(b"forged" not in v for _, f in r.xrange(REFUSALS_KEY) for v in f.values())


def test_unknown_write_key_is_logged_as_metadata_only(client: TestClient, r: redis.Redis) -> None:
    basic = {"Authorization": "Basic " + base64.b64encode(b"stolen-or-guessed:").decode()}
    assert client.post("/v1/identify", content=identify(1), headers=basic).status_code == 401
    assert client.post("/v1/identify", content=identify(2)).status_code == 401
    assert r.xlen(Keys("default").dead_letters) == 0 and profiles(r) == []
    reasons = [e["reason"] for e in client.get("/admin/refusals", headers=ADMIN).json()["data"]]
    assert reasons == ["write key missing", "write key unknown"]
    assert all(b"forged" not in v for _, f in r.xrange(REFUSALS_KEY) for v in f.values())


def test_replay_never_applies_what_older_versions_kept_from_unsigned_requests(redis_url: str,
                                                                                r: redis.Redis) -> None:
    dlq = Keys("default").dead_letters
    for n in range(3):  # exactly what the receiver stored before: the body of a request that failed the signature
        r.xadd(dlq, {"reason": "X-Signature does not match", "source": "webhook-unsigned", "at": 1, "raw": identify(n)})
    r.xadd(dlq, {"reason": "?", "source": "", "at": 1, "raw": identify(9)})  # no source: not known to be signed
    counts = replay_dead_letters(r, Settings(), "default")
    assert counts == {"entries": 4, "replayed": 0, "kept": 0, "events_applied": 0, "unauthenticated": 4}
    assert profiles(r) == [] and r.xlen(dlq) == 4
    counts = replay_dead_letters(r, Settings(), "default", drop_unauthenticated=True)
    assert counts["unauthenticated"] == 4 and profiles(r) == [] and r.xlen(dlq) == 0


def test_refusals_are_counted_in_status_and_the_log_is_capped(settings: Settings, redis_url: str,
                                                               r: redis.Redis) -> None:
    with TestClient(create_app(settings.replace(refusal_log_max=50), redis_url, "")) as c:
        for n in range(400):
            assert c.post(f"/segment/spa_{n % 7}", content=identify(n)).status_code == 401
        post(c, identify(1000))  # one signed event, so the space exists for `status`
        status = c.get("/admin/status", headers=ADMIN).json()
    assert 50 <= status["refusals"]["logged"] <= 150  # approximate trimming: whole stream nodes of 100 entries
    after = collect(r, None, settings)  # the app has stopped: its last counts are flushed
    assert after["refusals"]["logged"] == status["refusals"]["logged"]
    assert after["refusals"]["last_hour_by_status"] == {"401": 400}  # counted in full, unlike the capped log
    assert not [k for k in r.scan_iter("sps:{spa_*")]  # claimed spaces created no keys, counters included


def test_refusals_page_back_without_repeats(client: TestClient) -> None:
    for n in range(5):
        client.post("/segment", content=identify(n))
    first = client.get("/admin/refusals?limit=2", headers=ADMIN).json()
    second = client.get(f"/admin/refusals?limit=2&before={first['next_before']}", headers=ADMIN).json()
    ids = [e["id"] for e in first["data"] + second["data"]]
    assert len(set(ids)) == 4 and first["has_more"] and second["has_more"]
    assert client.get("/admin/refusals").status_code == 401
    assert client.get("/admin/refusals?before=nope", headers=ADMIN).status_code == 400
    assert client.get("/admin/dead-letters?before=nope", headers=ADMIN).status_code == 400  # was a Redis error: 500
    assert client.get("/admin/refusals?limit=" + "9" * 5000, headers=ADMIN).status_code == 400  # int() would raise
    for route in ("/admin/refusals", "/admin/dead-letters"):  # digits that are not ASCII: int() or Redis refuse them
        assert client.get(f"{route}?limit=%C2%B2", headers=ADMIN).status_code == 400
        assert client.get(f"{route}?before=%D9%A1-0", headers=ADMIN).status_code == 400


MARKER = b"FORGED-BODY-BYTES-"


def _all_values(r: redis.Redis) -> list[bytes]:
    """Every value Redis holds, read by type (DUMP would compress them)."""
    out: list[bytes] = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        if kind == b"stream":
            out += [v for _, f in r.xrange(key) for v in f.values()]
        elif kind == b"string":
            out.append(r.get(key))
        elif kind == b"hash":
            out += list(r.hgetall(key).values())
        elif kind in (b"set", b"zset", b"list"):
            out += list(r.smembers(key) if kind == b"set" else r.zrange(key, 0, -1) if kind == b"zset"
                        else r.lrange(key, 0, -1))
    return out


def test_unauthenticated_bodies_cannot_fill_redis(settings: Settings, redis_url: str, r: redis.Redis) -> None:
    """40 unsigned 60 KB posts, and every kind of body refused before authentication: metadata only, bounded."""
    import gzip

    big = b'{"type":"identify","userId":"x","traits":{"blob":"' + MARKER * 3400 + b'"}}'  # about 60 KB
    app = create_app(settings.replace(max_body_bytes=32 * 1024), redis_url, "")
    r.set("baseline", "1")
    before = r.info("memory")["used_memory"]
    with TestClient(app) as c:
        for _ in range(40):
            assert c.post("/segment", content=big[:30_000] + b'"}}').status_code == 401  # fits, unsigned
            assert c.post("/segment", content=big).status_code == 413  # over MAX_BODY_BYTES: cannot be verified
            assert c.post("/v1/batch", content=b"{" + MARKER * 3000).status_code == 400  # malformed, no key
            assert c.post("/v1/track", content=big[:31_000]).status_code == 400  # malformed (cut), no key
            assert c.post("/v1/batch", content=MARKER * 3000,
                          headers={"Content-Encoding": "gzip"}).status_code == 400  # not gzip
            assert c.post("/segment", content=gzip.compress(MARKER * 100_000),
                          headers={"Content-Encoding": "gzip"}).status_code == 413  # inflates past the limit
            assert c.post("/v1/batch", content=MARKER * 3000, headers={"Content-Encoding": "br"}).status_code == 400
            resp = c.post("/v1/identify", content=big[:20_000] + b'"}}',
                          headers={"Authorization": "Basic " + base64.b64encode(b"nope:").decode()})
            assert resp.status_code == 401 and "nothing of this request was kept" in resp.json()["error"]["message"]
    grown = r.info("memory")["used_memory"] - before
    assert grown < 256 * 1024, grown  # 320 refusals of metadata; the bodies alone were about 13 MB
    assert not any(MARKER in v for v in _all_values(r))
    keys = {k.decode() for k in r.scan_iter()}
    counted = {k for k in keys if k.startswith(REFUSAL_RATES_PREFIX)}  # refusals per minute: status codes, counts
    assert keys - counted == {"baseline", REFUSALS_KEY} and 1 <= len(counted) <= 2
    assert r.xlen(REFUSALS_KEY) == 320
    statuses = {int(f[b"status"]) for _, f in r.xrange(REFUSALS_KEY)}
    assert statuses == {400, 401, 413}


def test_a_body_with_a_valid_write_key_header_is_kept_even_when_malformed(client: TestClient, r: redis.Redis) -> None:
    from tests.conftest import WRITE_KEY

    basic = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
    assert client.post("/v1/batch", content=b'{"batch": [', headers=basic).status_code == 400
    assert client.post("/v1/batch", content=b'{"batch": [').status_code == 400
    [(_, fields)] = r.xrange(Keys("default").dead_letters)
    assert fields[b"raw"] == b'{"batch": [' and fields[b"source"] == b"tracking"
    assert r.xlen(REFUSALS_KEY) == 1


def test_dead_letters_never_keep_a_write_key(client: TestClient, r: redis.Redis) -> None:
    """A credential is not part of an event: whatever the Tracking API keeps as a dead letter (a body refused
    whole, parsed or not, or an event too large, which analytics.js sends with the write key in it) has its
    writeKey blanked, and the rest as sent."""
    from tests.conftest import WRITE_KEY

    basic = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
    malformed = b'{"writeKey": "' + WRITE_KEY.encode() + b'", "batch": ['
    assert client.post("/v1/batch", content=malformed, headers=basic).status_code == 400
    no_batch = {"writeKey": WRITE_KEY, "batch": {"not": "a list"}}
    assert client.post("/v1/batch", json=no_batch).status_code == 400
    big = {"type": "track", "userId": "u", "event": "x", "writeKey": WRITE_KEY, "properties": {"pad": "p" * 40_000}}
    resp = client.post("/v1/batch", json={"writeKey": WRITE_KEY, "batch": [big]})
    assert resp.status_code == 200 and resp.json()["rejected"] == 1
    escaped = b'{"write\\u004bey": "' + WRITE_KEY.encode() + b'", "batch": {"not": "a list"}}'  # writeKey too
    assert client.post("/v1/batch", content=escaped).status_code == 400
    raws = [f[b"raw"] for _, f in r.xrange(Keys("default").dead_letters)]
    assert len(raws) == 4 and not any(WRITE_KEY.encode() in raw for raw in raws), raws
    assert raws[0] == b'{"writeKey": "", "batch": ['
    assert orjson.loads(raws[1]) == {"writeKey": "", "batch": {"not": "a list"}}
    assert orjson.loads(raws[2]) == {**big, "writeKey": ""}


def test_open_mode_keeps_invalid_bodies_it_could_read_and_never_what_it_could_not(settings: Settings,
                                                                                  redis_url: str,
                                                                                  r: redis.Redis) -> None:
    open_mode = settings.replace(shared_secrets=(), write_keys={}, max_body_bytes=4096)
    with TestClient(create_app(open_mode, redis_url, "")) as c:
        assert c.post("/segment", content=b'{"type": ').status_code == 400
        assert c.post("/v1/track", content=b'{"type": ').status_code == 400
        assert c.post("/segment", content=b"[" + MARKER * 400 + b"]").status_code == 413
    assert [f[b"raw"] for _, f in r.xrange(Keys("default").dead_letters)] == [b'{"type": ', b'{"type": ']
    assert r.xlen(REFUSALS_KEY) == 1 and not any(MARKER in v for v in _all_values(r))


def test_dead_letters_are_capped_in_bytes_and_replay_frees_them(settings: Settings, redis_url: str,
                                                                 r: redis.Redis) -> None:
    cap = 100_000
    k = Keys("default")
    with TestClient(create_app(settings.replace(dead_letter_max_bytes=cap), redis_url, "")) as c:
        for n in range(30):  # signed batches, each with one event that cannot apply (10 KB)
            bad = {"type": "track", "event": "x", "messageId": f"bad-{n}", "properties": {"blob": "b" * 10_000}}
            good = {"type": "track", "event": "x", "userId": "u", "messageId": f"good-{n}"}
            assert post(c, orjson.dumps([good, bad])).json()["rejected"] == 1
        status = c.get("/admin/status", headers=ADMIN).json()
    stored = sum(int(f[b"n"]) for _, f in r.xrange(k.dead_letters))
    assert stored == int(r.get(k.dead_letter_bytes)) == status["spaces"][0]["dead_letter_bytes"]
    assert cap - 11_000 < stored <= cap and 5 <= r.xlen(k.dead_letters) < 30
    assert b"bad-29" in r.xrevrange(k.dead_letters, count=1)[0][1][b"raw"]  # oldest trimmed first
    # an entry an older version wrote (no size recorded, no sum kept) is counted by what it holds at the next write
    r.delete(k.dead_letter_bytes)
    late = orjson.dumps({"type": "identify", "userId": "late", "messageId": "late"})
    r.xadd(k.dead_letters, {"reason": "old", "source": "webhook", "at": 1, "raw": late})
    with TestClient(create_app(settings.replace(dead_letter_max_bytes=cap), redis_url, "")) as c:
        assert post(c, orjson.dumps({"type": "track", "event": "x", "messageId": "no-ids"})).status_code == 400
    sized = sum(int(f[b"n"]) for _, f in r.xrange(k.dead_letters) if b"n" in f)
    assert int(r.get(k.dead_letter_bytes)) == sized + len(b"old" + b"webhook" + b"1" + late)
    counts = replay_dead_letters(r, Settings(), "default")
    assert counts["replayed"] == 1 and counts["kept"] == r.xlen(k.dead_letters)
    assert int(r.get(k.dead_letter_bytes)) == sum(int(f[b"n"]) for _, f in r.xrange(k.dead_letters)) == sized


def test_a_full_redis_never_turns_a_refusal_into_a_500(client: TestClient, r: redis.Redis) -> None:
    """maxmemory reached with noeviction: an unauthenticated request is still a 401 (its log entry is skipped); the
    dead letters of an authenticated body cannot be kept, so 503 asks Segment to send it again."""
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 1)
    try:
        assert client.post("/segment", content=identify(1)).status_code == 401
        assert client.post("/v1/track", content=b"{").status_code == 400
        resp = post(client, orjson.dumps([{"type": "track", "event": "x", "messageId": "no-ids"}]))
        assert resp.status_code == 503 and resp.headers["retry-after"] == "5"
        valid = [{"type": "track", "event": "x", "userId": f"full-{n}", "messageId": f"full-{n}"} for n in range(3)]
        resp = post(client, orjson.dumps(valid))  # the apply script is refused as a whole: nothing half-applied
        assert resp.status_code == 503 and r.dbsize() == 0
    finally:
        r.config_set("maxmemory", 0)


def test_a_script_running_past_its_time_limit_is_503_not_a_dead_letter(client: TestClient, r: redis.Redis,
                                                                       redis_url: str) -> None:
    """While another script runs past ``lua-time-limit`` (a large ``persona-sync move-space``), Redis answers BUSY:
    the events are fine and must come again (503), not be kept as dead letters or answered 500."""
    import threading
    import time

    r.config_set("lua-time-limit", 50)
    busy = threading.Thread(target=lambda: redis.Redis.from_url(redis_url).eval(
        "local t = redis.call('TIME') while true do local n = redis.call('TIME') "
        "if (n[1] - t[1]) * 1000000 + n[2] - t[2] > 1500000 then return 1 end end", 0))
    try:
        busy.start()
        time.sleep(0.3)  # the script is past its 50 ms limit: every other client gets BUSY
        single = post(client, identify(1))
        valid = [{"type": "track", "event": "x", "userId": f"busy-{n}", "messageId": f"busy-{n}"} for n in range(3)]
        batch = post(client, orjson.dumps(valid))
        assert (single.status_code, batch.status_code) == (503, 503), (single.text, batch.text)
        busy.join()
        assert r.xlen(Keys("default").dead_letters) == 0
        assert post(client, orjson.dumps(valid)).status_code == 200  # Segment's retry, once the script ended
    finally:
        busy.join()
        r.config_set("lua-time-limit", 5000)


def test_a_write_key_or_an_unsigned_batch_element_cannot_erase_anyone(client: TestClient, r: redis.Redis) -> None:
    """Browser write keys are public, and in a Webhooks (Actions) batch only the first event is signed: a
    ``delete`` (a GDPR erasure, which also suppresses the user's earlier events) is taken only from a classic
    webhook, signed whole. Anywhere else it is refused as an invalid event, and stays refused when dead letters
    are replayed."""
    from tests.conftest import WRITE_KEY

    victim = orjson.dumps({"type": "identify", "userId": "victim", "messageId": "v1", "traits": {"plan": "pro"},
                           "timestamp": "2026-03-01T00:00:00Z"})
    assert post(client, victim).status_code == 200
    delete = {"type": "delete", "userId": "victim"}
    one = client.post("/v1/t", json={"writeKey": WRITE_KEY, **delete, "messageId": "d1"})
    assert one.status_code == 400 and "delete" in one.json()["error"]["message"], one.text
    batch = client.post("/v1/batch", json={"writeKey": WRITE_KEY, "batch": [
        {**delete, "messageId": "d2"}, {"type": "track", "userId": "other", "event": "Seen", "messageId": "t1"}]})
    assert batch.status_code == 200 and (batch.json()["accepted"], batch.json()["rejected"]) == (1, 1), batch.text
    actions = orjson.dumps([orjson.loads(victim) | {"messageId": "v2"}, {**delete, "messageId": "d3"}])
    resp = post(client, actions)
    assert resp.status_code == 200 and (resp.json()["accepted"], resp.json()["rejected"]) == (1, 1), resp.text
    assert "delete" in resp.json()["errors"][0]["message"]
    replay_dead_letters(r, Settings(shared_secrets=(SECRET,)), "default")
    assert {p.trait_values()["plan"] for p in profiles(r) if p.trait_values()} == {"pro"}
    assert any(i.value == "victim" for p in profiles(r) for i in p.identifiers)
    assert r.xlen(Keys("default").dead_letters) == 3  # still there, still refused
    # a classic webhook, signed whole, still deletes
    signed = orjson.dumps({**delete, "messageId": "d4", "timestamp": "2026-03-02T00:00:00Z"})
    assert post(client, signed).json()["accepted"] == 1
    assert not any(i.value == "victim" for p in profiles(r) for i in p.identifiers)
