"""Segment fidelity, against a real Redis: which calls write traits and identifiers, events without a messageId,
and how a call's channel is read — each as Segment and Unify document it."""

from __future__ import annotations

import orjson
import redis
from starlette.testclient import TestClient

from service.spec.keys import Keys
from tests.helpers import apply, find
from tests.http.test_receiver import post

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
    orders, traits set to null before or after other values."""
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
    apply(r, events)
    in_order = snapshot(r)
    assert sum(len(p["orders"]) for p in in_order.values()) < len(orders)  # some orders really were taken back
    for seed in (1, 2):
        r.flushall()
        shuffled = list(events)
        random.Random(seed).shuffle(shuffled)
        apply(r, shuffled)
        assert snapshot(r) == in_order
