"""What Segment's browser and mobile SDKs send, byte for byte, on the routes they use (/v1/t ... /v1/b, /b)."""

from __future__ import annotations

import base64
import gzip
from pathlib import Path

import orjson
import pytest
import redis
from starlette.testclient import TestClient

from service.spec.keys import REFUSALS_KEY, Keys
from tests.conftest import ADMIN_TOKEN, WRITE_KEY
from tests.helpers import find, profiles

BODIES = orjson.loads((Path(__file__).resolve().parents[1] / "sdk" / "analytics-next-bodies.json").read_bytes())
TEXT = {"Content-Type": "text/plain"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def logged(r: redis.Redis) -> list[dict]:
    return [orjson.loads(f[b"e"]) for _, f in r.xrange(Keys("default").log)]


# --- the Tracking API as the SDKs call it ---------------------------------------------------------------------

@pytest.mark.parametrize("short,kind", [("t", "track"), ("p", "page"), ("i", "identify"), ("g", "group"),
                                        ("a", "alias"), ("s", "screen")])
def test_each_short_route_takes_what_analytics_js_posts(client: TestClient, r: redis.Redis, short: str,
                                                         kind: str) -> None:
    resp = client.post(f"/v1/{short}", content=BODIES[short], headers={**TEXT, **basic(WRITE_KEY)})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"accepted": 1, "duplicate": 0, "suppressed": 0, "rejected": 0, "success": True}
    [event] = logged(r)
    assert event["type"] == kind and event["messageId"] == orjson.loads(BODIES[short])["messageId"]
    assert "writeKey" not in event  # the credential is not part of the event


def test_a_short_route_names_the_call_when_the_body_does_not(client: TestClient, r: redis.Redis) -> None:
    body = orjson.loads(BODIES["i"])
    del body["type"]
    assert client.post("/v1/i", content=orjson.dumps(body), headers=TEXT).status_code == 200
    assert logged(r)[0]["type"] == "identify"
    assert find(r, "user_id", "browser-user").trait_values()["plan"] == "pro"


def test_analytics_js_batching_body_on_v1_b(client: TestClient, r: redis.Redis) -> None:
    # writeKey first, one sentAt for the batch and none per event: src/plugins/segmentio/batched-dispatcher.ts
    resp = client.post("/v1/b", content=BODIES["b"], headers={**TEXT, **basic(WRITE_KEY)})
    assert resp.status_code == 200 and resp.json()["accepted"] == 6
    assert [e["type"] for e in logged(r)] == ["page", "identify", "track", "group", "alias", "screen"]
    profile = find(r, "user_id", "browser-user")
    assert profile is not None and "web" in profile.activity


def kotlin_batch(write_key: str) -> bytes:
    """analytics-kotlin 1.25.0: StorageImpl (core/src/main/java/com/segment/analytics/kotlin/core/utilities/
    StorageImpl.kt) writes ``{"batch":[`` + events joined by ``,`` + ``],"sentAt":"…","writeKey":"…"}``; each
    event is EventPipeline.stringifyBaseEvent (constructor properties first, then type, messageId, anonymousId,
    integrations, context, userId, _metadata, timestamp; SegmentInstant's millisecond UTC times). HTTPClient.kt
    uploads the file gzip-compressed, Content-Type text/plain, with no Authorization header."""
    track = ('{"properties":{"revenue":42.5,"order_id":"k-1"},"event":"Order Completed","type":"track",'
             '"messageId":"8d1d0b5e-3f64-4b4e-9c55-0d6f3c1a2b01","anonymousId":"4c3a0c4e-kotlin-anon",'
             '"integrations":{},"context":{"app":{"name":"Shop","version":"2.1.0","namespace":"com.example.shop",'
             '"build":"210"},"device":{"id":"and-dev-1","manufacturer":"Google","model":"Pixel 8","name":"shiba",'
             '"type":"android"},"library":{"name":"analytics-kotlin","version":"1.25.0"},"os":{"name":"Android",'
             '"version":"14"},"instanceId":"0b6c5a3e-kotlin"},"userId":"mobile-user",'
             '"_metadata":{"bundled":[],"unbundled":[],"bundledIds":[]},"timestamp":"2026-03-01T10:00:01.123Z"}')
    identify = ('{"userId":"mobile-user","traits":{"email":"Mobile@Example.com","plan":"team"},"type":"identify",'
                '"messageId":"8d1d0b5e-3f64-4b4e-9c55-0d6f3c1a2b00","anonymousId":"4c3a0c4e-kotlin-anon",'
                '"integrations":{},"context":{"library":{"name":"analytics-kotlin","version":"1.25.0"},'
                '"os":{"name":"Android","version":"14"},"device":{"id":"and-dev-1","type":"android"}},'
                '"_metadata":{"bundled":[],"unbundled":[],"bundledIds":[]},"timestamp":"2026-03-01T10:00:00.456Z"}')
    return ('{"batch":[' + identify + "," + track + '],"sentAt":"2026-03-01T10:00:05.000Z","writeKey":"'
            + write_key + '"}').encode()


