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

from service.app import create_app
from service.config import Settings
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
def fuzz_client(redis_server) -> Iterator[TestClient]:  # noqa: ANN001
    app = create_app(Settings(profile_api_token=PROFILE_TOKEN, admin_token="a"), redis_server.url, "")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def check(resp) -> None:  # noqa: ANN001
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
