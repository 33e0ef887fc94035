"""Real responses of the real app, on a real Redis, validated against the OpenAPI document (with openapi-core).

Every exchange of the test client is checked: the response against the documented responses of its operation (an
undocumented status fails too), and the request too when it succeeded, so that the documented parameters, bodies
and credentials are not stricter than the app. The walk goes on until every documented operation has answered.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import orjson
import pytest
import redis
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from starlette.testclient import TestClient

from service.config import Settings
from service.http.app import create_app
from service.http.auth import signed_part
from service.http.openapi import profiles
from service.http.openapi.document import document
from service.http.receiver import SHORT_NAMES, TRACKING_TYPES
from service.state.store import SyncStore
from tests.conftest import ADMIN_TOKEN, PROFILE_TOKEN, SECRET, WRITE_KEY
from tests.helpers import NOW
from tests.http.test_admin_replay import work
from tests.http.test_openapi import documented
from tests.spec.test_kpis import SEED_BODY
from workers.recompute import refresh

SPEC = OpenAPI.from_dict(document())
TEMPLATES = sorted(document()["paths"], key=lambda p: (p.count("{"), p))  # concrete paths first, as OpenAPI says
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PROFILE = {"Authorization": "Basic " + base64.b64encode(f"{PROFILE_TOKEN}:".encode()).decode()}
WRITE = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(),
         "Content-Type": "application/json"}
USERS = "/v1/spaces/default/collections/users/profiles"
RECENT = datetime.fromtimestamp(NOW / 1000 - 3600, UTC).isoformat()  # within the Profile API's /events window
PREFLIGHT = {"Origin": "https://shop.example.com", "Access-Control-Request-Method": "POST"}


def template_of(path: str) -> str | None:
    for template in TEMPLATES:
        if re.fullmatch(re.sub(r"\\{\w+\\}", "[^/]+", re.escape(template)), path):
            return template
    return None


class Checked:
    """Validates each exchange as it happens; remembers which documented operations answered, with what."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], set[int]] = {}

    def __call__(self, resp: httpx.Response) -> None:
        resp.read()
        req = resp.request
        req.read()  # a redirect's follow-up request is still a stream
        template = template_of(req.url.path)
        assert template is not None, f"{req.method} {req.url.path} is not documented"
        cookies = dict(c.strip().split("=", 1) for c in req.headers.get("cookie", "").split(";") if "=" in c)
        request = MockRequest("http://testserver", req.method, req.url.path, args=dict(req.url.params),
                              headers=dict(req.headers), cookies=cookies, data=req.content,
                              content_type=req.headers.get("content-type", ""))
        response = MockResponse(resp.content, resp.status_code, dict(resp.headers),
                                resp.headers.get("content-type", ""))
        SPEC.validate_response(request, response)
        if resp.is_success:
            SPEC.validate_request(request)
        self.seen.setdefault((template, req.method), set()).add(resp.status_code)


@pytest.fixture
def checked() -> Checked:
    return Checked()


