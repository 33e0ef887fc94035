"""Profile API compatibility: URLs, parameters, cursor, verbose values, error envelope, merged identities."""

from __future__ import annotations

import base64

import orjson
import pytest
import redis
from starlette.testclient import TestClient

from tests.conftest import PROFILE_TOKEN, fixture_json
from tests.helpers import apply

BASE = "/v1/spaces/default/collections/users/profiles"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{PROFILE_TOKEN}:".encode()).decode()}


@pytest.fixture
def loaded(client: TestClient, r: redis.Redis) -> TestClient:
    events = [fixture_json(n) for n in ("identify.json", "audience_entered.json", "computed_trait_identify.json",
                                        "trait_computed_track.json", "external_ids_identify.json", "group.json",
                                        "page.json", "screen.json")]
    apply(r, events)
    return client


def get(c: TestClient, path: str, **params: str):
    return c.get(BASE + path, params=params, headers=AUTH)


def test_traits_of_merged_profile_from_every_identifier(loaded: TestClient) -> None:
    first = get(loaded, "/user_id:usr_001/traits", limit="100").json()
    for ident in ("email:j.doe@example.com", "anonymous_id:507f191e810c19729de860ea",
                  "ios.id:B5372DB0-C21E-11E4-8DFC-AA07A5B093DB", "email:J.Doe%40Example.com"):
        assert get(loaded, f"/{ident}/traits", limit="100").json()["traits"] == first["traits"]
    traits = first["traits"]
    assert traits["plan"] == "pro" and traits["ltv"] == 1200
    assert traits["high_value_users"] is True  # audience membership is a boolean trait
    assert traits["mobile_sessions_30d"] == 22 and traits["web_sessions_30d"] == 14


def test_traits_paging_include_class_and_verbose(loaded: TestClient) -> None:
    page1 = get(loaded, "/user_id:usr_001/traits", limit="3").json()
    assert len(page1["traits"]) == 3 and page1["cursor"]["has_more"] is True
    page2 = get(loaded, "/user_id:usr_001/traits", limit="3", next=page1["cursor"]["next"]).json()
    assert not set(page1["traits"]) & set(page2["traits"])
    assert sorted(page1["traits"]) + sorted(page2["traits"]) == sorted(page1["traits"] | page2["traits"])
    assert get(loaded, "/user_id:usr_001/traits", include="plan,name").json()["traits"] == {
        "name": "Jane Doe", "plan": "pro"}
    assert get(loaded, "/user_id:usr_001/traits", **{"class": "audience"}).json()["traits"] == {
        "high_value_users": True}
    computed = get(loaded, "/user_id:usr_001/traits", **{"class": "computed_trait"}).json()["traits"]
    assert set(computed) == {"web_sessions_30d", "mobile_sessions_30d"}
    verbose = get(loaded, "/user_id:usr_001/traits", include="plan", verbose="true").json()["traits"]["plan"]
    assert verbose == {"value": "pro", "source_id": None, "updated_at": "2026-03-15T10:00:00.000Z"}


def test_external_ids(loaded: TestClient) -> None:
    body = get(loaded, "/user_id:usr_003/external_ids").json()
    got = {(d["type"], d["id"]) for d in body["data"]}
    assert got == {("user_id", "usr_003"), ("email", "m.patel@example.com"), ("phone", "+1-555-0100"),
                   ("crm_id", "crm-77812")}
    one = next(d for d in body["data"] if d["type"] == "phone")
    assert one == {"id": "+1-555-0100", "type": "phone", "source_id": None, "collection": "users",
                   "created_at": "2026-03-17T09:00:00.000Z", "encoding": "none",
                   "first_message_id": "ajs-externalids-0008"}
    assert get(loaded, "/phone:+1-555-0100/external_ids").json()["data"] == body["data"]


def test_metadata_and_links(loaded: TestClient) -> None:
    meta = get(loaded, "/user_id:usr_001/metadata").json()["metadata"]
    assert meta["first_message_id"] == "ajs-6f0a1c2e-page-0003"
    assert meta["last_message_id"] == "personas_8hQ2mXmtra2"  # latest event time; ties by messageId
    assert meta["segment_id"].startswith("use_")
    links = get(loaded, "/user_id:usr_001/links").json()
    assert links["data"][0]["external_ids"][0]["id"] == "acc_0042"


def test_errors_use_segment_envelope(loaded: TestClient) -> None:
    missing = get(loaded, "/user_id:nobody/traits")
    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "not_found", "message": "Profile was not found."}}
    assert loaded.get(BASE + "/user_id:usr_001/traits").status_code == 401
    wrong = {"Authorization": "Basic " + base64.b64encode(b"wrong:").decode()}
    assert loaded.get(BASE + "/user_id:usr_001/traits", headers=wrong).json()["error"]["code"] == \
        "authentication_error"
    assert get(loaded, "/user_id:usr_001/traits", limit="500").json()["error"]["code"] == "validation_error"
    assert get(loaded, "/usr_001/traits").json()["error"]["code"] == "invalid_request_error"
    assert get(loaded, "/user_id:usr_001/nothing").status_code == 404


def test_deleted_profile_is_not_found(loaded: TestClient, r: redis.Redis) -> None:
    apply(r, [{"type": "delete", "userId": "usr_001", "timestamp": "2026-05-01T00:00:00Z"}])
    assert get(loaded, "/email:j.doe@example.com/traits").status_code == 404
    assert orjson.loads(get(loaded, "/user_id:usr_001/metadata").content)["error"]["code"] == "not_found"
