"""Issue "Trust": what failed authentication is never stored as replayable, never reaches the state, and cannot
fill Redis; refusals before authentication keep metadata only (GET /admin/refusals)."""

from __future__ import annotations

import base64

import orjson
import redis
from starlette.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.keys import REFUSALS_KEY, Keys
from service.ops import replay_dead_letters, space_status
from tests.conftest import ADMIN_TOKEN
from tests.helpers import profiles
from tests.test_receiver import post, sign

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
        row = c.get("/admin/status", headers=ADMIN).json()
    assert 50 <= row["refusals_logged"] <= 150  # approximate trimming: whole stream nodes of 100 entries
    assert space_status(r)[0]["refusals_logged"] == row["refusals_logged"]
    assert not [k for k in r.scan_iter("sps:{spa_*")]  # claimed spaces created no keys


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