@pytest.fixture
def api(settings: Settings, redis_url: str, checked: Checked, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The app with its job queue on the same Redis, as a web process runs it; every exchange checked."""
    monkeypatch.setenv("REDIS_URL", redis_url)  # what the worker's jobs read, as in production
    with TestClient(create_app(settings, redis_url, redis_url), raise_server_exceptions=False) as c:
        c.event_hooks = {"request": [], "response": [checked]}
        yield c


def signed(body: bytes) -> dict[str, str]:
    sig = hmac.new(SECRET.encode(), signed_part(body), hashlib.sha1).hexdigest()
    return {"X-Signature": sig, "Content-Type": "application/json"}


def identify(user: str, n: int, **traits: object) -> dict:
    return {"type": "identify", "userId": user, "messageId": f"{user}-{n}", "timestamp": RECENT,
            "traits": {"email": f"{user.capitalize()}@Example.com", "ltv": 1000 + n, "plan": "pro", **traits}}


def intake(api: TestClient) -> None:
    for n, method in enumerate(("POST", "PUT", "PATCH")):
        body = orjson.dumps(identify("ada", n))
        assert api.request(method, "/segment", content=body, headers=signed(body)).status_code == 200
        batch = orjson.dumps([identify(f"u{n}{i}", i) for i in range(3)])
        assert api.request(method, "/segment/default", content=batch, headers=signed(batch)).json()["accepted"] == 3
    body = orjson.dumps(identify("bob", 1))
    assert api.post("/segment", content=body, headers={"X-Signature": "0" * 40}).status_code == 401
    alone = orjson.dumps({"type": "identify", "messageId": "nobody"})
    assert api.post("/segment", content=alone, headers=signed(alone)).json()["error"]["code"] == "invalid_event"
    assert api.post("/segment", content=b"{", headers=signed(b"{")).status_code == 400
    assert api.post("/segment/a%20b", content=body, headers=signed(body)).status_code == 404


def tracking(api: TestClient) -> None:
    calls = {"identify": {"traits": {"plan": "team"}}, "track": {"event": "Order Completed",
                                                                 "properties": {"revenue": 25}},
             "page": {"name": "Home"}, "screen": {"name": "Cart"},
             "group": {"groupId": "acc-1", "traits": {"name": "Acme"}}, "alias": {"previousId": "anon-1"}}
    for n, kind in enumerate(TRACKING_TYPES):
        event = {"type": kind, "userId": "ada", "messageId": f"t-{kind}", "timestamp": RECENT,
                 **calls[kind]}
        resp = api.post(f"/v1/{kind}", content=orjson.dumps(event), headers=WRITE)
        assert resp.json()["success"] is True, resp.text
        assert api.options(f"/v1/{kind}", headers=PREFLIGHT).status_code == 204
        short = next(k for k, v in SHORT_NAMES.items() if v == kind)
        resp = api.post(f"/v1/{short}", content=orjson.dumps({**event, "messageId": f"s-{n}"}),
                        headers={**WRITE, "Content-Type": "text/plain"})
        assert resp.status_code == 200, resp.text
    batch = orjson.dumps({"batch": [{"type": "track", "userId": "ada", "event": "Viewed", "messageId": "b1"}]})
    for path in ("/v1/batch", "/v1/b", "/b"):
        assert api.post(path, content=batch, headers=WRITE).status_code == 200
        assert api.options(path, headers=PREFLIGHT).status_code == 204
    assert api.options("/v1/b", headers={**PREFLIGHT, "Access-Control-Request-Headers": "X-Evil"}).status_code == 403
    assert api.post("/v1/track", content=batch, headers={**WRITE, "Authorization": "Basic d3Jvbmc6"}).status_code \
        == 401
    assert api.get(f"/v1/projects/{WRITE_KEY}/settings").status_code == 200
    assert api.options(f"/v1/projects/{WRITE_KEY}/settings", headers={**PREFLIGHT, "Access-Control-Request-Method":
                                                                       "GET"}).status_code == 204
    assert api.get("/v1/projects/nope/settings").status_code == 404


def profile_api(api: TestClient) -> None:
    ada = f"{USERS}/email:ada%40example.com"
    assert api.get(f"{ada}/traits", headers=PROFILE).json()["traits"]["plan"] == "team"
    paged = api.get(f"{ada}/traits", params={"limit": "1", "verbose": "true"}, headers=PROFILE).json()
    assert paged["cursor"]["has_more"] and set(next(iter(paged["traits"].values()))) == {"value", "source_id",
                                                                                         "updated_at"}
    assert api.get(f"{ada}/traits", params={"include": "plan", "class": "audience"}, headers=PROFILE).json() \
        ["traits"] == {}
    ids = api.get(f"{ada}/external_ids", params={"include": "email"}, headers=PROFILE).json()["data"]
    assert [i["id"] for i in ids] == ["ada@example.com"]
    assert api.get(f"{ada}/metadata", headers=PROFILE).json()["metadata"]["segment_id"]
    assert api.get(f"{ada}/links", headers=PROFILE).json()["data"][0]["external_ids"][0]["id"] == "acc-1"
    calls = {"include": "identify,group", "sort": "asc", "limit": "1"}
    assert api.get(f"{ada}/events", params=calls, headers=PROFILE).json()["cursor"]["has_more"]
    assert api.get(f"{ada}/events", params={"start": "tomorrow"}, headers=PROFILE).status_code == 400
    account = "/v1/spaces/default/collections/accounts/profiles/group_id:acc-1"
    assert api.get(f"{account}/links", params={"limit": "5"}, headers=PROFILE).json()["data"][0]["to_collection"] \
        == "users"
    assert api.get(f"{account}/traits", headers=PROFILE).status_code == 200
    assert api.get(f"{account.replace('group_id:', 'user_id:')}/traits", headers=PROFILE).status_code == 400
    assert api.get(f"{ada}/traits").status_code == 401
    assert api.get(f"{USERS}/user_id:nobody/metadata", headers=PROFILE).status_code == 404
    assert api.get(f"{ada}/traits", params={"limit": "0"}, headers=PROFILE).status_code == 400


def operator(api: TestClient, r: redis.Redis) -> None:
    assert api.get("/admin/status", headers=ADMIN).json()["spaces"][0]["space"] == "default"
    assert api.get("/admin/status", params={"space": "default"}, headers=ADMIN).json()["problems"]
    assert api.get("/admin/status").status_code == 401
    letter = api.get("/admin/dead-letters", params={"limit": "1"}, headers=ADMIN).json()["data"][0]
    assert api.get(f"/admin/dead-letters/{letter['id']}", headers=ADMIN).json()["raw"]
    assert api.delete(f"/admin/dead-letters/{letter['id']}", headers=ADMIN).status_code == 200
    assert api.get(f"/admin/dead-letters/{letter['id']}", headers=ADMIN).status_code == 404
    assert api.get("/admin/dead-letters/x", headers=ADMIN).status_code == 400
    refusals = api.get("/admin/refusals", headers=ADMIN).json()
    assert refusals["total"] >= 1 and api.get("/admin/refusals", params={"limit": "0"}, headers=ADMIN).status_code \
        == 400
    assert api.post("/admin/forget", json={"id": "email:bob@example.com"}, headers=ADMIN).status_code == 404
    assert api.post("/admin/forget", json={"id": "user_id:u00"}, headers=ADMIN).json()["erased_profile"]
    assert api.post("/admin/forget", json={"nope": 1}, headers=ADMIN).status_code == 400
    assert api.get("/admin/suppressions", headers=ADMIN).json()["data"][0]["user_id"] == "u00"
    assert api.delete("/admin/suppressions/u00", headers=ADMIN).status_code == 200
    assert api.delete("/admin/suppressions/u00", headers=ADMIN).status_code == 404
    job = api.post("/admin/replay", json={"source": "log", "since": "400d", "types": ["identify"]}, headers=ADMIN)
    assert job.status_code == 202, job.text
    assert api.get(job.json()["follow"], headers=ADMIN).json()["status"] == "queued"
    work(r)
    assert api.get(job.json()["follow"], headers=ADMIN).json()["status"] == "finished"
    assert api.delete(job.json()["follow"], headers=ADMIN).json()["cancel"] == "nothing to cancel: the job is finished"
    assert api.get("/admin/jobs/no-such-job", headers=ADMIN).status_code == 404
    assert api.get("/admin/jobs/bad!", headers=ADMIN).status_code == 400
    assert api.post("/admin/replay", json={"source": "tape"}, headers=ADMIN).status_code == 400


def read_apis(api: TestClient, r: redis.Redis) -> None:
    refresh(r, Settings(), "default", now_ms=NOW)
    assert api.get("/api/clusters", headers=ADMIN).json()["clusters"]
    assert api.get("/api/personas", headers=ADMIN).status_code == 200
    assert api.get("/api/patterns", headers=ADMIN).status_code == 200
    assert api.get("/api/patterns", params={"space": "{x"}, headers=ADMIN).status_code == 400
    kpi = "/api/v1/segment_cluster_profiles"
    assert api.post(kpi, json=SEED_BODY, headers=ADMIN).json()["cluster_profiles"]
    assert api.post(kpi, json={"customers": []}, headers=ADMIN).status_code == 400
    assert api.post(kpi, json=SEED_BODY).status_code == 401


def operations(api: TestClient) -> None:
    assert api.get("/healthz").status_code == 200 and api.get("/readyz").status_code == 200
    assert b"segment_events" in api.get("/metrics").content
    assert api.get("/openapi.json").status_code == 200
    assert api.get("/docs").url.path == "/docs/"
    assert api.get("/docs/swagger-ui.css").status_code == 200
    assert api.get("/docs/index.html").status_code == 404


def console(api: TestClient, r: redis.Redis) -> None:
    """The console's pages and actions: HTML, redirects and form posts, as a browser sends them."""
    from rq import Queue

    from service.state.queue import QUEUE_NAME

    assert api.get("/console", follow_redirects=False).status_code == 303
    assert api.get("/console/login").status_code == 200
    assert api.post("/console/login", data={"token": "wrong"}).status_code == 401
    assert api.get("/console/static/console.css").status_code == 200
    assert api.post("/console/login", data={"token": ADMIN_TOKEN}).status_code == 200  # 303, then the overview
    assert api.get("/console/").status_code == 200
    csrf = re.search(r'name="csrf" value="([^"]+)"', api.get("/console/clusters").text)
    assert csrf is not None
    form = {"csrf": csrf.group(1)}
    assert api.get("/console/profiles", params={"id": "user_id:ada"}).status_code == 200
    assert api.get("/console/profiles", params={"id": "user_id:nobody"}).status_code == 404
    assert api.get("/console/operations", params={"since": "yesterday-ish"}).status_code == 400
    SyncStore(r, Settings()).dead_letters("default", [("broken", b'{"type":"x"}')], "webhook")
    letter = r.xrange("sps:{default}:dlq")[-1][0].decode()
    assert api.get(f"/console/operations/dead-letters/{letter}").status_code == 200
    assert api.post(f"/console/operations/dead-letters/{letter}/replay", data=form).status_code == 200
    assert api.post(f"/console/operations/dead-letters/{letter}/delete", data=form).status_code == 200
    assert api.post(f"/console/operations/dead-letters/{letter}/delete", data=form).status_code == 404
    Queue(QUEUE_NAME, connection=r).enqueue("no.such.function")
    work(r, PATH="/usr/bin:/bin")  # the job fails: something to requeue
    [failed] = Queue(QUEUE_NAME, connection=r).failed_job_registry.get_job_ids()
    assert api.post(f"/console/operations/jobs/{failed}/requeue", data=form).status_code == 200
    work(r)
    assert api.post("/console/operations/jobs/requeue", data=form).status_code == 200
    assert api.get("/console/operations").status_code == 200
    assert api.post("/console/operations/jobs/requeue", data={"csrf": "forged"}).status_code == 403
    assert api.post("/console/logout", data=form).status_code == 200  # 303, then the login page


def test_every_documented_operation_answers_as_documented(api: TestClient, r: redis.Redis,
                                                          checked: Checked) -> None:
    intake(api)
    tracking(api)
    profile_api(api)
    operator(api, r)
    read_apis(api, r)
    operations(api)
    console(api, r)
    assert set(documented()) - set(checked.seen) == set(), "add a request for these operations here"


IDENTS = {"users": "user_id:ada", "accounts": "group_id:acc-1"}  # a profile of each collection, made below


@pytest.mark.parametrize("collection,part", [(c, p) for c, parts in profiles.COLLECTIONS.items() for p in parts])
def test_each_documented_profile_part_answers_as_documented(api: TestClient, collection: str, part: str) -> None:
    events = [identify("ada", 0), {"type": "group", "userId": "ada", "groupId": "acc-1", "messageId": "g1",
                                   "timestamp": RECENT, "traits": {"name": "Acme"}}]
    events += [{"type": "track", "userId": "ada", "event": f"E{i}", "messageId": f"e{i}", "timestamp": RECENT}
               for i in range(3)]
    body = orjson.dumps(events)
    assert api.post("/segment", content=body, headers=signed(body)).json()["accepted"] == len(events)
    resp = api.get(f"/v1/spaces/default/collections/{collection}/profiles/{IDENTS[collection]}/{part}",
                   params={"limit": "2"} if part in ("traits", "external_ids", "events") else {}, headers=PROFILE)
    assert resp.status_code == 200, resp.text  # and its body validated by the api fixture's hook
    assert resp.json().get("data", True), "an empty page would validate whatever the items' shape"


def test_over_the_rate_limit_answers_as_documented(settings: Settings, redis_url: str, checked: Checked) -> None:
    with TestClient(create_app(settings.replace(profile_api_rate_limit=1), redis_url, "")) as c:
        c.event_hooks = {"request": [], "response": [checked]}
        answers = [c.get(f"{USERS}/user_id:nobody/traits", headers=PROFILE) for _ in range(3)]
    assert 429 in {a.status_code for a in answers} and all(a.headers.get("retry-after") for a in answers
                                                              if a.status_code == 429)
