"""Property-based fuzzing of every route: no input yields a 5xx, and every refusal is a JSON error body."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from urllib.parse import quote

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from service.config import Settings
from service.http.app import create_app
from tests.conftest import PROFILE_TOKEN, WRITE_KEY

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False),
                    st.text(max_size=30))
json_values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                           st.dictionaries(st.text(max_size=10), kids, max_size=4)),
                           max_leaves=12)
maybe = lambda s: st.one_of(json_values, s)  # noqa: E731 - a field is either well-formed or anything at all
event = st.fixed_dictionaries({}, optional={
    "type": maybe(st.sampled_from(["identify", "track", "page", "screen", "group", "alias", "delete", "Track"])),
    "userId": maybe(st.text(max_size=12)),
    "anonymousId": maybe(st.text(max_size=12)),
    "previousId": maybe(st.text(max_size=12)),
    "groupId": maybe(st.text(max_size=12)),
    "messageId": maybe(st.text(max_size=120)),
    "timestamp": maybe(st.sampled_from(["2026-03-01T00:00:00Z", "2026-13-01", "", "0001-01-01T00:00:00",
                                        "9999-12-31T23:59:59.999999+14:00", "2026-03-01T00:00:00.123456789Z"])),
    "event": maybe(st.sampled_from(["Order Completed", "Audience Entered", "Audience Exited", "Trait Computed",
                                    "Email Opened"])),
    "traits": maybe(st.dictionaries(st.sampled_from(["email", "plan", "ltv", "vip"]), json_values, max_size=4)),
    "properties": maybe(st.fixed_dictionaries({}, optional={
        "revenue": json_values, "total": json_values, "order_id": json_values, "audience_key": json_values,
        "trait_key": json_values, "products": st.lists(st.dictionaries(st.just("category"), json_values),
                                                       max_size=3)})),
    "context": maybe(st.fixed_dictionaries({}, optional={
        "personas": maybe(st.fixed_dictionaries({}, optional={
            "computation_class": maybe(st.sampled_from(["audience", "trait"])),
            "computation_key": maybe(st.sampled_from(["vip", "ltv"]))})),
        "device": maybe(st.fixed_dictionaries({}, optional={
            "id": json_values, "type": json_values, "advertisingId": json_values, "adTrackingEnabled": json_values,
            "token": json_values})),
        "externalIds": maybe(st.lists(st.dictionaries(st.sampled_from(["id", "type", "collection"]), json_values),
                                      max_size=3)),
        "traits": json_values, "library": json_values, "channel": json_values})),
    "integrations": json_values,
})
bodies = st.one_of(
    event.map(orjson.dumps),
    st.lists(event, max_size=5).map(orjson.dumps),
    st.fixed_dictionaries({"batch": maybe(st.lists(event, max_size=5))},
                          optional={"context": json_values, "writeKey": json_values}).map(orjson.dumps),
    json_values.map(orjson.dumps),
    st.binary(max_size=200),
)
paths = st.sampled_from(["/segment", "/segment/spa_x", "/segment/%7B%7D", "/v1/batch", "/v1/track", "/v1/identify",
                         "/v1/alias", "/v1/nope"])
headers = st.fixed_dictionaries({}, optional={
    "Content-Encoding": st.sampled_from(["gzip", "deflate", "br", "identity"]),
    "X-Signature": st.text(max_size=50).filter(lambda s: s.isascii() and s.isprintable()),
    "Authorization": st.sampled_from(["Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(), "Basic !!!",
                                      "Bearer", "Bearer x", "Basic " + base64.b64encode(b"\xff").decode()]),
})


@pytest.fixture(scope="module")
def fuzz_client(redis_server) -> Iterator[TestClient]:
    app = create_app(Settings(profile_api_token=PROFILE_TOKEN, admin_token="a"), redis_server.url, "")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def check(resp) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        assert "error" in resp.json() and resp.json()["error"]["message"]


EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "600"))  # a deeper run: FUZZ_EXAMPLES=6000 make test


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=paths, body=bodies, hdrs=headers)
def test_no_input_yields_a_5xx(fuzz_client: TestClient, path: str, body: bytes, hdrs: dict) -> None:
    check(fuzz_client.post(path, content=body, headers=hdrs))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(ident=st.text(max_size=30), part=st.sampled_from(["traits", "external_ids", "metadata", "links", "x"]),
       params=st.dictionaries(st.sampled_from(["limit", "next", "include", "class", "verbose"]),
                              st.text(max_size=10), max_size=4))
def test_profile_api_never_5xx(fuzz_client: TestClient, ident: str, part: str, params: dict) -> None:
    auth = {"Authorization": "Basic " + base64.b64encode(f"{PROFILE_TOKEN}:".encode()).decode()}
    path = "/v1/spaces/default/collections/users/profiles/" + quote(ident, safe=":@") + "/" + part
    check(fuzz_client.get(path, params=params, headers=auth))


# --- hostile bodies: deep nesting, huge numbers, lone surrogates, bytes that are not UTF-8 ------------------------
def nested(depth: int, kinds: str, leaf: bytes) -> bytes:
    """``depth`` levels, each an array or an object as ``kinds`` cycles ('a', 'o')."""
    opens, closes = [], []
    for i in range(depth):
        if kinds[i % len(kinds)] == "a":
            opens.append(b"[")
            closes.append(b"]")
        else:
            opens.append(b'{"k":')
            closes.append(b"}")
    return b"".join(opens) + leaf + b"".join(reversed(closes))


HUGE_NUMBERS = [b"1e400", b"-1e400", b"1" + b"0" * 400, b"9" * 5000, b"-" + b"9" * 5000, b"1e-400", b"123456789" * 40
                + b".5", b"18446744073709551616", b"-9223372036854775809"]
SURROGATES = [b'"\\ud800"', b'"\\udfff"', b'"\\ud800\\u0041"', b'"x\\udc00y"', b'"\\ud800\\ud800"', b'"\\udbff\\udfff"']
NOT_UTF8 = [b'"\xff"', b'"\xc3"', b'"\xed\xa0\x80"', b'"\xf8\x88\x80\x80\x80"', b'"\xc0\xaf"', b'"a\x80b"']
deep = st.builds(nested, st.integers(200, 6000), st.sampled_from(["a", "o", "ao", "aoo"]),
                 st.sampled_from([b"1", b"", b'"x"', b"[", b"{", b"null"]))
hostile_leaf = st.one_of(deep, st.sampled_from(HUGE_NUMBERS + SURROGATES + NOT_UTF8))


def _wrap(shape: str, leaf: bytes) -> bytes:
    event = (b'{"type":"identify","userId":"fz","messageId":"fz-1","traits":{"v":' + leaf + b'},'
             b'"properties":{"revenue":' + leaf + b'}}')
    return {
        "bare": leaf,
        "event": event,
        "actions": b"[" + event + b"," + event + b"]",
        "first": b"[" + leaf + b"," + event + b"]",
        "batch": b'{"writeKey":"' + WRITE_KEY.encode() + b'","batch":[' + event + b"]}",
        "key": b'{"type":"track","event":' + leaf + b',"userId":' + leaf + b"}",
        "kpi": b'{"customers":[{"id":"c1","frequency":' + leaf + b',"amount_spent":' + leaf
               + b',"product_types":["x"]}],"labels":{"c1":' + leaf + b"}}",
    }[shape]


hostile_bodies = st.builds(_wrap, st.sampled_from(["bare", "event", "actions", "first", "batch", "key", "kpi"]),
                           hostile_leaf)
BODY_ROUTES = ["/segment", "/segment/spa_x", "/v1/batch", "/v1/track", "/v1/identify", "/v1/alias",
               "/api/v1/segment_cluster_profiles"]
HOSTILE_SECRET = "fuzz-secret"


@pytest.fixture(scope="module")
def signed_client(redis_server) -> Iterator[TestClient]:
    """Secrets and write keys configured: hostile bodies reach the code behind the signature and write-key checks."""
    app = create_app(Settings(shared_secrets=(HOSTILE_SECRET,), write_keys={WRITE_KEY: "default"},
                              profile_api_token=PROFILE_TOKEN, admin_token="a"), redis_server.url, "")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _signature(body: bytes) -> str:
    import hashlib
    import hmac

    from service.http.auth import signed_part

    try:
        part = signed_part(body)
    except ValueError:
        part = body
    return hmac.new(HOSTILE_SECRET.encode(), part, hashlib.sha1).hexdigest()


@settings(max_examples=max(150, EXAMPLES // 3), deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(BODY_ROUTES), body=hostile_bodies, signed=st.booleans(), gzipped=st.booleans())
def test_hostile_bodies_never_yield_a_5xx(fuzz_client: TestClient, signed_client: TestClient, path: str,
                                          body: bytes, signed: bool, gzipped: bool) -> None:
    import gzip

    hdrs = {"Authorization": "Bearer a"} if path.startswith("/api/") else {}
    if signed:
        hdrs["X-Signature"] = _signature(body)
        if path.startswith("/v1/"):
            hdrs["Authorization"] = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    if gzipped:
        body = gzip.compress(body)
        hdrs["Content-Encoding"] = "gzip"
    for c in (fuzz_client, signed_client):
        check(c.post(path, content=body, headers=hdrs))


@pytest.mark.parametrize("path", BODY_ROUTES)
@pytest.mark.parametrize("body", [b"[" * 5000, b"{" * 5000, b"[" * 5000 + b"]" * 5000, nested(5000, "o", b"1"),
                                  nested(300, "ao", b"1"), nested(1024, "a", b"1"), b"[1e400]", b'["\\ud800"]',
                                  b"[" + b"9" * 5000 + b"]", b"\xff\xfe[]", _wrap("actions", nested(300, "o", b"1")),
                                  _wrap("event", nested(1000, "a", b"1")), _wrap("batch", nested(600, "ao", b"2"))],
                         ids=lambda b: f"{b[:12]!r}..{len(b)}")
def test_known_hostile_bodies(fuzz_client: TestClient, signed_client: TestClient, path: str, body: bytes) -> None:
    """The shapes that answered 500 before (a recursive decoder in the signature check; events the encoder could
    not serialise again), signed and unsigned, in open mode and with secrets."""
    auth = {"Authorization": "Bearer a"} if path.startswith("/api/") else {}
    signed = {**auth, "X-Signature": _signature(body)}
    if path.startswith("/v1/"):
        signed["Authorization"] = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    for c in (fuzz_client, signed_client):
        for hdrs in (auth, signed):
            check(c.post(path, content=body, headers=hdrs))
