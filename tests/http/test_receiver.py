"""The webhook route against a real Redis: signatures, fixtures, limits, dead letters, 503 when Redis is down."""

from __future__ import annotations

import hashlib
import hmac

import orjson
import pytest
import redis
from starlette.testclient import TestClient

from service.config import Settings
from service.http.app import create_app
from service.spec.keys import Keys
from service.state.ops import purge_forgotten
from tests.conftest import ADMIN_TOKEN, FIXTURES, SECRET, fixture_bytes, fixture_json

BOTH_BACKENDS = True  # each test runs on a standalone Redis and on a Redis Cluster (tests/conftest.py)


def sign(body: bytes, secret: str = SECRET) -> str:
    """As Segment signs a compact body: all of it, or for an Actions batch JSON.stringify(first element)."""
    part = orjson.dumps(orjson.loads(body)[0]) if body.startswith(b"[") else body
    return hmac.new(secret.encode(), part, hashlib.sha1).hexdigest()


def post(client: TestClient, body: bytes, path: str = "/segment", **headers: str):
    if "X-Signature" not in headers:
        headers["X-Signature"] = sign(body)
    return client.post(path, content=body, headers={"Content-Type": "application/json", **headers})


@pytest.mark.parametrize("name", sorted(fixture_json("signatures.json")["x_signature"]))
def test_every_signed_fixture_verifies_and_is_accepted(client: TestClient, name: str) -> None:
    body = fixture_bytes(name)
    signature = fixture_json("signatures.json")["x_signature"][name]
    resp = client.post("/segment", content=body, headers={"X-Signature": signature,
                                                         "User-Agent": "Segment.io/1.0"})
    assert resp.status_code == 200, resp.text
    n = len(orjson.loads(body)) if body.startswith(b"[") else 1
    assert resp.json()["accepted"] == n and resp.json()["rejected"] == 0


def test_every_json_fixture_is_accepted(client: TestClient, r: redis.Redis) -> None:
    for path in sorted(FIXTURES.glob("*.json")):
        if path.name == "signatures.json":
            continue
        doc = orjson.loads(path.read_bytes())
        if isinstance(doc, dict) and "batch" in doc:
            resp = client.post("/v1/batch", content=path.read_bytes(), auth=(doc["writeKey"], ""))
            n = len(doc["batch"])
        else:
            resp = post(client, orjson.dumps(doc))
            n = len(doc) if isinstance(doc, list) else 1
        assert resp.status_code == 200, (path.name, resp.text)
        body = resp.json()
        assert body["rejected"] == 0 and body["accepted"] + body["duplicate"] + body["suppressed"] == n, path.name
    assert r.xlen(Keys("default").dead_letters) == 0


def test_actions_batch_signature_covers_only_first_element(client: TestClient) -> None:
    body = fixture_bytes("actions_batch.body")
    tampered_tail = body.replace(b'"name":"Dashboard"', b'"name":"Dashbored"')
    first_sig = fixture_json("signatures.json")["x_signature"]["actions_batch.body"]
    assert post(client, tampered_tail, **{"X-Signature": first_sig}).status_code == 200
    tampered_head = body.replace(b'"Jane Doe"', b'"Jane Dough"')
    assert post(client, tampered_head, **{"X-Signature": first_sig}).status_code == 401


def test_wrong_or_missing_signature_is_401_and_only_its_metadata_kept(client: TestClient, r: redis.Redis) -> None:
    body = fixture_bytes("identify.body")
    resp = post(client, body, **{"X-Signature": sign(body, "other-secret")})
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "authentication_error"
    assert "nothing of this request was kept" in resp.json()["error"]["message"]
    assert client.post("/segment", content=body).status_code == 401
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert client.get("/admin/dead-letters", headers=admin).json()["total"] == 0
    refused = client.get("/admin/refusals", headers=admin).json()
    assert refused["total"] == 2 and [e["reason"] for e in refused["data"]] == ["X-Signature missing",
                                                                               "X-Signature does not match"]
    assert {e["bytes"] for e in refused["data"]} == {len(body)} and refused["data"][0]["status"] == 401
    assert r.exists(Keys("default").profile("use_1")) == 0


