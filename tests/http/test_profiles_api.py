"""Profile API compatibility: URLs, parameters, cursor, verbose values, error envelope, merged identities."""

from __future__ import annotations

import base64
import dataclasses
import time

import orjson
import pytest
import redis
from starlette.testclient import TestClient

from service.config import Settings
from service.http import profiles_api
from service.http.app import create_app
from service.state.rebuild import rebuild
from service.state.store import state_keys
from tests.conftest import PROFILE_TOKEN, fixture_json
from tests.helpers import apply, find

BOTH_BACKENDS = True  # each test runs on a standalone Redis and on a Redis Cluster (tests/conftest.py)

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


def test_a_bad_client_clock_cannot_break_a_profiles_reads(client: TestClient, r: redis.Redis) -> None:
    """A time before year 1 in UTC was once accepted, then made every read of the profile answer 500: it is
    refused now, and a profile that holds one from then is still read (the time shown as unknown)."""
    from tests.conftest import WRITE_KEY

    apply(r, [{"type": "identify", "userId": "clock", "messageId": "c1", "timestamp": "2026-03-01T00:00:00Z"}])
    bad = client.post("/v1/t", json={"writeKey": WRITE_KEY, "userId": "clock", "event": "x", "messageId": "c2",
                                     "timestamp": "0001-01-01T00:00:00+14:00"})
    assert bad.status_code == 400 and "before 1970" in bad.json()["error"]["message"], bad.text
    assert get(client, "/user_id:clock/metadata").json()["metadata"]["first_message_at"] == "2026-03-01T00:00:00.000Z"
    pid = find(r, "user_id", "clock").id
    r.hset(state_keys(r, "default").profile(pid), "m:fs", "-62135640000000")  # what an older version stored
    meta = get(client, "/user_id:clock/metadata")
    assert meta.status_code == 200 and meta.json()["metadata"]["first_message_at"] is None, meta.text
    assert get(client, "/user_id:clock/traits", verbose="true").status_code == 200


def test_errors_use_segment_envelope(loaded: TestClient) -> None:
    missing = get(loaded, "/user_id:nobody/traits")
    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "not_found", "message": "Profile was not found."}}
    assert loaded.get(BASE + "/user_id:usr_001/traits").status_code == 401
    wrong = {"Authorization": "Basic " + base64.b64encode(b"wrong:").decode()}
    assert loaded.get(BASE + "/user_id:usr_001/traits", headers=wrong).json()["error"]["code"] == \
        "authentication_error"
    assert get(loaded, "/user_id:usr_001/traits", limit="500").json()["error"]["code"] == "validation_error"
    for odd in ("²", "٣", "1e2", " 5"):  # digits to str.isdigit, not to int()
        for part in ("traits", "events"):
            resp = get(loaded, f"/user_id:usr_001/{part}", limit=odd)
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "validation_error", (odd, resp.text)
    assert get(loaded, "/usr_001/traits").json()["error"]["code"] == "invalid_request_error"
    assert get(loaded, "/user_id:usr_001/nothing").status_code == 404


def test_deleted_profile_is_not_found(loaded: TestClient, r: redis.Redis) -> None:
    apply(r, [{"type": "delete", "userId": "usr_001", "timestamp": "2026-05-01T00:00:00Z"}])
    assert get(loaded, "/email:j.doe@example.com/traits").status_code == 404
    assert orjson.loads(get(loaded, "/user_id:usr_001/metadata").content)["error"]["code"] == "not_found"


# -- /events, accounts, identifiers, rate limit --------------------------------------------------------------------

DAY = 86400 * 1000