def swift_batch(write_key: str) -> bytes:
    """analytics-swift: DirectoryStore (Sources/Segment/Utilities/Storage/Types/DirectoryStore.swift) writes each
    piece as a line: ``{ "batch": [``, the first event, ``,`` + each next one, then
    ``],"sentAt":"…","writeKey":"…"}`` (LineStreamWriter ends every line with \\n). HTTPClient.swift uploads the
    file to https://{apiHost}/b with Content-Type application/json; charset=utf-8 and no Authorization header.
    Events are JSONEncoder output of a dictionary, so their key order is not fixed; slashes are escaped."""
    screen = ('{"type":"screen","anonymousId":"F3C1-swift-anon","messageId":"B7E0C2A4-1111-4C2B-9D3E-5F6A7B8C9D0E",'
              '"userId":"mobile-user","timestamp":"2026-03-01T10:00:02.789Z","context":{"library":{"name":'
              '"analytics-swift","version":"1.9.1"},"os":{"name":"iOS","version":"17.4"},"device":{"id":'
              '"ios-dev-1","type":"ios","manufacturer":"Apple","model":"iPhone15,2"},"app":{"name":"Shop",'
              '"namespace":"com.example.shop"}},"integrations":{},"name":"Home","properties":{"url":'
              '"shop:\\/\\/home"},"_metadata":{"bundled":[],"unbundled":[],"bundledIds":[]}}')
    return ('{ "batch": [\n' + screen + '\n],"sentAt":"2026-03-01T10:00:06.000Z","writeKey":"'
            + write_key + '"}\n').encode()


def test_analytics_kotlin_batch_on_b_gzip_with_the_key_in_the_body(client: TestClient, r: redis.Redis) -> None:
    headers = {"Content-Type": "text/plain", "Content-Encoding": "gzip", "User-Agent": "analytics-kotlin/1.25.0"}
    resp = client.post("/b", content=gzip.compress(kotlin_batch(WRITE_KEY)), headers=headers)
    assert resp.status_code == 200 and resp.json()["accepted"] == 2, resp.text
    profile = find(r, "user_id", "mobile-user")
    assert profile is not None and find(r, "email", "mobile@example.com") == profile
    assert profile.trait_values()["plan"] == "team" and set(profile.activity) == {"mobile"}


def test_analytics_swift_batch_on_v1_b(client: TestClient, r: redis.Redis) -> None:
    headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "analytics-ios/1.9.1"}
    resp = client.post("/v1/b", content=swift_batch(WRITE_KEY), headers=headers)
    assert resp.status_code == 200 and resp.json()["accepted"] == 1, resp.text
    [event] = logged(r)
    assert event["properties"] == {"url": "shop://home"} and set(find(r, "user_id", "mobile-user").activity) == {
        "mobile"}


def test_b_with_basic_auth_and_no_key_in_the_body(client: TestClient, r: redis.Redis) -> None:
    body = orjson.loads(kotlin_batch("unused"))
    del body["writeKey"]
    resp = client.post("/b", content=orjson.dumps(body), headers={**TEXT, **basic(WRITE_KEY)})
    assert resp.status_code == 200 and resp.json()["accepted"] == 2


def test_b_refuses_an_unknown_write_key_before_storing_anything(client: TestClient, r: redis.Redis) -> None:
    resp = client.post("/b", content=gzip.compress(kotlin_batch("stolen-key")),
                       headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "authentication_error"
    assert profiles(r) == [] and r.xlen(Keys("default").dead_letters) == 0 and r.xlen(Keys("default").log) == 0
    [entry] = client.get("/admin/refusals", headers=ADMIN).json()["data"]
    assert entry["route"] == "/b" and entry["status"] == 401 and entry["reason"] == "write key unknown"
    assert all(b"mobile" not in v for _, f in r.xrange(REFUSALS_KEY) for v in f.values())


def test_a_malformed_b_body_with_a_valid_key_is_a_dead_letter(client: TestClient, r: redis.Redis) -> None:
    resp = client.post("/b", content=b'{"batch":[', headers={**TEXT, **basic(WRITE_KEY)})
    assert resp.status_code == 400 and r.xlen(Keys("default").dead_letters) == 1


def test_unknown_short_name_is_404(client: TestClient) -> None:
    resp = client.post("/v1/x", content=BODIES["t"], headers=TEXT)
    assert resp.status_code == 404 and resp.json()["error"]["message"] == "unknown Tracking API call /v1/x"