def test_rotation_accepts_any_configured_secret(settings, redis_url: str) -> None:
    body = fixture_bytes("identify.body")
    with TestClient(create_app(settings.replace(shared_secrets=("new", SECRET)), redis_url, "")) as c:
        assert post(c, body, **{"X-Signature": sign(body, "new")}).status_code == 200
        assert post(c, body, **{"X-Signature": sign(body, SECRET)}).json()["duplicate"] == 1


def test_unsigned_mode_accepts_without_header(settings, redis_url: str) -> None:
    with TestClient(create_app(settings.replace(shared_secrets=()), redis_url, "")) as c:
        assert c.post("/segment", content=fixture_bytes("identify.body")).status_code == 200


def test_malformed_json_is_400_with_reason_and_dead_lettered(client: TestClient, r: redis.Redis) -> None:
    resp = post(client, b'{"type": "identify", ')
    assert resp.status_code == 400
    assert "malformed JSON" in resp.json()["error"]["message"]
    assert r.xlen(Keys("default").dead_letters) == 1


def test_a_deleted_users_invalid_events_are_not_kept_as_dead_letters(client: TestClient, r: redis.Redis) -> None:
    """After a user's deletion and its purge, an invalid event of theirs stamped before it (a late retry, an old
    export) would stay in the dead letters for good, with their data: it is refused but not kept. One stamped
    after the deletion is a new person's (Segment's semantics) and is kept; so are other people's."""
    k = Keys("default")
    assert post(client, orjson.dumps({"type": "identify", "userId": "ada", "anonymousId": "ada-browser",
                                      "messageId": "a1", "timestamp": "2026-03-01T00:00:00Z"})).status_code == 200
    assert post(client, orjson.dumps({"type": "delete", "userId": "ada", "messageId": "a2",
                                      "timestamp": "2026-03-02T00:00:00Z"})).status_code == 200
    purge_forgotten(r, "default")
    before = r.xlen(k.dead_letters)
    invalid = {"type": "identity", "traits": {"email": "ada@example.com"}}  # a misspelt type
    late = [dict(invalid, userId="ada", messageId="late-1", timestamp="2026-03-01T12:00:00Z"),
            dict(invalid, anonymousId="ada-browser", messageId="late-2", timestamp="2026-03-01T12:00:00Z"),
            dict(invalid, userId="ada", messageId="late-3", timestamp="no time at all")]
    kept = [dict(invalid, userId="ada", messageId="new-1", timestamp="2026-03-05T00:00:00Z"),
            dict(invalid, userId="bob", messageId="bob-1", timestamp="2026-03-01T12:00:00Z")]
    for e in late + kept:
        resp = post(client, orjson.dumps(e))
        assert resp.status_code == 400, resp.text
    letters = [orjson.loads(f[b"raw"]) for _, f in r.xrange(k.dead_letters)][before:]
    assert [e["messageId"] for e in letters] == ["new-1", "bob-1"]
    assert r.get(k.dead_letter_bytes) is not None  # the byte sum counts only what was kept
    assert int(r.get(k.dead_letter_bytes)) == sum(
        sum(len(v) for key, v in f.items() if key != b"n") for _, f in r.xrange(k.dead_letters))


def test_oversize_body_is_413(settings, redis_url: str) -> None:
    with TestClient(create_app(settings.replace(max_body_bytes=2048, shared_secrets=()), redis_url, "")) as c:
        resp = c.post("/segment", content=b"[" + b" " * 5000 + b"]")
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"


