"""What Segment's browser and mobile SDKs send, byte for byte, on the routes they use (/v1/t ... /v1/b, /b), CORS
for exactly those routes, and the settings endpoint analytics.js and the mobile libraries load at start."""

from __future__ import annotations

import base64
import gzip
from pathlib import Path

import orjson
import pytest
import redis
from starlette.testclient import TestClient

from service.config import ConfigError, Settings
from service.http.app import create_app
from service.spec.keys import REFUSALS_KEY, Keys
from tests.conftest import ADMIN_TOKEN, PROFILE_TOKEN, WRITE_KEY
from tests.helpers import find, profiles

BODIES = orjson.loads((Path(__file__).resolve().parents[1] / "sdk" / "analytics-next-bodies.json").read_bytes())
SHOP = "https://shop.example.com"
TEXT = {"Content-Type": "text/plain"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def logged(r: redis.Redis) -> list[dict]:
    return [orjson.loads(f[b"e"]) for _, f in r.xrange(Keys("default").log)]


@pytest.fixture
def shop_client(settings: Settings, redis_url: str):
    with TestClient(create_app(settings.replace(cors_allow_origins=(SHOP,)), redis_url, "")) as c:
        yield c


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


# --- CORS --------------------------------------------------------------------------------------------------------

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


@pytest.mark.parametrize("path", ["/v1/t", "/v1/b", "/b", "/v1/batch", "/v1/identify"])
def test_preflight_from_an_allowed_origin(shop_client: TestClient, path: str) -> None:
    resp = shop_client.options(path, headers={"Origin": SHOP, **PREFLIGHT})
    assert resp.status_code == 204 and resp.content == b""
    h = resp.headers
    assert h["access-control-allow-origin"] == SHOP and h["access-control-allow-methods"] == "POST, OPTIONS"
    allowed = {x.strip().lower() for x in h["access-control-allow-headers"].split(",")}
    assert {"content-type", "authorization", "x-retry-count"} <= allowed
    assert int(h["access-control-max-age"]) > 0 and "access-control-allow-credentials" not in h
    assert "Origin" in h["vary"]


def test_preflight_from_another_origin_is_403_without_cors_headers(shop_client: TestClient) -> None:
    resp = shop_client.options("/v1/t", headers={"Origin": "https://evil.example", **PREFLIGHT})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "cors_forbidden"
    assert "origin" in resp.json()["error"]["message"]
    assert not [k for k in resp.headers if k.startswith("access-control-")]


def test_preflight_asking_for_another_header_is_403(shop_client: TestClient) -> None:
    headers = {"Origin": SHOP, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-debug"}
    resp = shop_client.options("/v1/t", headers=headers)
    assert resp.status_code == 403 and "headers" in resp.json()["error"]["message"]


def test_responses_carry_the_origin_only_when_it_is_allowed(shop_client: TestClient) -> None:
    ok = shop_client.post("/v1/t", content=BODIES["t"], headers={**TEXT, "Origin": SHOP})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == SHOP
    assert "access-control-allow-credentials" not in ok.headers
    other = shop_client.post("/v1/p", content=BODIES["p"], headers={**TEXT, "Origin": "https://evil.example"})
    assert other.status_code == 200  # CORS is the browser's to enforce: it will not hand this answer to the page
    assert not [k for k in other.headers if k.startswith("access-control-")]
    refused = shop_client.post("/v1/t", content=b'{"event":"x"}', headers={**TEXT, "Origin": SHOP})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == SHOP  # readable


def test_any_origin_by_default(client: TestClient) -> None:
    pre = client.options("/b", headers={"Origin": "https://anywhere.example", **PREFLIGHT})
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == "*"
    resp = client.post("/v1/i", content=BODIES["i"], headers={**TEXT, "Origin": "https://anywhere.example"})
    assert resp.headers["access-control-allow-origin"] == "*" and "access-control-allow-credentials" not in resp.headers


@pytest.mark.parametrize("method,path,auth", [
    ("GET", "/v1/spaces/default/collections/users/profiles/user_id:browser-user/traits", basic(PROFILE_TOKEN)),
    ("POST", "/segment", {}), ("GET", "/admin/refusals", ADMIN), ("GET", "/healthz", {}), ("GET", "/metrics", {}),
])
def test_other_routes_never_answer_with_cors(client: TestClient, method: str, path: str,
                                             auth: dict[str, str]) -> None:
    origin = {"Origin": "https://anywhere.example"}
    resp = client.request(method, path, headers={**origin, **auth})
    assert resp.status_code in (200, 401, 404) and not [k for k in resp.headers if k.startswith("access-control-")]
    pre = client.options(path, headers={**origin, "Access-Control-Request-Method": method})
    assert pre.status_code == 405 and not [k for k in pre.headers if k.startswith("access-control-")]


def test_a_plain_options_request_is_not_an_event(client: TestClient, r: redis.Redis) -> None:
    assert client.options("/v1/t").status_code == 405 and client.get("/b").status_code == 405
    assert r.xlen(Keys("default").log) == 0


def test_cors_allow_origins_setting() -> None:
    assert Settings.from_env({}).cors_allow_origins == ("*",)
    s = Settings.from_env({"CORS_ALLOW_ORIGINS": " https://Shop.example.com, http://localhost:3000 "})
    assert s.cors_allow_origins == ("https://shop.example.com", "http://localhost:3000")
    assert Settings.from_env({"CORS_ALLOW_ORIGINS": "https://a.example,*"}).cors_allow_origins == ("*",)
    assert Settings.from_env({"CORS_ALLOW_ORIGINS": ""}).cors_allow_origins == ()
    for bad in ("https://shop.example.com/", "shop.example.com", "https://shop.example.com/path", "ftp://x.example"):
        with pytest.raises(ConfigError, match="CORS_ALLOW_ORIGINS"):
            Settings.from_env({"CORS_ALLOW_ORIGINS": bad})


def test_no_origin_allowed_when_the_setting_is_empty(settings: Settings, redis_url: str) -> None:
    with TestClient(create_app(settings.replace(cors_allow_origins=()), redis_url, "")) as c:
        assert c.options("/v1/t", headers={"Origin": SHOP, **PREFLIGHT}).status_code == 403
        resp = c.post("/v1/t", content=BODIES["t"], headers={**TEXT, "Origin": SHOP})
        assert resp.status_code == 200 and "access-control-allow-origin" not in resp.headers


# --- the settings endpoint -------------------------------------------------------------------------------------

def settings_url(key: str = WRITE_KEY) -> str:
    return f"/v1/projects/{key}/settings"


def test_settings_for_a_known_write_key_point_the_sdk_at_us(shop_client: TestClient) -> None:
    resp = shop_client.get("https://sdk.example.com" + settings_url(), headers={"Origin": SHOP})
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == SHOP
    body = resp.json()
    assert body["integrations"] == {"Segment.io": {
        "apiKey": WRITE_KEY, "apiHost": "sdk.example.com/v1", "protocol": "https", "unbundledIntegrations": [],
        "addBundledMetadata": True, "maybeBundledConfigIds": {}}}
    for key in ("plan", "edgeFunction", "middlewareSettings", "metrics"):  # analytics-kotlin decodes JsonObjects
        assert isinstance(body[key], dict)
    assert body["metrics"]["sampleRate"] == 0 and body["analyticsNextEnabled"] is True
    assert "private" in resp.headers["cache-control"]


def test_settings_api_host_is_the_host_the_request_reached(client: TestClient) -> None:
    body = client.get("http://127.0.0.1:8123" + settings_url()).json()
    assert body["integrations"]["Segment.io"]["apiHost"] == "127.0.0.1:8123/v1"
    assert body["integrations"]["Segment.io"]["protocol"] == "http"
    assert client.get(settings_url(), headers={"Host": "bad host/x"}).status_code == 400


def test_settings_for_an_unknown_write_key_is_404_and_names_no_key(shop_client: TestClient) -> None:
    resp = shop_client.get(settings_url("someone-elses-key"), headers={"Origin": SHOP})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    assert WRITE_KEY not in resp.text and resp.headers["access-control-allow-origin"] == SHOP  # the page reads why


def test_settings_in_open_mode_serve_any_key(settings: Settings, redis_url: str) -> None:
    with TestClient(create_app(settings.replace(write_keys={}), redis_url, "")) as c:
        resp = c.get(settings_url("any-key-at-all"))
        assert resp.status_code == 200 and resp.json()["integrations"]["Segment.io"]["apiKey"] == "any-key-at-all"


def test_settings_preflight_and_origins(shop_client: TestClient) -> None:
    pre = shop_client.options(settings_url(), headers={"Origin": SHOP, "Access-Control-Request-Method": "GET"})
    assert pre.status_code == 204 and pre.headers["access-control-allow-methods"] == "GET, HEAD, OPTIONS"
    other = shop_client.get(settings_url(), headers={"Origin": "https://evil.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    assert shop_client.post(settings_url()).status_code == 405
