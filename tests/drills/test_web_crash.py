"""Drill: the web process is SIGKILLed (and restarted on the same port) several times while Segment is sending.

What a user relies on: an event that got a 200 is in the state, exactly once, and an event that did not get a 200
is sent again by Segment (same messageId, same body) until it does, without being counted twice. Segment's retry is
played by ``Sender``; the kills happen at fixed points of the progress, so every run kills under load however fast
or slow the machine is.
"""

from __future__ import annotations

import time

from tests.drills.stack import (
    Sender,
    attempt_counts,
    deliver_with_strikes,
    logged_message_ids,
    profile_of,
    signed_deliveries,
)

EVENTS = 800
USERS = 40
KILLS = (0.2, 0.45, 0.7)  # kill when this share of the events has been acknowledged


def order_events(n: int, users: int) -> list[dict]:
    return [{"type": "track", "event": "Order Completed", "userId": f"crash-user-{i % users}",
             "messageId": f"crash-msg-{i}", "timestamp": f"2026-03-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z",
             "properties": {"order_id": f"crash-order-{i}", "revenue": i + 0.5,
                            "products": [{"category": "books"}]}}
            for i in range(n)]


def test_web_sigkill_under_load_loses_and_doubles_nothing(start_redis, start_web) -> None:
    redis_server = start_redis(persistent=False)  # this drill crashes the web, not Redis
    web = start_web(redis_server.url, concurrency=1)
    events = order_events(EVENTS, USERS)
    deliveries = signed_deliveries(events)
    sender = Sender(f"{web.url}/segment", threads=4)
    kills: list[float] = []

    def kill_web() -> None:
        web.kill()
        kills.append(time.monotonic())
        time.sleep(0.3)  # down for a moment: clients meet refused connections and back off
        web.start()

    deliver_with_strikes(sender, deliveries, KILLS, kill_web)
    assert len(kills) == len(KILLS) and web.starts == len(KILLS) + 1

    counts = attempt_counts(deliveries)
    print(f"attempt outcomes: {dict(counts)}")
    # the drill did hit the crashes: some attempts met a dead server (refused, reset or cut off mid-request)
    assert sum(n for outcome, n in counts.items() if outcome != "200") > 0, counts
    # nothing but 200 or a transport error: a crash never turns into a 5xx for an event that a retry can apply
    assert {o for o in counts if o.isdigit()} <= {"200"}, counts
    # every event eventually got a 200
    assert [d.key for d in deliveries if not d.acked] == []

    r = redis_server.client()
    logged = logged_message_ids(r)
    # every acknowledged event is in the event log exactly once; nothing else is
    assert {m: n for m, n in logged.items() if n != 1} == {}, "events applied more than once"
    assert sorted(logged) == sorted(d.key for d in deliveries if d.acked), "acknowledged events missing from the log"
    # and its effect is on the profile: each order once, with its revenue
    for u in range(USERS):
        user = f"crash-user-{u}"
        profile = profile_of(r, user)
        orders = {f[2:]: v for f, v in profile.items() if f.startswith("o:")}
        expected = {e["properties"]["order_id"]: e["properties"]["revenue"] for e in events if e["userId"] == user}
        assert sorted(orders) == sorted(expected), user
        for key, value in orders.items():
            assert float(value.split("|")[1]) == expected[key], (user, key, value)
    # exactly one profile per user: a crash in the middle of an identity step never split a person in two
    assert sum(1 for _ in r.scan_iter(match="sps:{default}:p:*", count=1000)) == USERS
    r.close()