def test_batch_with_invalid_events_keeps_the_good_ones(client: TestClient, r: redis.Redis) -> None:
    good = fixture_json("actions_batch.json")
    bad = [
        {"type": "track", "event": "x", "messageId": "no-ids"},
        {"type": "track", "event": "x", "userId": "u1", "messageId": "m" * 101},
        {"type": "teleport", "userId": "u1", "messageId": "bad-type"},
        {"type": "track", "event": "x", "userId": "u1", "messageId": "bad-ts", "timestamp": "yesterday"},
        "not an object",
    ]
    body = orjson.dumps(good + bad)
    resp = post(client, body)
    assert resp.status_code == 200
    out = resp.json()
    assert (out["accepted"], out["rejected"], out["duplicate"]) == (3, 5, 0)
    assert [e["index"] for e in out["errors"]] == [3, 4, 5, 6, 7]
    reasons = " ".join(e["message"] for e in out["errors"])
    for word in ("userId nor anonymousId", "at most 100", "unknown type", "ISO-8601", "not a JSON object"):
        assert word in reasons
    entries = r.xrange(Keys("default").dead_letters)
    assert len(entries) == 5
    kept = orjson.loads(entries[0][1][b"raw"])
    assert kept.pop("receivedAt").endswith("Z")  # the receipt time, so a replay orders it as it would have live
    assert kept == bad[0]
    again = post(client, body).json()
    assert (again["accepted"], again["duplicate"], again["rejected"]) == (0, 3, 5)


def test_a_space_whose_every_event_was_refused_is_listed_with_its_dead_letters(client: TestClient,
                                                                               r: redis.Redis) -> None:
    """A new source that sends nothing valid (a wrong format) fills its dead letters: the space is listed where an
    operator looks (status, the console), not only once an event applies."""
    from service.state.status import spaces

    resp = post(client, orjson.dumps({"type": "track", "event": "x", "messageId": "m1"}), "/segment/new-source")
    assert resp.status_code == 400 and r.xlen(Keys("new-source").dead_letters) == 1
    assert "new-source" in spaces(r)


def test_single_invalid_event_is_400(client: TestClient) -> None:
    resp = post(client, orjson.dumps({"type": "track", "event": "x", "messageId": "m1"}))
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_event"


def test_space_route_keeps_spaces_apart(client: TestClient, r: redis.Redis) -> None:
    body = fixture_bytes("identify.body")
    assert post(client, body, "/segment/spa_other").json()["accepted"] == 1
    assert r.exists(Keys("spa_other").ident("user_id", "usr_001")) == 1
    assert r.exists(Keys("default").ident("user_id", "usr_001")) == 0
    assert post(client, body, "/segment/bad%7Bspace").status_code == 404
    # dots alone would name the archive's own folder or its parent
    assert post(client, body, "/segment/...").status_code == 404
    from service.config import valid_space
    assert not valid_space(".") and not valid_space("..") and valid_space("a.b") and valid_space(".hidden")


def test_redis_down_is_503_and_nothing_applied(settings, redis_url: str, r: redis.Redis) -> None:
    with TestClient(create_app(settings, "redis://127.0.0.1:1/0", ""), raise_server_exceptions=False) as c:
        resp = post(c, fixture_bytes("identify.body"))
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "5"
        assert c.get("/readyz").status_code == 503
        assert c.get("/healthz").status_code == 200
        # a signed body that cannot be applied is kept as a dead letter: with nowhere to keep it, Segment must retry
        # (a 400 would be final, and the body lost)
        for bad in (b"nojson", b'{"type": "identify"}'):
            refused = post(c, bad)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "5", refused.text
        open_mode = create_app(Settings(), "redis://127.0.0.1:1/0", "")
        with TestClient(open_mode, raise_server_exceptions=False) as t:
            assert t.post("/v1/batch", content=b"{not json").status_code == 503
    assert r.dbsize() == 0


def test_metrics_count_events_by_type_and_outcome(client: TestClient) -> None:
    post(client, fixture_bytes("identify.body"))
    post(client, fixture_bytes("identify.body"))
    text = client.get("/metrics").text
    assert 'segment_events_total{outcome="ok",type="identify"}' in text
    assert 'segment_events_total{outcome="duplicate",type="identify"}' in text
    assert "http_request_duration_seconds_bucket" in text