def iso_ms(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def track(uid: str | None, n: int, at: int, event: str = "Product Viewed", anon: str | None = None) -> dict:
    e = {"type": "track", "event": event, "messageId": f"m-{uid or anon}-{event}-{n}", "timestamp": iso_ms(at),
         "properties": {"n": n}}
    if uid:
        e["userId"] = uid
    if anon:
        e["anonymousId"] = anon
    return e


def test_events_pages_through_250_events_newest_first(client: TestClient, r: redis.Redis) -> None:
    now = int(time.time() * 1000)
    apply(r, [track("u250", n, now - DAY + n * 1000) for n in range(250)])
    seen: list[int] = []
    url, params = BASE + "/user_id:u250/events", {"limit": "100"}
    for size, more in ((100, True), (100, True), (50, False)):
        body = client.get(url, params=params, headers=AUTH).json()
        assert len(body["data"]) == size and body["cursor"]["has_more"] is more
        seen += [e["properties"]["n"] for e in body["data"]]
        params = {"limit": "100", "next": body["cursor"]["next"]}
    assert seen == list(range(249, -1, -1))  # every event once, newest first
    one = client.get(url, params={"limit": "1"}, headers=AUTH).json()["data"][0]
    assert (one["type"], one["event"], one["message_id"]) == ("track", "Product Viewed", "m-u250-Product Viewed-249")
    assert one["external_ids"] == [{"collection": "users", "type": "user_id", "id": "u250", "encoding": "none"}]
    assert one["related"]["users"].startswith("use_") and one["timestamp"] == iso_ms(now - DAY + 249_000)
    asc = client.get(url, params={"limit": "3", "sort": "asc"}, headers=AUTH).json()
    assert [e["properties"]["n"] for e in asc["data"]] == [0, 1, 2]
    # the cursor URL names the profile by its id and carries the parameters: following it gives the next page
    nxt = client.get(asc["cursor"]["url"], headers=AUTH).json()
    assert "/profiles/use_" in asc["cursor"]["url"] and [e["properties"]["n"] for e in nxt["data"]] == [3, 4, 5]


def test_events_filters_by_time_name_and_type(client: TestClient, r: redis.Redis) -> None:
    now = int(time.time() * 1000)
    apply(r, [track("u1", 1, now - 20 * DAY), track("u1", 2, now - 2 * DAY),
              track("u1", 3, now - DAY, "Order Completed"),
              {"type": "page", "name": "Home", "userId": "u1", "messageId": "p1", "timestamp": iso_ms(now - DAY)},
              {"type": "identify", "userId": "u1", "messageId": "i1", "traits": {"plan": "pro"},
               "timestamp": iso_ms(now - 3 * DAY)}])

    def names(**params: str) -> list:
        body = client.get(BASE + "/user_id:u1/events", params=params, headers=AUTH).json()
        return [e.get("event") or e["type"] for e in body["data"]]

    assert names() == ["Order Completed", "Product Viewed"]  # track only, last 14 days by default
    assert names(start=iso_ms(now - 30 * DAY)) == ["Order Completed", "Product Viewed", "Product Viewed"]
    assert names(start=iso_ms(now - 30 * DAY)[:10], end=iso_ms(now - 10 * DAY)) == ["Product Viewed"]
    assert names(include="Order Completed") == ["Order Completed"]
    assert names(exclude="Order Completed") == ["Product Viewed"]
    assert names(include="page,identify") == ["page", "identify"]
    assert names(include="track,page", exclude="Product Viewed") == ["Order Completed", "page"]
    page = client.get(BASE + "/user_id:u1/events", params={"include": "page"}, headers=AUTH).json()["data"][0]
    assert page["name"] == "Home" and page["message_id"] == "p1"
    for bad in ({"sort": "up"}, {"limit": "101"}, {"start": "yesterday"}, {"next": "not-a-cursor"}):
        assert client.get(BASE + "/user_id:u1/events", params=bad, headers=AUTH).json()["error"]["code"] == \
            "validation_error"


def test_events_whose_name_is_not_text_are_listed_not_a_500(client: TestClient, r: redis.Redis) -> None:
    """A track's ``event`` may arrive as any JSON (a write key is public): the person's events still read, and
    name filters pass over such an event like one without a name."""
    now = int(time.time() * 1000)
    apply(r, [{**track("u1", 1, now - DAY), "event": {"x": 1}}, {**track("u1", 2, now - DAY), "event": ["x"]},
              track("u1", 3, now - DAY)])
    body = client.get(BASE + "/user_id:u1/events", headers=AUTH)
    assert body.status_code == 200 and sorted(map(str, (e["event"] for e in body.json()["data"]))) == [
        "Product Viewed", "['x']", "{'x': 1}"]
    only = client.get(BASE + "/user_id:u1/events", params={"include": "Product Viewed"}, headers=AUTH).json()
    assert [e["event"] for e in only["data"]] == ["Product Viewed"]
    assert len(client.get(BASE + "/user_id:u1/events", params={"exclude": "Product Viewed"},
                          headers=AUTH).json()["data"]) == 2


def test_traits_page_on_after_a_trait_named_with_nothing(client: TestClient, r: redis.Redis) -> None:
    """A trait called "" sorts first: its page's cursor must still lead on, not be an empty ``next``."""
    apply(r, [{"type": "identify", "userId": "ue", "messageId": "ue-1", "timestamp": "2026-03-01T00:00:00Z",
               "traits": {"": "blank", "a": 1, "b": 2}}])
    seen, params = [], {"limit": "1"}
    for _ in range(5):
        body = client.get(BASE + "/user_id:ue/traits", params=params, headers=AUTH).json()
        seen += list(body["traits"])
        if not body["cursor"]["has_more"]:
            break
        assert body["cursor"]["next"]
        params = {"limit": "1", "next": body["cursor"]["next"]}
    assert seen == ["", "a", "b"]
    bad = client.get(BASE + "/user_id:ue/traits", params={"next": "plan"}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "validation_error"


def test_events_of_a_merged_profile_include_those_merged_into_it(client: TestClient, r: redis.Redis) -> None:
    now = int(time.time() * 1000)
    apply(r, [track(None, 1, now - 3 * DAY, "Signup Started", anon="anon-9"),
              track("u9", 2, now - 2 * DAY, "Order Completed"),
              {"type": "identify", "userId": "u9", "anonymousId": "anon-9", "messageId": "merge-9",
               "timestamp": iso_ms(now - DAY)}])
    for ident in ("user_id:u9", "anonymous_id:anon-9"):
        body = client.get(BASE + f"/{ident}/events", headers=AUTH).json()
        assert [e["event"] for e in body["data"]] == ["Order Completed", "Signup Started"]


def test_events_survive_a_rebuild(client: TestClient, r: redis.Redis, settings: Settings) -> None:
    now = int(time.time() * 1000)
    # received now: helpers.apply's default receipt time is the session's start, and a rebuild refuses profiles
    # created (received) long before the log's first entry
    apply(r, [track("u5", n, now - DAY + n) for n in range(3)], now=now)
    rebuild(r, settings, "default")
    assert state_keys(r, "default").gen  # a new generation answers
    body = client.get(BASE + "/user_id:u5/events", headers=AUTH).json()
    assert [e["properties"]["n"] for e in body["data"]] == [2, 1, 0]


def test_events_read_across_a_rebuilds_switch_come_from_the_generation_the_profile_was_found_in(
        client: TestClient, r: redis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebuild's switch can land between a request's profile read and its events' read: the events are read
    from the generation the profile was found in (the other one numbers its profiles differently), not an empty
    page."""
    from service.spec.keys import Keys
    from service.state.reads import ProfileReader

    now = int(time.time() * 1000)
    apply(r, [track("u6", n, now - DAY + n) for n in range(3)], now=now)
    rebuild(r, settings, "default")  # g1: is current, the original generation stays
    found = ProfileReader.find

    async def find_then_switch(self: ProfileReader, space: str, kind: str, value: str) -> object:
        live = await found(self, space, kind, value)
        r.set(Keys("default").generation_key, "")  # a switch, right after the profile was read
        return live

    monkeypatch.setattr(ProfileReader, "find", find_then_switch)
    body = client.get(BASE + "/user_id:u6/events", headers=AUTH).json()
    assert [e["properties"]["n"] for e in body["data"]] == [2, 1, 0]


def test_accounts_traits_and_links(client: TestClient, r: redis.Redis) -> None:
    apply(r, [{"type": "group", "userId": uid, "groupId": "acc/7", "messageId": f"g-{uid}",
               "traits": {"name": "Initech", "plan": "enterprise", "employees": 40 + n},
               "timestamp": f"2026-03-0{n + 1}T00:00:00Z"} for n, uid in enumerate(("ua", "ub"))])
    accounts = "/v1/spaces/default/collections/accounts/profiles/group_id:acc%2F7"
    traits = client.get(accounts + "/traits", headers=AUTH).json()
    assert traits["traits"] == {"name": "Initech", "plan": "enterprise", "employees": 41}  # the later group call
    links = client.get(accounts + "/links", headers=AUTH).json()["data"]
    users = {ln["external_ids"][0]["id"] for ln in links}
    assert len(users) == 2 and all(u.startswith("use_") for u in users)
    assert {ln["to_collection"] for ln in links} == {"users"}
    mine = client.get(BASE + "/user_id:ua/links", headers=AUTH).json()["data"]
    assert mine[0]["external_ids"][0]["id"] == "acc/7" and mine[0]["to_collection"] == "accounts"
    assert client.get(accounts.replace("acc%2F7", "nope") + "/traits", headers=AUTH).status_code == 404
    assert client.get(accounts + "/events", headers=AUTH).status_code == 404  # accounts have traits and links
    bad = client.get("/v1/spaces/default/collections/accounts/profiles/user_id:ua/traits", headers=AUTH)
    assert bad.status_code == 400 and "group_id" in bad.json()["error"]["message"]


def test_identifiers_are_url_decoded_normalised_and_bare_ids_work(client: TestClient, r: redis.Redis) -> None:
    apply(r, [{"type": "identify", "userId": "team/42", "messageId": "id-42", "timestamp": "2026-03-01T00:00:00Z",
               "traits": {"email": "Ada@Example.com", **{f"t{n:03d}": n for n in range(205)}}}])
    by_user = client.get(BASE + "/user_id:team%2F42/metadata", headers=AUTH)
    assert by_user.status_code == 200
    pid = by_user.json()["metadata"]["segment_id"]
    assert client.get(BASE + "/email:%20ADA@example.COM%20/metadata", headers=AUTH).json() == by_user.json()
    assert client.get(BASE + f"/{pid}/metadata", headers=AUTH).json() == by_user.json()
    full = client.get(BASE + f"/{pid}/traits", params={"limit": "200"}, headers=AUTH).json()
    assert len(full["traits"]) == 200 and full["cursor"]["has_more"] is True
    assert f"/profiles/{pid}/traits?limit=200&next=" in full["cursor"]["url"]
    rest = client.get(full["cursor"]["url"], headers=AUTH).json()
    assert len(rest["traits"]) == 206 - 200 and rest["cursor"]["has_more"] is False
    assert client.get(BASE + f"/{pid}/traits", params={"limit": "201"}, headers=AUTH).status_code == 400
    assert client.get(BASE + "/use_999999/traits", headers=AUTH).status_code == 404


def test_rate_limit_per_token_is_shared_by_web_processes(settings: Settings, redis_url: str, r: redis.Redis,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    limited = dataclasses.replace(settings, profile_api_rate_limit=5)
    apply(r, [{"type": "identify", "userId": "rl", "messageId": "rl-1"}])
    second = int(time.time())
    monkeypatch.setattr(profiles_api, "_second", lambda: second)  # every request below falls in one second
    with TestClient(create_app(limited, redis_url, "")) as one, TestClient(create_app(limited, redis_url, "")) as two:
        codes = [c.get(BASE + "/user_id:rl/traits", headers=AUTH).status_code for c in (one, two, one, two, one)]
        over = two.get(BASE + "/user_id:rl/traits", headers=AUTH)
        monkeypatch.setattr(profiles_api, "_second", lambda: second + 1)
        after = one.get(BASE + "/user_id:rl/traits", headers=AUTH)
    assert codes == [200] * 5
    assert over.status_code == 429 and over.headers["retry-after"] == "1"
    assert over.json()["error"]["code"] == "rate_limit_error"
    assert after.status_code == 200  # the next second has its own budget


def test_events_at_the_same_millisecond_page_without_gaps_or_repeats(client: TestClient, r: redis.Redis) -> None:
    at = int(time.time() * 1000) - DAY
    apply(r, [track("same", n, at) for n in range(25)] + [track("same", 100 + n, at + 1) for n in range(5)])
    for sort in ("desc", "asc"):
        for limit in ("7", "10"):
            got, params = [], {"limit": limit, "sort": sort}
            while True:
                body = client.get(BASE + "/user_id:same/events", params=params, headers=AUTH).json()
                got += [e["properties"]["n"] for e in body["data"]]
                if not body["cursor"]["has_more"]:
                    break
                params = {"limit": limit, "sort": sort, "next": body["cursor"]["next"]}
            assert sorted(got) == sorted([*range(25), *range(100, 105)]) and len(got) == 30, (sort, limit)
            assert set(got[:5] if sort == "desc" else got[-5:]) == set(range(100, 105))  # the later millisecond


def test_a_log_replay_after_a_merge_lists_each_event_once(client: TestClient, r: redis.Redis,
                                                          settings: Settings) -> None:
    from service.state.replay import Options, log_records, run

    now = int(time.time() * 1000)
    apply(r, [track(None, 1, now - 3 * DAY, "Signup Started", anon="anon-r"),
              track("ur", 2, now - 2 * DAY, "Order Completed"),
              {"type": "identify", "userId": "ur", "anonymousId": "anon-r", "messageId": "merge-r",
               "timestamp": iso_ms(now - DAY)}])
    run(r, settings, "default", log_records(r, "default"), Options(reapply=True), "replay")
    body = client.get(BASE + "/user_id:ur/events", headers=AUTH).json()
    assert [e["event"] for e in body["data"]] == ["Order Completed", "Signup Started"]


def test_a_page_stops_at_the_scan_limit_with_a_cursor(client: TestClient, r: redis.Redis,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A filter that matches nothing does not read the whole index in one request: the page comes back short,
    with has_more and a cursor that goes on from where the scan stopped."""
    monkeypatch.setattr(profiles_api, "MAX_EXAMINED", 40)
    now = int(time.time() * 1000)
    apply(r, [track("scan", n, now - DAY + n * 1000) for n in range(90)] +
          [track("scan", 999, now - 2 * DAY, "Rare Event")])
    pages, params = 0, {"limit": "1", "include": "Rare Event"}
    while True:
        pages += 1
        body = client.get(BASE + "/user_id:scan/events", params=params, headers=AUTH).json()
        if body["data"]:
            break
        assert body["cursor"]["has_more"] is True and pages < 10
        params = {**params, "next": body["cursor"]["next"]}
    assert pages == 3 and body["data"][0]["event"] == "Rare Event"  # 40 + 40 + the rest, then the rare one


def test_forget_erases_the_event_index_and_account_membership(client: TestClient, r: redis.Redis,
                                                              settings: Settings) -> None:
    from service.state.ops import forget

    now = int(time.time() * 1000)
    apply(r, [track(None, 1, now - 3 * DAY, anon="anon-f"), track("uf", 2, now - 2 * DAY),
              {"type": "group", "userId": "uf", "groupId": "acc-f", "messageId": "g-f1", "traits": {}},
              {"type": "identify", "userId": "uf", "anonymousId": "anon-f", "messageId": "merge-f",
               "timestamp": iso_ms(now - DAY)},
              {"type": "group", "userId": "other", "groupId": "acc-f", "messageId": "g-f2", "traits": {}}])
    links = "/v1/spaces/default/collections/accounts/profiles/group_id:acc-f/links"
    assert len(client.get(links, headers=AUTH).json()["data"]) == 2  # the merged visitor once, and the other user
    erased = find(r, "user_id", "uf")
    indexes = [state_keys(r, "default").events_index(p) for p in (erased.id, *erased.merged_from)]
    assert len(erased.merged_from) == 1 and r.exists(*indexes) == 2
    forget(r, settings, "default", "user_id:uf")
    assert r.exists(*indexes) == 0
    left = client.get(links, headers=AUTH).json()["data"]
    assert [ln["external_ids"][0]["id"] for ln in left] == [find(r, "user_id", "other").id]


def test_account_links_page_and_their_cursor_url_is_encoded(client: TestClient, r: redis.Redis) -> None:
    apply(r, [{"type": "group", "userId": f"m{n:02d}", "groupId": "acc/7 x", "messageId": f"gm{n}", "traits": {}}
              for n in range(25)])
    url, seen = "/v1/spaces/default/collections/accounts/profiles/group_id:acc%2F7%20x/links", []
    while url:
        body = client.get(url, headers=AUTH).json()
        seen += [ln["external_ids"][0]["id"] for ln in body["data"]]
        url = body["cursor"]["url"] if body["cursor"]["has_more"] else ""
        assert not url or "group_id:acc%2F7%20x/links?next=" in url
    assert len(seen) == len(set(seen)) == 25
    bad = client.get("/v1/spaces/default/collections/accounts/profiles/group_id:acc%2F7%20x/links?next=garbage",
                     headers=AUTH)
    assert bad.status_code == 400 and "not a cursor" in bad.json()["error"]["message"]  # as the users' routes


def test_a_log_replay_fills_the_indexes_of_data_from_before_them(client: TestClient, r: redis.Redis,
                                                                  settings: Settings) -> None:
    """Events and account links logged by a version without the indexes: `persona-sync replay` fills them."""
    from service.state.replay import Options, log_records, run

    now = int(time.time() * 1000)
    apply(r, [track("old", 1, now - DAY),
              {"type": "group", "userId": "old", "groupId": "acc-old", "messageId": "g-old", "traits": {"a": 1}}])
    for key in [*r.scan_iter(match="*ev:*"), *r.scan_iter(match="*au:*")]:
        r.delete(key)  # as an older version left them
    links = "/v1/spaces/default/collections/accounts/profiles/group_id:acc-old/links"
    assert client.get(links, headers=AUTH).json()["data"] == []
    run(r, settings, "default", log_records(r, "default"), Options(reapply=True), "replay")
    assert [e["event"] for e in client.get(BASE + "/user_id:old/events", headers=AUTH).json()["data"]] == [
        "Product Viewed"]
    assert len(client.get(links, headers=AUTH).json()["data"]) == 1


def test_an_api_without_its_token_set_says_it_is_off(settings: Settings, redis_url: str) -> None:
    """With PROFILE_API_TOKEN or ADMIN_TOKEN unset no credential can be right: the 401 says how to turn the API on,
    not to send the right token."""
    off = dataclasses.replace(settings, profile_api_token="", admin_token="")
    with TestClient(create_app(off, redis_url, "")) as c:
        read = c.get(BASE + "/user_id:u1/traits", headers=AUTH)
        assert read.status_code == 401 and "Profile API is off" in read.json()["error"]["message"]
        assert "PROFILE_API_TOKEN=" in read.json()["error"]["message"]
        admin = c.get("/admin/suppressions", headers={"Authorization": "Bearer admin"})
        assert admin.status_code == 401 and "admin API is off" in admin.json()["error"]["message"]
    with TestClient(create_app(settings, redis_url, "")) as c:  # set: the usual answer
        wrong = c.get(BASE + "/user_id:u1/traits", headers={"Authorization": "Basic " + base64.b64encode(
            b"nope:").decode()})
        assert wrong.status_code == 401 and "is off" not in wrong.json()["error"]["message"]
