"""Segment fidelity, against a real Redis: which calls write traits and identifiers, events without a messageId,
how a call's channel is read, event time and clock skew, deletion, and odd bodies — each as Segment and Unify
document it."""

from __future__ import annotations

import hashlib
import hmac
import time

import orjson
import redis
from starlette.testclient import TestClient

from service.spec.clock import now_ms
from service.spec.events import iso_ms, parse_timestamp
from service.spec.keys import Keys
from tests.conftest import SECRET, WRITE_KEY
from tests.helpers import apply, find
from tests.http.test_receiver import post, sign

T = "2026-03-01T10:00:00Z"


def test_only_identify_writes_user_traits(r: redis.Redis) -> None:
    """context.traits on track, page, screen, group and alias feed identity resolution (their email) but do not
    change the profile's traits; a group's traits belong to its account."""
    apply(r, [
        {"type": "identify", "userId": "u1", "messageId": "m1", "timestamp": T, "traits": {"plan": "pro"}},
        *[{"type": kind, "userId": "u1", "messageId": f"c-{kind}", "timestamp": "2026-03-01T11:00:00Z",
           "event": "Clicked", "groupId": "g1", "previousId": "u0",
           "context": {"traits": {"plan": "free", "email": "u1@example.com"}}, "traits": {"industry": "SaaS"}}
          for kind in ("track", "page", "screen", "group")],
    ])
    p = find(r, "user_id", "u1")
    assert p is not None and p.trait_values() == {"plan": "pro"}
    assert find(r, "email", "u1@example.com").id == p.id  # context.traits.email still identifies


def test_email_identifiers_never_come_from_properties(r: redis.Redis) -> None:
    apply(r, [{"type": "track", "userId": "inviter", "messageId": "m1", "timestamp": T, "event": "Invite Sent",
               "properties": {"email": "friend@example.com"}}])
    assert find(r, "email", "friend@example.com") is None  # the friend's email is not the inviter's
    assert find(r, "user_id", "inviter") is not None


def test_identical_events_without_a_message_id_are_two_events(client: TestClient, r: redis.Redis) -> None:
    body = orjson.dumps({"type": "track", "userId": "u1", "event": "Email Opened", "timestamp": T})
    answers = [post(client, body).json() for _ in range(2)]
    assert [a["accepted"] for a in answers] == [1, 1]
    logged = [orjson.loads(fields[b"e"]) for _, fields in r.xrange(Keys("default").log)]
    ids = [e["messageId"] for e in logged]
    assert len(ids) == 2 and ids[0] != ids[1] and all(i.startswith("gen-") for i in ids)  # the log keeps the ids


def test_channel_is_read_from_device_and_os_before_the_library(r: redis.Redis) -> None:
    """A macOS app built on analytics-swift is web; an iPhone app is mobile whatever its library."""
    apply(r, [
        {"type": "track", "userId": "mac", "messageId": "m1", "timestamp": T, "event": "Opened",
         "context": {"library": {"name": "analytics-swift"}, "os": {"name": "macOS"}}},
        {"type": "track", "userId": "phone", "messageId": "m2", "timestamp": T, "event": "Opened",
         "context": {"library": {"name": "analytics.js"}, "device": {"type": "ios"}}},
    ])
    assert set(find(r, "user_id", "mac").activity) == {"web"}
    assert set(find(r, "user_id", "phone").activity) == {"mobile"}


def test_a_trait_set_to_null_is_removed_and_an_older_value_does_not_bring_it_back(r: redis.Redis) -> None:
    def identify(mid: str, ts: str, plan: object) -> dict:
        return {"type": "identify", "userId": "u1", "messageId": mid, "timestamp": ts,
                "traits": {"plan": plan, "industry": "SaaS"}}

    apply(r, [identify("m1", "2026-03-01T10:00:00Z", "pro"), identify("m2", "2026-03-01T11:00:00Z", None)])
    assert find(r, "user_id", "u1").trait_values() == {"industry": "SaaS"}
    apply(r, [identify("m0", "2026-03-01T09:00:00Z", "free")])  # older, delivered late
    assert find(r, "user_id", "u1").trait_values() == {"industry": "SaaS"}
    apply(r, [identify("m3", "2026-03-01T12:00:00Z", "team")])  # newer: the trait is back
    assert find(r, "user_id", "u1").trait_values() == {"industry": "SaaS", "plan": "team"}