def test_metrics_labels_stay_bounded_whatever_type_a_sender_writes(client: TestClient) -> None:
    """A rejected event's type is a label: a type that is not Segment's counts as "unknown", so a sender cannot
    make a new series (and a cached child) per string it invents."""
    def unknown() -> float:  # the registry is the process's: count what this test adds
        line = 'segment_events_total{outcome="rejected",type="unknown"} '
        text = client.get("/metrics").text
        return next((float(x[len(line):]) for x in text.splitlines() if x.startswith(line)), 0.0)

    before = unknown()
    body = orjson.dumps([{"type": f"made-up-{n}", "userId": "u", "messageId": f"mu-{n}"} for n in range(5)]
                        + [{"type": "TRACK", "userId": "u", "messageId": "mu-t", "event": "x"}])
    assert post(client, body).json()["rejected"] == 5
    assert unknown() == before + 5
    text = client.get("/metrics").text
    assert "made-up" not in text and 'segment_events_total{outcome="ok",type="track"}' in text


def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    assert client.get("/nope").json()["error"]["code"] == "not_found"
    assert client.get("/segment").status_code == 405


def test_dead_letters_can_be_replayed_after_the_cause_is_fixed(client: TestClient, r: redis.Redis) -> None:
    from service.config import Settings
    from service.state.ops import replay_dead_letters
    from tests.helpers import find

    body = fixture_bytes("identify.body")
    assert post(client, body, **{"X-Signature": sign(body, "rotated-away")}).status_code == 401  # not stored
    post(client, orjson.dumps([{"type": "track", "event": "x", "userId": "u1", "messageId": "ok-1"},
                               {"type": "teleport", "userId": "u1", "messageId": "bad"}]))
    # what an older version stored for a body that failed the signature check: never applied
    r.xadd(Keys("default").dead_letters, {"reason": "X-Signature does not match", "source": "webhook-unsigned",
                                          "at": 1, "raw": body})
    # a signed event that a bug refused, fixed since
    r.xadd(Keys("default").dead_letters, {"reason": "store error", "source": "webhook", "at": 1, "raw": body})
    assert r.xlen(Keys("default").dead_letters) == 3
    counts = replay_dead_letters(r, Settings(), "default")
    assert counts == {"entries": 3, "replayed": 1, "kept": 1, "events_applied": 1, "unauthenticated": 1}
    assert find(r, "user_id", "usr_001") is not None
    assert r.xlen(Keys("default").dead_letters) == 2


def test_an_unhandled_error_is_logged_with_its_route_not_the_identifier_in_its_path(caplog) -> None:
    """A Profile API path holds an identifier (an email): a 500's log line names the route's template instead."""
    import logging

    from starlette.applications import Starlette
    from starlette.routing import Route

    from service.http.app import unexpected

    async def broken(request):
        raise RuntimeError("boom")

    app = Starlette(routes=[Route("/v1/spaces/{space}/collections/users/profiles/{id}/metadata", broken)],
                    exception_handlers={Exception: unexpected})
    caplog.set_level(logging.ERROR)
    with TestClient(app, raise_server_exceptions=False) as c:
        resp = c.get("/v1/spaces/default/collections/users/profiles/email:ada@example.com/metadata")
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "internal_error"
    [line] = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert line.fields == {"route": "/v1/spaces/{space}/collections/users/profiles/{id}/metadata",
                           "error": "RuntimeError"}
    assert not any("ada@example.com" in r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records)


def test_an_unhandled_error_ends_in_the_app_so_the_server_logs_no_traceback(settings: Settings, redis_url: str,
                                                                             caplog) -> None:
    """The app answers a 500 and logs its route and type; the error is not raised again for the server, whose log
    line would carry the traceback and the exception's message (here, an email from the request)."""
    import logging

    async def broken(request):
        raise ValueError(f"cannot read {request.query_params['who']}")

    app = create_app(settings, redis_url, "")
    app.add_route("/broken", broken)
    caplog.set_level(logging.DEBUG)
    with TestClient(app, raise_server_exceptions=True) as c:  # an error reaching the server would raise here
        resp = c.get("/broken?who=ada@example.com")
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "internal_error"
    [line] = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert line.fields == {"route": "/broken", "error": "ValueError"}
    served = [r for r in caplog.records if r.name != "httpx"]  # the test's client logs the URL it asked for
    assert not any("ada@example.com" in r.getMessage() + str(r.exc_info or "") for r in served)


