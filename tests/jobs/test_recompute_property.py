"""Property: whatever the events, their order and the time that passes between refreshes, the aggregates a run of
refreshes leaves equal a full recompute at the last refresh's time (local, forked, or shared out as chunk jobs)."""

from __future__ import annotations

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from service.config import Settings
from service.spec.keys import DAY_MS, Keys
from service.state.ops import NotFound, forget
from tests.helpers import NOW, _iso, apply
from workers import mapreduce
from workers.recompute import full_recompute, refresh

K = Keys("default")
USERS, ANONS, ORDERS = ["u0", "u1", "u2", "u3"], ["a0", "a1", "a2", "a3"], ["o0", "o1", "o2", "o3", "o4"]


def state(r: redis.Redis) -> dict:
    out: dict = {key: {k: orjson.loads(v) for k, v in r.hgetall(key).items()}
                 for key in (K.clusters, K.patterns, K.cluster_aggregates, K.pattern_aggregates, K.contributions)}
    for name in ("high_value", "growth", "at_risk", "new"):
        out[name] = r.zrange(K.cluster_spend(name), 0, -1, withscores=True)
    return out


who = st.one_of(st.tuples(st.just("userId"), st.sampled_from(USERS)),
                st.tuples(st.just("anonymousId"), st.sampled_from(ANONS)))
ago = st.integers(min_value=0, max_value=400)  # days before NOW
event = st.one_of(
    st.tuples(st.just("identify"), who, ago, st.fixed_dictionaries({}, optional={
        "ltv": st.sampled_from([50, 150, 900]), "churn_risk": st.sampled_from([0.05, 0.6]),
        "plan": st.sampled_from(["free", "pro"]), "purchase_count": st.sampled_from([0, 3])})),
    st.tuples(st.just("order"), who, ago, st.tuples(st.sampled_from(ORDERS), st.sampled_from([10, 25.5, 300]),
                                                    st.lists(st.sampled_from(["books", "toys"]), max_size=2))),
    st.tuples(st.just("refund"), who, ago, st.sampled_from(ORDERS)),
    st.tuples(st.just("visit"), who, ago, st.sampled_from(["page", "screen", "email"])),
    st.tuples(st.just("link"), st.sampled_from(USERS), ago, st.sampled_from(ANONS)),
    st.tuples(st.just("group"), who, ago, st.sampled_from(["SaaS", "Retail"])),
    st.tuples(st.just("forget"), st.sampled_from(USERS), ago, st.none()),
)


def to_event(e: tuple, i: int) -> dict:
    kind, w, days, arg = e
    base = {"messageId": f"m{i}", "timestamp": _iso(NOW - days * DAY_MS - i * 1000)}
    if kind == "identify":
        return {**base, "type": "identify", w[0]: w[1], "traits": arg}
    if kind == "order":
        oid, revenue, cats = arg
        return {**base, "type": "track", "event": "Order Completed", w[0]: w[1],
                "properties": {"order_id": oid, "revenue": revenue, "products": [{"category": c} for c in cats]}}
    if kind == "refund":
        return {**base, "type": "track", "event": "Order Refunded", w[0]: w[1], "properties": {"order_id": arg}}
    if kind == "visit":
        if arg == "screen":
            return {**base, "type": "screen", w[0]: w[1], "name": "Feed",
                    "context": {"device": {"id": "d", "type": "ios"}}}
        return {**base, "type": "page", w[0]: w[1]} if arg == "page" else \
            {**base, "type": "track", "event": "Email Opened", w[0]: w[1]}
    if kind == "link":
        return {**base, "type": "identify", "userId": w, "anonymousId": arg}
    return {**base, "type": "group", w[0]: w[1], "groupId": "g0", "traits": {"industry": arg}}


@hsettings(max_examples=40, suppress_health_check=list(HealthCheck), deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from([0, 0, 20, 45, 100, 200]), st.lists(event, min_size=1, max_size=5)),
                      min_size=1, max_size=4))
def test_refreshes_as_time_passes_equal_a_full_recompute(r: redis.Redis, monkeypatch: pytest.MonkeyPatch,
                                                         steps: list) -> None:
    r.flushall()
    s, i, now = Settings(), 0, NOW
    for days_later, batch in steps:
        now += days_later * DAY_MS  # 0: the same day, so that refreshes stay incremental too
        events = []
        for e in batch:
            i += 1
            if e[0] != "forget":
                events.append(to_event(e, i))
                continue
            apply(r, events)
            events = []
            try:
                forget(r, s, "default", e[1])
            except NotFound:
                pass
        apply(r, events)
        refresh(r, s, "default", now_ms=now)
    refreshed = state(r)
    full_recompute(r, s, "default", now_ms=now)
    assert state(r) == refreshed
    full_recompute(r, s, "default", now_ms=now, processes=2)
    assert state(r) == refreshed
    monkeypatch.setattr(mapreduce, "CHUNK_IDS", 2)
    mapreduce.full_recompute(r, s, "default", lambda *args: None, now_ms=now)
    assert state(r) == refreshed
