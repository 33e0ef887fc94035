"""The Segment Tracking API (/v1/*) for SDKs that send straight to us, including the real Python library."""

from __future__ import annotations

import base64
import gzip

import orjson
import pytest
import redis
from segment.analytics import Client
from starlette.testclient import TestClient

from service.http.app import create_app
from service.spec.keys import Keys
from tests.conftest import ADMIN_TOKEN, WRITE_KEY, LiveServer, fixture_bytes
from tests.helpers import find


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


EVENT = {"userId": "sdk-user", "event": "Signed Up", "messageId": "sdk-1", "timestamp": "2026-03-01T00:00:00Z"}


@pytest.mark.parametrize("how", ["basic", "body", "bearer+body"])
def test_write_key_in_every_documented_place(client: TestClient, how: str) -> None:
    body, headers = dict(EVENT), {}
    if how == "basic":
        headers = basic(WRITE_KEY)
    elif how == "body":
        body["writeKey"] = WRITE_KEY
    else:
        body["writeKey"] = WRITE_KEY
        headers = {"Authorization": "Bearer some-oauth-token"}
    resp = client.post("/v1/track", content=orjson.dumps(body), headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.json()["success"] is True and resp.json()["accepted"] == 1


def test_unknown_write_key_is_401(client: TestClient) -> None:
    resp = client.post("/v1/track", content=orjson.dumps(EVENT), headers=basic("nope"))
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "authentication_error"
    assert client.post("/v1/track", content=orjson.dumps(EVENT)).status_code == 401


def test_write_key_maps_to_its_space(settings, redis_url: str, r: redis.Redis) -> None:
    app = create_app(settings.replace(write_keys={"k-eu": "spa_eu"}), redis_url, "")
    with TestClient(app) as c:
        assert c.post("/v1/identify", content=orjson.dumps(EVENT), headers=basic("k-eu")).status_code == 200
    assert r.exists(Keys("spa_eu").ident("user_id", "sdk-user"))


def test_batch_merges_shared_context_and_counts(client: TestClient, r: redis.Redis) -> None:
    resp = client.post("/v1/batch", content=fixture_bytes("tracking_api_batch.json"))
    assert resp.status_code == 200 and resp.json()["accepted"] == 2
    logged = [orjson.loads(f[b"e"]) for _, f in r.xrange(Keys("default").log)]
    assert logged[0]["context"]["library"]["name"] == "analytics.js"  # the event's own context wins


def test_gzip_body(client: TestClient) -> None:
    body = gzip.compress(orjson.dumps({"batch": [dict(EVENT, type="track")], "writeKey": WRITE_KEY}))
    resp = client.post("/v1/batch", content=body, headers={"Content-Encoding": "gzip"})
    assert resp.status_code == 200 and resp.json()["accepted"] == 1
    bad = client.post("/v1/batch", content=b"not gzip", headers={"Content-Encoding": "gzip", **basic(WRITE_KEY)})
    assert bad.status_code == 400 and "gzip" in bad.json()["error"]["message"]


def test_gzip_bodies_are_read_whole_or_refused(client: TestClient) -> None:
    """Several gzip members one after the other are one body (RFC 1952); a member followed by garbage, or a body
    cut before its checksum, is refused, never applied in part."""
    events = [dict(EVENT, type="track", messageId=f"gz{i}") for i in range(2)]
    text = orjson.dumps({"batch": events, "writeKey": WRITE_KEY})
    half = len(text) // 2
    members = gzip.compress(text[:half]) + gzip.compress(text[half:])
    resp = client.post("/v1/batch", content=members, headers={"Content-Encoding": "gzip"})
    assert resp.status_code == 200 and resp.json()["accepted"] == 2, resp.text
    whole = gzip.compress(orjson.dumps({"batch": [dict(EVENT, type="track", messageId="gz9")]}))
    # each member copies the rest of the body: 100,000 empty ones (2 MB) took 11 s of the event loop
    many = gzip.compress(b"") * 20_000 + whole
    for bad in (whole + b"trailing garbage", whole[:-4], many):
        resp = client.post("/v1/batch", content=bad, headers={"Content-Encoding": "gzip", **basic(WRITE_KEY)})
        assert resp.status_code == 400 and "gzip" in resp.json()["error"]["message"], resp.text


def test_gzip_bomb_is_413_without_inflating_it(client: TestClient) -> None:
    bomb = gzip.compress(b" " * (50 * 1024 * 1024))
    resp = client.post("/v1/batch", content=bomb, headers={"Content-Encoding": "gzip", **basic(WRITE_KEY)})
    assert resp.status_code == 413


def test_limits_per_event_and_per_batch(client: TestClient, r: redis.Redis) -> None:
    big = dict(EVENT, properties={"blob": "x" * 33_000})
    assert client.post("/v1/track", content=orjson.dumps(big), headers=basic(WRITE_KEY)).status_code == 413
    in_batch = {"batch": [dict(EVENT, type="track"), dict(big, type="track", messageId="big")]}
    out = client.post("/v1/batch", content=orjson.dumps(in_batch), headers=basic(WRITE_KEY)).json()
    assert (out["accepted"], out["rejected"]) == (1, 1) and "32768" in out["errors"][0]["message"]
    # an event just under the limit as sent stays under it, whatever times the receiver adds
    base = len(orjson.dumps(dict(EVENT, type="track", messageId="edge", sentAt="2026-03-01T00:00:01.000Z",
                                 properties={"blob": ""})))
    edge = dict(EVENT, type="track", messageId="edge", sentAt="2026-03-01T00:00:01.000Z",
                properties={"blob": "x" * (32 * 1024 - base)})
    assert len(orjson.dumps(edge)) == 32 * 1024
    out = client.post("/v1/batch", content=orjson.dumps({"batch": [edge]}), headers=basic(WRITE_KEY)).json()
    assert out["accepted"] == 1, out
    # the batch's shared context counts in each event it is merged into (it is stored once per event): an event
    # that passes 32 KB with it is refused alone; a context that would make every event too large, or the batch
    # over 4 MB once merged, refuses the batch before anything is merged (a 500 KB body of 2,500 events and a
    # context of 58,000 keys had cost 24 s of CPU and 6 GB)
    shared = {"batch": [dict(EVENT, type="track", messageId="ctx-small"),
                        dict(EVENT, type="track", messageId="ctx-big", properties={"p": "y" * 20_000})],
              "context": {"blob": "z" * 15_000}}
    out = client.post("/v1/batch", content=orjson.dumps(shared), headers=basic(WRITE_KEY)).json()
    assert (out["accepted"], out["rejected"]) == (1, 1) and "with the batch's context" in out["errors"][0]["message"]
    keys = {f"k{i}": i for i in range(30_000)}
    wide = {"batch": [{} for _ in range(2_500)], "context": keys}
    resp = client.post("/v1/batch", content=orjson.dumps(wide), headers=basic(WRITE_KEY))
    assert resp.status_code == 413 and "shared context" in resp.json()["error"]["message"]
    per_event = {"batch": [dict(EVENT, type="track", messageId=f"m-{i}") for i in range(300)],
                 "context": {"blob": "z" * 20_000}}
    resp = client.post("/v1/batch", content=orjson.dumps(per_event), headers=basic(WRITE_KEY))
    assert resp.status_code == 413 and "6003300 bytes in all" in resp.json()["error"]["message"]
    many = {"batch": [dict(EVENT, type="track", messageId=str(i)) for i in range(2501)]}
    assert client.post("/v1/batch", content=orjson.dumps(many), headers=basic(WRITE_KEY)).status_code == 413
    # a 413 keeps its time, size and address, not the body: a replay would refuse it again
    kept = [orjson.loads(f[b"raw"])["messageId"] for _, f in r.xrange(Keys("default").dead_letters)]
    assert kept == ["big", "ctx-big"]
    refusals = client.get("/admin/refusals", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    assert [(x["status"], x["route"]) for x in refusals["data"]].count((413, "/v1/batch")) == 3, refusals
    huge = {"batch": [dict(EVENT, type="track", messageId=str(i), properties={"p": "y" * 30_000})
                      for i in range(20)]}
    assert client.post("/v1/batch", content=orjson.dumps(huge), headers=basic(WRITE_KEY)).status_code == 413


def test_real_segment_python_library_lands_in_profiles(live_server: LiveServer, r: redis.Redis) -> None:
    errors: list[Exception] = []
    sdk = Client(WRITE_KEY, host=live_server.url, sync_mode=True, gzip=True, max_retries=0,
                 on_error=lambda e, batch: errors.append(e))
    sdk.identify("lib-user", {"email": "Lib@Example.com", "plan": "pro"}, anonymous_id="lib-anon")
    sdk.track("lib-user", "Order Completed", {"order_id": "L1", "revenue": 42.5,
                                              "products": [{"category": "books"}]})
    sdk.page(anonymous_id="lib-anon", name="Pricing")
    sdk.group("lib-user", "acc-9", {"industry": "Retail"})
    sdk.alias("lib-anon-2", "lib-user")
    sdk.flush()
    assert errors == []
    p = find(r, "email", "lib@example.com")
    assert p is not None and p.id == find(r, "anonymous_id", "lib-anon").id == find(r, "user_id", "lib-user").id
    assert p.trait_values()["plan"] == "pro"
    assert [o.revenue for o in p.orders] == [42.5] and p.orders[0].categories == ("books",)
    assert list(p.groups) == ["acc-9"]
    assert p.sessions("web", 0, 10**6) >= 1


def test_the_log_never_keeps_a_write_key(client: TestClient, r: redis.Redis) -> None:
    """analytics.js repeats writeKey in every batched event: a credential is not part of the event."""
    body = {"writeKey": WRITE_KEY, "batch": [dict(EVENT, type="track", messageId=f"wk-{i}", writeKey=WRITE_KEY)
                                            for i in range(2)]}
    assert client.post("/v1/b", content=orjson.dumps(body)).json()["accepted"] == 2
    assert client.post("/v1/t", content=orjson.dumps(dict(EVENT, messageId="wk-3", writeKey=WRITE_KEY))).json()[
        "accepted"] == 1
    logged = [f[b"e"] for _, f in r.xrange(Keys("default").log)]
    assert len(logged) == 3 and not any(WRITE_KEY.encode() in e for e in logged)