def test_an_event_the_store_fails_on_is_named_in_the_answer_and_kept_for_replay(client: TestClient,
                                                                                r: redis.Redis) -> None:
    """Not the sender's fault, so no 4xx: the answer names the event the store did not apply (by index, as a
    rejected one), and it is kept as a dead letter to replay once the cause is fixed; the others apply."""
    from tests.helpers import apply

    [first] = apply(r, [{"type": "page", "anonymousId": "broken", "messageId": "b0"}])
    key = Keys("default").profile(first.profile_id)
    r.delete(key)
    r.set(key, "not a hash")  # the profile is damaged: its next event fails in the apply script
    batch = [{"type": "page", "anonymousId": "fine", "messageId": "f1"},
             {"type": "page", "anonymousId": "broken", "messageId": "b1"}]
    resp = post(client, orjson.dumps(batch))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["accepted"], body["rejected"]) == (1, 1)
    assert [e["index"] for e in body["errors"]] == [1] and "dead letter" in body["errors"][0]["message"]
    assert r.xlen(Keys("default").dead_letters) == 1


def test_an_event_too_deep_in_a_batch_is_kept_whole_as_its_dead_letter(client: TestClient, r: redis.Redis) -> None:
    """Deeper than the log's JSON writer goes, an event of an Actions batch is refused alone, and its dead letter
    keeps it (it was kept empty: nothing to look at or replay once fixed)."""
    deep = b'{"d":' * 400 + b'{"leaf":1}' + b"}" * 400
    batch = (b'[{"type":"track","event":"ok","userId":"u1","messageId":"fine"},'
             b'{"type":"track","event":"deep","userId":"u2","messageId":"deep","properties":' + deep + b"}]")
    body = post(client, batch).json()
    assert (body["accepted"], body["rejected"]) == (1, 1) and "nested" in body["errors"][0]["message"]
    [(_, letter)] = r.xrange(Keys("default").dead_letters)
    kept = letter[b"raw"]
    assert kept and kept.count(b'{"d":') == 400 and b'"messageId":"deep"' in kept


def test_an_event_too_deep_for_any_json_writer_keeps_its_text_as_its_dead_letter(client: TestClient,
                                                                                   r: redis.Redis) -> None:
    """Between Python's recursion limit and the parser's 1,024 levels, an event is decoded but neither JSON writer
    can write it out again: its dead letter was kept empty. It keeps the text it was sent as, from an Actions batch,
    a Tracking API batch (its write key blanked) and a single Tracking API call alike."""
    from tests.conftest import WRITE_KEY

    def deep(mid: str) -> bytes:
        return (b'{"type":"track","event":"x","userId":"u","messageId":"' + mid.encode() + b'","writeKey":"'
                + WRITE_KEY.encode() + b'","properties":' + b'{"a":' * 1000 + b"1" + b"}" * 1000 + b"}")

    ok = b'{"type":"track","event":"ok","userId":"u","messageId":"ok"}'
    actions = post(client, b"[" + ok + b"," + deep("in-actions") + b"]", **{"X-Signature": sign(ok)})
    tracking = client.post("/v1/batch", content=b'{"batch":[' + deep("in-batch") + b"]}", auth=(WRITE_KEY, ""))
    single = client.post("/v1/track", content=deep("single"), auth=(WRITE_KEY, ""))
    assert [x.status_code for x in (actions, tracking, single)] == [200, 200, 400]  # a single event: refused
    assert [x.json()["rejected"] for x in (actions, tracking, single)] == [1, 1, 1]
    kept = [f[b"raw"] for _, f in r.xrange(Keys("default").dead_letters)]
    assert [k.count(b'{"a":') for k in kept] == [1000, 1000, 1000]
    for mid, k in zip(("in-actions", "in-batch", "single"), kept, strict=True):
        assert b'"messageId":"%s"' % mid.encode() in k
    assert WRITE_KEY.encode() in kept[0]  # an Actions event is kept as Segment sent it
    assert not any(WRITE_KEY.encode() in k for k in kept[1:])  # a browser's write key is a credential