def order(mid: str, ts: str, key: str, event: str = "Order Completed", revenue: float = 40.0) -> dict:
    return {"type": "track", "userId": "buyer", "messageId": mid, "timestamp": ts, "event": event,
            "properties": {"order_id": key, "revenue": revenue, "products": [{"category": "books"}]}}


def test_refunded_and_cancelled_orders_leave_spend_counts_and_categories(r: redis.Redis) -> None:
    apply(r, [order("m1", "2026-03-01T10:00:00Z", "o1"), order("m2", "2026-03-01T10:00:00Z", "o2", revenue=60),
              order("m3", "2026-03-02T10:00:00Z", "o1", "Order Refunded")])
    assert [(o.key, o.revenue) for o in find(r, "user_id", "buyer").orders] == [("o2", 60.0)]
    # a cancellation that arrives before its order: the order never counts
    apply(r, [order("m4", "2026-03-03T10:00:00Z", "o3", "Order Cancelled"),
              order("m5", "2026-03-01T12:00:00Z", "o3", revenue=99)])
    assert [o.key for o in find(r, "user_id", "buyer").orders] == ["o2"]


def test_any_order_of_events_with_refunds_and_nulls_gives_the_same_profiles(r: redis.Redis) -> None:
    """The order-independence guarantee, with the rules above: refunds and cancellations before or after their
    orders, traits set to null before or after other values, timestamps in the future, same-millisecond writes."""
    import random

    from tests.helpers import mixed_stream, snapshot

    events = mixed_stream(4000, users=60, seed=9)
    orders = [e for e in events if e.get("event") == "Order Completed"]
    rnd = random.Random(4)
    for i, o in enumerate(rnd.sample(orders, len(orders) // 3)):
        events.append(dict(o, messageId=f"rev-{i}", event=rnd.choice(["Order Refunded", "Order Cancelled"]),
                           timestamp=rnd.choice([o["timestamp"], "2026-01-01T00:00:00Z"])))
    identifies = [e for e in events if e["type"] == "identify" and "plan" in e.get("traits", {})]
    for i, e in enumerate(rnd.sample(identifies, len(identifies) // 4)):
        events.append(dict(e, messageId=f"null-{i}", traits={"plan": None}))
    # clocks in the future (taking effect at their receipt), and writes in the same millisecond as another
    for i, e in enumerate(rnd.sample(identifies, len(identifies) // 5)):
        events.append(dict(e, messageId=f"future-{i}", timestamp="2099-01-01T00:00:00Z", receivedAt=e["timestamp"],
                           traits={"plan": f"future-{i}"}))
    for i, e in enumerate(rnd.sample(identifies, len(identifies) // 5)):
        events.append(dict(e, messageId=f"tie-{i}", receivedAt=iso_ms(ms(e["timestamp"]) + rnd.choice([0, 5])),
                           traits={"plan": rnd.choice(["tie-a", "tie-z"])}))
    apply(r, events)
    in_order = snapshot(r)
    assert sum(len(p["orders"]) for p in in_order.values()) < len(orders)  # some orders really were taken back
    for seed in (1, 2):
        r.flushall()
        shuffled = list(events)
        random.Random(seed).shuffle(shuffled)
        apply(r, shuffled)
        assert snapshot(r) == in_order


# --- event time -------------------------------------------------------------------------------------------------

def logged(r: redis.Redis) -> list[dict]:
    return [orjson.loads(fields[b"e"]) for _, fields in r.xrange(Keys("default").log)]


def ms(iso: str) -> int:
    return parse_timestamp(iso)


def test_tracking_api_corrects_client_clock_skew_with_the_batch_sent_at(client: TestClient, r: redis.Redis) -> None:
    """A device whose clock runs 3 hours fast: timestamp = receivedAt - (sentAt - originalTimestamp), with the
    batch's sentAt for every event and an event's own sentAt where it has one."""
    skew = 3 * 3_600_000
    now = now_ms()
    device = iso_ms(now + skew)
    happened = iso_ms(now + skew - 60_000)  # a minute before sending, on the device's clock
    body = {"writeKey": WRITE_KEY, "sentAt": device, "batch": [
        {"type": "identify", "userId": "skewed", "messageId": "s1", "timestamp": happened, "traits": {"plan": "pro"}},
        {"type": "track", "userId": "skewed", "messageId": "s2", "event": "Clicked",
         "originalTimestamp": happened, "sentAt": iso_ms(now + skew + 30_000)},  # its own sentAt wins
        # timestamp set explicitly beside originalTimestamp (a historical import): kept as sent
        {"type": "track", "userId": "skewed", "messageId": "s3", "event": "Imported",
         "timestamp": "2025-01-01T00:00:00.000Z", "originalTimestamp": "2025-01-01T00:00:00.000Z"},
        # and a client's own receivedAt is never believed
        {"type": "track", "userId": "skewed", "messageId": "s4", "event": "Forged", "timestamp": happened,
         "receivedAt": "2099-01-01T00:00:00.000Z"},
    ]}
    resp = client.post("/v1/batch", content=orjson.dumps(body))
    done = now_ms()
    assert resp.status_code == 200 and resp.json()["accepted"] == 4
    events = {e["messageId"]: e for e in logged(r)}
    for mid, before in (("s1", 60_000), ("s2", 90_000), ("s4", 60_000)):
        e = events[mid]
        received = ms(e["receivedAt"])
        assert now <= received <= done
        assert ms(e["timestamp"]) == received - before  # on our clock, when it happened
        assert e["originalTimestamp"] == happened  # the device's own time stays in the log
    assert events["s3"]["timestamp"] == "2025-01-01T00:00:00.000Z"
    trait = find(r, "user_id", "skewed").traits["plan"]
    assert trait.ts == ms(events["s1"]["timestamp"])  # not 3 hours ahead


def test_a_sent_at_far_ahead_keeps_the_events_own_time(client: TestClient, r: redis.Redis) -> None:
    """A sentAt decades ahead of the event's own time would correct it to before 1970, a time the client never
    sent: the event is applied at its own time instead, not refused."""
    happened = iso_ms(now_ms() - 5_000)
    body = {"writeKey": WRITE_KEY, "sentAt": "2099-01-01T00:00:00.000Z", "batch": [
        {"type": "track", "userId": "broken-clock", "messageId": "bc1", "event": "Clicked", "timestamp": happened}]}
    resp = client.post("/v1/batch", content=orjson.dumps(body))
    assert resp.status_code == 200 and resp.json()["accepted"] == 1, resp.text
    [event] = [e for e in logged(r) if e["messageId"] == "bc1"]
    assert event["timestamp"] == happened


def test_a_tracking_api_event_without_a_time_is_stamped_with_its_receipt(client: TestClient, r: redis.Redis) -> None:
    """Segment's Tracking API defaults ``timestamp`` to the time it received the call: the log, and so the Profile
    API's ``/events``, show that time, not null."""
    for path, body in (("/v1/track", {"writeKey": WRITE_KEY, "userId": "no-clock", "messageId": "nc1", "event": "X"}),
                       ("/v1/batch", {"writeKey": WRITE_KEY, "sentAt": iso_ms(now_ms()), "batch": [
                           {"type": "track", "userId": "no-clock", "messageId": "nc2", "event": "Y"}]})):
        resp = client.post(path, content=orjson.dumps(body))
        assert resp.status_code == 200 and resp.json()["accepted"] == 1, resp.text
    events = {e["messageId"]: e for e in logged(r)}
    for mid in ("nc1", "nc2"):
        assert events[mid]["timestamp"] == events[mid]["receivedAt"]
        assert "originalTimestamp" not in events[mid]  # the client sent no time of its own


def test_a_future_timestamp_does_not_pin_a_trait(client: TestClient, r: redis.Redis) -> None:
    """An identify stamped 2099, then one stamped now with another value: the newer one is on the profile. The
    2099 write takes effect at its receipt; the log keeps its own timestamp."""
    future = {"type": "identify", "userId": "clock", "messageId": "f1", "timestamp": "2099-01-01T00:00:00.000Z",
              "traits": {"plan": "from-2099"}}
    assert post(client, orjson.dumps(future)).status_code == 200
    time.sleep(0.005)
    current = {"type": "identify", "userId": "clock", "messageId": "f2", "timestamp": iso_ms(now_ms()),
               "traits": {"plan": "current"}}
    assert post(client, orjson.dumps(current)).status_code == 200
    p = find(r, "user_id", "clock")
    assert p.trait_values() == {"plan": "current"}
    assert p.last_seen < ms("2030-01-01T00:00:00Z")  # last seen is not 2099 either
    assert [e["timestamp"] for e in logged(r)] == ["2099-01-01T00:00:00.000Z", current["timestamp"]]


def test_audience_exit_after_a_future_entry_takes_effect(r: redis.Redis) -> None:
    def audience(mid: str, event: str, ts: str, received: str) -> dict:
        return {"type": "track", "userId": "aud", "messageId": mid, "event": event, "timestamp": ts,
                "receivedAt": received, "properties": {"audience_key": "vip", "vip": event == "Audience Entered"}}

    apply(r, [audience("a1", "Audience Entered", "2099-01-01T00:00:00Z", "2026-03-01T10:00:00Z"),
              audience("a2", "Audience Exited", "2026-03-01T11:00:00Z", "2026-03-01T11:00:00Z")])
    assert find(r, "user_id", "aud").trait_values() == {"vip": False}


def test_same_millisecond_writes_resolve_by_receipt_in_any_order(r: redis.Redis) -> None:
    """Ties go to the later receipt (Segment's receivedAt, or ours written into the logged event), so every
    delivery or replay order agrees; at the same receipt too, the greater JSON value wins."""
    def identify(mid: str, plan: str, received: str) -> dict:
        return {"type": "identify", "userId": "tie", "messageId": mid, "timestamp": "2026-03-01T10:00:00.000Z",
                "receivedAt": received, "traits": {"plan": plan}}

    first = identify("t1", "zeta", "2026-03-01T10:00:01.000Z")
    second = identify("t2", "alpha", "2026-03-01T10:00:02.000Z")
    for events in ([first, second], [second, first]):
        r.flushall()
        apply(r, events)
        assert find(r, "user_id", "tie").trait_values() == {"plan": "alpha"}
    same = identify("t3", "beta", "2026-03-01T10:00:02.000Z")
    for events in ([second, same], [same, second]):
        r.flushall()
        apply(r, events)
        assert find(r, "user_id", "tie").trait_values() == {"plan": "beta"}


def test_same_millisecond_tracking_api_writes_go_to_the_later_request(client: TestClient, r: redis.Redis) -> None:
    """Through the Tracking API the receipt is ours: the later request wins, and a replay of the logged events,
    in either order, agrees."""
    stamp = iso_ms(now_ms() - 1000)
    for mid, plan in (("q1", "zeta"), ("q2", "alpha")):
        body = {"writeKey": WRITE_KEY, "type": "identify", "userId": "req", "messageId": mid, "timestamp": stamp,
                "traits": {"plan": plan}}
        assert client.post("/v1/identify", content=orjson.dumps(body)).status_code == 200
        time.sleep(0.003)
    assert find(r, "user_id", "req").trait_values() == {"plan": "alpha"}
    events = logged(r)
    for order_ in (events, events[::-1]):
        r.flushall()
        apply(r, order_, now=now_ms() + 60_000)
        assert find(r, "user_id", "req").trait_values() == {"plan": "alpha"}


# --- deletion ---------------------------------------------------------------------------------------------------

def test_delete_suppresses_only_what_came_before_it(client: TestClient, r: redis.Redis) -> None:
    """Segment's DELETE_ONLY: the profile is erased; late retries and replays from before the deletion stay out;
    events after it build a new profile."""
    def identify(mid: str, ts: str, plan: str) -> bytes:
        return orjson.dumps({"type": "identify", "userId": "del", "messageId": mid, "timestamp": ts,
                             "receivedAt": ts, "traits": {"plan": plan, "email": "del@example.com"}})

    assert post(client, identify("d1", "2026-03-01T10:00:00Z", "old")).json()["accepted"] == 1
    delete = orjson.dumps({"type": "delete", "userId": "del", "messageId": "d2", "timestamp": "2026-03-02T10:00:00Z",
                           "receivedAt": "2026-03-02T10:00:00Z"})
    assert post(client, delete).json()["accepted"] == 1
    late = post(client, identify("d3", "2026-03-02T09:59:59Z", "late")).json()
    assert (late["accepted"], late["suppressed"]) == (0, 1)
    assert find(r, "user_id", "del") is None and find(r, "email", "del@example.com") is None
    after = post(client, identify("d4", "2026-03-03T10:00:00Z", "new")).json()
    assert after["accepted"] == 1
    p = find(r, "user_id", "del")
    assert p.trait_values() == {"plan": "new", "email": "del@example.com"}
    assert p.first_seen == ms("2026-03-03T10:00:00Z")  # nothing of the erased profile came back


# --- bodies -----------------------------------------------------------------------------------------------------

def test_a_lone_surrogate_does_not_sink_the_batch(client: TestClient, r: redis.Redis) -> None:
    """JSON.stringify writes half an emoji as a lone \\ud83d escape: the body is accepted with U+FFFD in its place,
    and the signature is still checked on the bytes as sent."""
    first = (b'{"type":"identify","userId":"emoji","messageId":"e1","timestamp":"2026-03-01T10:00:00Z",'
             b'"traits":{"nick":"cut \\ud83d","whole":"\\ud83d\\ude00","escaped":"\\\\ud83d"}}')
    body = first + b''  # classic webhook: the whole body is signed
    batch = b"[" + first + (b',{"type":"track","userId":"emoji","messageId":"e2","event":"Shared \\udc00",'
                            b'"timestamp":"2026-03-01T10:00:00Z"}]')
    actions_signature = hmac.new(SECRET.encode(), first, hashlib.sha1).hexdigest()  # JSON.stringify(batch[0])
    resp = post(client, batch, **{"X-Signature": actions_signature})
    assert resp.status_code == 200 and resp.json()["accepted"] == 2, resp.text
    assert find(r, "user_id", "emoji").trait_values() == {"nick": "cut \ufffd", "whole": "\U0001F600",
                                                          "escaped": "\\ud83d"}
    forged = batch.replace(b"cut", b"cat")
    assert post(client, forged, **{"X-Signature": actions_signature}).status_code == 401
    assert post(client, body.replace(b"e1", b"e3"), **{"X-Signature": sign(body)}).status_code == 401
    one = b'{"type":"identify","userId":"emoji2","messageId":"e4","traits":{"nick":"\\udbff!"}}'
    assert post(client, one).status_code == 200
    assert find(r, "user_id", "emoji2").trait_values() == {"nick": "\ufffd!"}