def test_an_event_deeper_than_the_parser_goes_sinks_only_itself_in_a_tracking_batch(client: TestClient,
                                                                                     r: redis.Redis) -> None:
    """Past 1,024 levels the parser refused the whole Tracking API batch, and with the write key only in the body
    (as mobile SDKs send it) nothing of it was kept. It is split as an Actions batch is: the other events apply."""
    from tests.conftest import WRITE_KEY

    deep = b'{"type":"track","event":"x","userId":"d","properties":' + b'{"d":' * 1100 + b"1" + b"}" * 1100 + b"}"
    good = [orjson.dumps({"type": "track", "event": "ok", "userId": f"u{i}", "messageId": f"ok-{i}"})
            for i in range(2)]
    body = (b'{"writeKey":"' + WRITE_KEY.encode() + b'","context":{"library":{"name":"analytics-ios"}},"batch":['
            + b",".join([good[0], deep, good[1]]) + b"]}")
    resp = client.post("/v1/batch", content=body)
    assert resp.status_code == 200, resp.text
    assert (resp.json()["accepted"], resp.json()["rejected"]) == (2, 1) and resp.json()["errors"][0]["index"] == 1
    [(_, letter)] = r.xrange(Keys("default").dead_letters)
    assert letter[b"raw"].count(b'{"d":') == 1100
    logged = [orjson.loads(f[b"e"]) for _, f in r.xrange(Keys("default").log)]
    assert [e["context"]["library"]["name"] for e in logged] == ["analytics-ios"] * 2  # the shared context
    # the split scans the body in Python: not for a body that names no key of ours (a 547-byte gzip of
    # 160,000 elements had cost 0.3 s before its 401), nor past 2,500 events for one that does
    stranger = body.replace(WRITE_KEY.encode(), b"not-ours")
    refused = client.post("/v1/batch", content=stranger)
    assert refused.status_code == 400 and "depth limit" in refused.json()["error"]["message"]
    assert "nothing of this request was kept" in refused.json()["error"]["message"]
    bare = b'[{"writeKey":"' + WRITE_KEY.encode() + b'"},' + deep + b"]"  # never a Tracking API body: not split
    resp = client.post("/v1/batch", content=bare)
    assert resp.status_code == 400 and "depth limit" in resp.json()["error"]["message"]
    many = (b'{"writeKey":"' + WRITE_KEY.encode() + b'","batch":[' + b"{}," * 2500 + deep + b"]}")
    assert client.post("/v1/batch", content=many).status_code == 400
    assert r.xlen(Keys("default").dead_letters) == 1 and r.xlen(Keys("default").log) == 2


def test_an_event_deeper_than_the_parser_goes_sinks_only_itself_not_its_batch(client: TestClient,
                                                                              r: redis.Redis) -> None:
    """Past 1,024 levels the JSON parser refuses the whole body: the batch is parsed element by element instead,
    and only that event is refused (kept as sent), the others apply."""
    deep = b'{"d":' * 1100 + b"1" + b"}" * 1100
    good = [orjson.dumps({"type": "track", "event": "ok", "userId": f"u{i}", "messageId": f"ok-{i}"})
            for i in range(3)]
    batch = b"[" + b",".join([good[0], b'{"type":"track","event":"x","userId":"d","properties":' + deep + b"}",
                              *good[1:]]) + b"]"
    resp = post(client, batch, **{"X-Signature": sign(good[0])})  # Actions signs the first element's text
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["accepted"], body["rejected"]) == (3, 1) and body["errors"][0]["index"] == 1
    [(_, letter)] = r.xrange(Keys("default").dead_letters)
    assert letter[b"raw"].count(b'{"d":') == 1100
    broken = post(client, b"[" + good[0] + b"," + deep + b",]", **{"X-Signature": sign(good[0])})
    assert broken.status_code == 400  # not an array of elements: refused whole
