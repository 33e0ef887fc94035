"""Profile state through the real Lua script: exactly once, order-independent, identity resolution, GDPR."""

from __future__ import annotations

import random
import time

import pytest
import redis
from redis.cluster import RedisCluster

from service.config import Settings
from service.spec.events import dedupe_digest, legacy_dedupe_field
from service.spec.keys import Keys
from service.state.ops import forget, purge_forgotten
from service.state.store import Applier, state_keys
from tests.helpers import NOW, _iso, apply, find, mixed_stream, profiles, snapshot

BOTH_BACKENDS = True  # each test runs on a standalone Redis and on a Redis Cluster (tests/conftest.py)


def test_20000_events_in_order_equal_twice_shuffled(r: redis.Redis) -> None:
    events = mixed_stream(20_000, users=400)
    apply(r, events)
    in_order = snapshot(r)
    assert len(in_order) == 400  # every person resolved to exactly one profile
    r.flushall()
    doubled = events + events
    random.Random(3).shuffle(doubled)
    outcomes = apply(r, doubled)
    assert sum(o.status == "duplicate" for o in outcomes) == len(events)
    assert snapshot(r) == in_order


def test_retry_takes_effect_once(r: redis.Redis) -> None:
    order = {"type": "track", "event": "Order Completed", "userId": "u1", "messageId": "m1",
             "timestamp": "2026-03-01T00:00:00Z", "properties": {"revenue": 10, "order_id": "o1"}}
    assert [o.status for o in apply(r, [order, order])] == ["ok", "duplicate"]
    assert apply(r, [order])[0].status == "duplicate"
    # even past the dedupe window (another messageId, same order), the order counts once
    apply(r, [dict(order, messageId="m2")])
    assert len(find(r, "user_id", "u1").orders) == 1
    assert r.xlen(Keys("default").log) == 2


def test_dedupe_records_are_compact_integer_sets(r: redis.Redis) -> None:
    """A remembered messageId is an integer in a set that Redis keeps as an intset: 8 bytes, found by binary search
    (the hashes of 8-byte fields before walked every field of a shard at each lookup, twice the script's cost)."""
    settings = Settings(dedupe_shards=1)
    apply(r, [{"type": "track", "event": "e", "userId": "u1", "messageId": f"m{i}"} for i in range(600)], settings)
    key = Keys("default").dedupe(NOW // 1000 // Applier(settings).bucket_width, 0)
    assert r.type(key) == b"set" and r.scard(key) == 600
    assert r.object("encoding", key) == b"intset"  # the tuning the embedded server and deploy/redis.conf set
    assert r.get(Keys("default").dedupe_sets_since) == b"-"  # a new space: no older records to read


@pytest.mark.parametrize("age", ["current", "older"])
def test_an_older_versions_dedupe_records_still_drop_retries(r: redis.Redis, age: str) -> None:
    """A space an older version wrote: its dedupe records are hashes of 8-byte fields. After the upgrade, a retry of
    an event it applied is still a duplicate, in the current bucket or an older one of the window; new events
    apply. Records of buckets written after the upgrade's first are not looked for (they cannot be the old ones)."""
    settings = Settings(dedupe_shards=4)
    applier = Applier(settings)
    keys = Keys("default")
    bucket = NOW // 1000 // applier.bucket_width - (age == "older")
    old = [{"type": "track", "event": "e", "userId": f"u{i}", "messageId": f"ajs-{i}-{'x' * (i % 7)}"}
           for i in range(400)]  # as the older version recorded them (ids of either sign)
    r.xadd(keys.log, {"p": "x", "e": "{}"})  # the space has data
    for e in old:
        shard, dedupe_id = dedupe_digest(e["messageId"])
        r.hset(keys.legacy_dedupe(bucket, shard % 4), legacy_dedupe_field(dedupe_id), "1")
    signs = {dedupe_digest(e["messageId"])[1] < 0 for e in old}
    assert signs == {True, False}
    new = [{"type": "track", "event": "e", "userId": f"u{i}", "messageId": f"new-{i}"} for i in range(50)]
    outcomes = apply(r, old + new, settings)
    assert [o.status for o in outcomes] == ["duplicate"] * len(old) + ["ok"] * len(new)
    current = NOW // 1000 // applier.bucket_width
    assert r.get(keys.dedupe_sets_since) == str(current).encode()

    def in_hashes(events: list[dict]) -> set[bool]:
        return {bool(r.hexists(keys.legacy_dedupe(current, d[0] % 4), legacy_dedupe_field(d[1])))
                for d in (dedupe_digest(e["messageId"]) for e in events)}

    # while older processes may still run beside this one (a rolling upgrade), new ids go to their hashes too
    assert in_hashes(new) == {True}
    # long after the upgrade, the hashes are neither read nor written (they have left the window by then)
    r.set(keys.dedupe_sets_since, str(bucket - 2))
    assert {o.status for o in apply(r, old[:20], settings)} == {"ok"}
    later = [dict(e, messageId=f"later-{i}") for i, e in enumerate(new)]
    assert {o.status for o in apply(r, later, settings)} == {"ok"} and in_hashes(later) == {False}


def test_an_order_sent_twice_keeps_its_latest_version_in_any_order(r: redis.Redis) -> None:
    """Two Order Completed for one order (a correction, or a second source): the later event's amount counts,
    whichever arrives first, and when the two profiles holding them merge."""
    def order(mid: str, ts: str, revenue: int, who: dict) -> dict:
        return {"type": "track", "event": "Order Completed", **who, "messageId": mid, "timestamp": ts,
                "properties": {"order_id": "o1", "revenue": revenue}}

    first, fix = order("m1", "2026-03-01T00:00:00Z", 100, {"userId": "u1"}), \
        order("m2", "2026-03-01T00:01:00Z", 80, {"userId": "u1"})
    states = []
    for events in ([first, fix], [fix, first]):
        r.flushall()
        apply(r, events)
        [o] = find(r, "user_id", "u1").orders
        states.append((o.revenue, o.ts))
    assert states == [(80.0, 1772323260000)] * 2
    # the same order on two profiles of one person, which then merge: the later version survives either way
    anon = order("m3", "2026-03-01T00:02:00Z", 60, {"anonymousId": "a1"})
    merge = {"type": "identify", "userId": "u1", "anonymousId": "a1", "messageId": "m4",
             "timestamp": "2026-03-01T00:03:00Z"}
    for events in ([first, anon, merge], [anon, first, merge], [merge, first, anon]):
        r.flushall()
        apply(r, events)
        assert [(o.revenue, o.ts) for o in find(r, "user_id", "u1").orders] == [(60.0, 1772323320000)], events


def test_a_full_tie_between_two_writes_of_a_trait_keeps_the_same_class_in_any_order(r: redis.Redis) -> None:
    """An identify and Engage's Audience Entered set the same trait to the same value at the same time and receipt:
    the trait's class (audience, or none) is the same whichever arrives first (the greater one)."""
    at, rc = "2026-03-01T00:00:00Z", "2026-03-01T00:00:05Z"
    identify = {"type": "identify", "userId": "u1", "messageId": "m1", "timestamp": at, "receivedAt": rc,
                "traits": {"vip": True}}
    entered = {"type": "track", "userId": "u1", "event": "Audience Entered", "messageId": "m2", "timestamp": at,
               "receivedAt": rc, "properties": {"audience_key": "vip", "vip": True},
               "context": {"personas": {"computation_class": "audience", "computation_key": "vip"}}}
    seen = []
    for events in ([identify, entered], [entered, identify]):
        r.flushall()
        apply(r, events)
        vip = find(r, "user_id", "u1").traits["vip"]
        seen.append((vip.value, vip.kind))
    assert seen == [(True, "audience")] * 2


def test_anonymous_then_identified(r: redis.Redis) -> None:
    apply(r, [
        {"type": "page", "anonymousId": "a1", "messageId": "1", "timestamp": "2026-03-01T10:00:00Z",
         "context": {"traits": {"utm": "ad"}}},
        {"type": "identify", "anonymousId": "a1", "userId": "u1", "messageId": "2",
         "timestamp": "2026-03-01T10:05:00Z", "traits": {"email": " Jane@Example.COM "}},
    ])
    p = find(r, "anonymous_id", "a1")
    assert p is not None and p.id == find(r, "user_id", "u1").id == find(r, "email", "jane@example.com").id
    assert "utm" not in p.trait_values()  # a page's context.traits identify but do not write traits (only identify)
    assert len(profiles(r)) == 1


def test_two_devices_merge_into_one_user(r: redis.Redis) -> None:
    apply(r, [
        {"type": "screen", "anonymousId": "a-ios", "messageId": "1", "timestamp": "2026-03-01T10:00:00Z",
         "context": {"device": {"id": "D1", "type": "ios"}}, "properties": {}},
        {"type": "screen", "anonymousId": "a-and", "messageId": "2", "timestamp": "2026-03-01T11:00:00Z",
         "context": {"device": {"id": "D2", "type": "android"}}, "traits": {}},
        {"type": "identify", "anonymousId": "a-ios", "userId": "u1", "messageId": "3",
         "timestamp": "2026-03-02T10:00:00Z", "traits": {"plan": "pro"}},
    ])
    assert len(profiles(r)) == 2
    out = apply(r, [{"type": "identify", "anonymousId": "a-and", "userId": "u1", "messageId": "4",
                     "timestamp": "2026-03-02T11:00:00Z"}])
    assert out[0].merged == 1
    [p] = profiles(r)
    assert {(i.type, i.value) for i in p.identifiers} == {
        ("anonymous_id", "a-ios"), ("anonymous_id", "a-and"), ("ios.id", "D1"), ("android.id", "D2"),
        ("user_id", "u1")}
    assert p.id == "use_1" and p.merged_from == ["use_2"]  # the older profile id survives
    assert r.get(Keys("default").redirect("use_2")) == b"use_1"
    assert p.merges == 1 and p.sessions("mobile", 0, 10**6) == 2


def test_shared_device_used_by_two_user_ids_stays_two_profiles(r: redis.Redis) -> None:
    kiosk = {"device": {"id": "KIOSK", "type": "android"}}
    apply(r, [
        {"type": "identify", "userId": "alice", "messageId": "1", "timestamp": "2026-03-01T10:00:00Z",
         "context": kiosk, "traits": {"name": "Alice"}},
        {"type": "identify", "userId": "bob", "messageId": "2", "timestamp": "2026-03-01T11:00:00Z",
         "context": kiosk, "traits": {"name": "Bob"}},
    ])
    alice, bob = find(r, "user_id", "alice"), find(r, "user_id", "bob")
    assert alice.id != bob.id
    assert alice.trait_values()["name"] == "Alice" and bob.trait_values()["name"] == "Bob"
    assert find(r, "android.id", "KIOSK").id == alice.id  # first owner keeps it; bob's event dropped it


def test_shared_team_email_stops_merging_at_its_limit(r: redis.Redis) -> None:
    events = [{"type": "identify", "anonymousId": f"laptop-{i}", "messageId": f"t{i}",
               "timestamp": f"2026-03-01T10:0{i}:00Z", "traits": {"email": "team@acme.io"}} for i in range(8)]
    apply(r, events)
    team = find(r, "email", "team@acme.io")
    anons = [i.value for i in team.identifiers if i.type == "anonymous_id"]
    assert anons == [f"laptop-{i}" for i in range(5)]  # limit 5; later laptops are not attached
    assert find(r, "anonymous_id", "laptop-6") is None
    assert len(profiles(r)) == 1  # their events still land on the team profile
    # two people who share that email never merge (user_id limit 1)
    apply(r, [{"type": "identify", "userId": "carol", "messageId": "c", "timestamp": "2026-03-02T00:00:00Z",
               "traits": {"email": "team@acme.io"}},
              {"type": "identify", "userId": "dave", "messageId": "d", "timestamp": "2026-03-02T00:00:00Z",
               "traits": {"email": "team@acme.io"}}])
    assert find(r, "user_id", "carol").id == team.id
    assert find(r, "user_id", "dave").id != team.id


def test_merge_limit_stops_merging_but_events_still_attach(r: redis.Redis) -> None:
    s = Settings(max_merges=1)
    apply(r, [{"type": "page", "anonymousId": f"a{i}", "messageId": f"p{i}",
               "timestamp": "2026-03-01T00:00:00Z"} for i in range(3)], s)
    apply(r, [{"type": "identify", "userId": "u", "anonymousId": "a0", "messageId": "i0",
               "timestamp": "2026-03-01T01:00:00Z"}], s)
    out = apply(r, [{"type": "identify", "userId": "u", "anonymousId": "a1", "messageId": "i1",
                     "timestamp": "2026-03-01T02:00:00Z"},
                    {"type": "identify", "userId": "u", "anonymousId": "a2", "messageId": "i2",
                     "timestamp": "2026-03-01T03:00:00Z", "traits": {"late": True}}], s)
    assert [o.merged for o in out] == [1, 0]
    u = find(r, "user_id", "u")
    assert u.merges == 1 and u.trait_values()["late"] is True
    assert find(r, "anonymous_id", "a2").id != u.id


def test_identifier_limit_per_profile(r: redis.Redis) -> None:
    s = Settings(max_identifiers=3)
    apply(r, [{"type": "identify", "userId": "u", "anonymousId": f"a{i}", "messageId": f"i{i}",
               "timestamp": "2026-03-01T00:00:00Z"} for i in range(4)], s)
    assert len(find(r, "user_id", "u").identifiers) == 3


def test_an_id_merged_away_long_ago_still_finds_its_profile(r: redis.Redis) -> None:
    """Twenty profiles merged one into the next, newest first: each merged-away profile id (the Profile API's
    ``segment_id`` form) still resolves to the one survivor, and in one hop. (Their anonymousId is a blocked
    placeholder, so only the external ids identify them and no per-type limit stops the merges.)"""
    from service.spec.keys import TOMBSTONE
    from service.state.reads import FIND

    def ext(k: int) -> dict:
        return {"type": f"t{k:02d}", "id": "v", "collection": "users", "encoding": "none"}

    apply(r, [{"type": "track", "event": "X", "anonymousId": "anonymous", "messageId": f"c{k}",
               "timestamp": "2026-03-01T00:00:00Z", "context": {"externalIds": [ext(k)]}} for k in range(20)])
    pids = [find(r, f"t{k:02d}", "v").id for k in range(20)]
    out = apply(r, [{"type": "track", "event": "X", "anonymousId": "anonymous", "messageId": f"l{k}",
                     "timestamp": "2026-03-01T00:00:01Z", "context": {"externalIds": [ext(k), ext(k - 1)]}}
                    for k in range(19, 0, -1)])
    assert [o.merged for o in out] == [1] * 19
    survivor = find(r, "t00", "v").id
    k = Keys("default")
    for pid in pids[1:]:
        assert r.get(k.redirect(pid)) == survivor.encode(), pid
        found = r.eval(FIND, 1, k.generation_key, k.prefix, "segment_id", pid, TOMBSTONE)
        assert found[1] == survivor.encode(), pid


def test_at_the_identifier_cap_an_event_still_attaches_to_its_profile(r: redis.Redis) -> None:
    """Past the cap on identifiers per profile an event attaches and adds none: its new email is left out, not
    its known anonymousId (which would split the event off to a new profile of its own)."""
    s = Settings(max_identifiers=3)
    apply(r, [{"type": "identify", "userId": "u", "anonymousId": f"a{i}", "messageId": f"i{i}",
               "timestamp": "2026-03-01T00:00:00Z"} for i in range(2)], s)
    out = apply(r, [{"type": "identify", "anonymousId": "a0", "messageId": "x", "timestamp": "2026-03-01T01:00:00Z",
                     "traits": {"email": "new@example.com", "plan": "pro"}}], s)
    assert out[0].created == 0
    assert len(profiles(r)) == 1 and find(r, "email", "new@example.com") is None
    assert find(r, "user_id", "u").trait_values()["plan"] == "pro"


def test_at_the_identifier_cap_merge_protection_still_comes_first(r: redis.Redis) -> None:
    """The cap's "leave the new identifier out" never overrides the per-type limits: a second userId on a full
    profile's device is not left out to attach its event (and traits) to the first user; and when the known
    profiles alone pass the cap, the lowest-priority identifier goes, as before, not a new userId."""
    s = Settings(max_identifiers=3)
    apply(r, [{"type": "identify", "userId": "u1", "anonymousId": f"a{i}", "messageId": f"i{i}",
               "timestamp": "2026-03-01T00:00:00Z"} for i in range(2)], s)
    apply(r, [{"type": "identify", "userId": "u2", "anonymousId": "a0", "messageId": "x",
               "timestamp": "2026-03-01T01:00:00Z", "traits": {"plan": "u2-plan"}}], s)
    assert "plan" not in find(r, "user_id", "u1").trait_values()
    assert find(r, "user_id", "u2").trait_values() == {"plan": "u2-plan"}
    r.flushall()
    s = Settings(max_identifiers=4)
    ext = {"externalIds": [{"type": "x1", "id": "v", "collection": "users", "encoding": "none"}]}
    apply(r, [{"type": "page", "anonymousId": "a1", "messageId": "m1", "timestamp": "2026-03-01T00:00:00Z",
               "context": ext},
              {"type": "page", "anonymousId": "a0", "messageId": "m2", "timestamp": "2026-03-01T00:00:00Z",
               "context": ext},
              {"type": "identify", "anonymousId": "b0", "messageId": "q", "timestamp": "2026-03-01T00:00:00Z",
               "traits": {"email": "e@example.com"}}], s)
    apply(r, [{"type": "identify", "userId": "unew", "anonymousId": "a0", "messageId": "z",
               "timestamp": "2026-03-01T00:00:00Z", "traits": {"email": "e@example.com"}}], s)
    assert find(r, "user_id", "unew").id == find(r, "email", "e@example.com").id
    assert find(r, "anonymous_id", "a0").id != find(r, "user_id", "unew").id


def test_a_late_alias_does_not_bring_a_deleted_user_id_back(r: redis.Redis) -> None:
    """An alias stamped before its previousId's deletion, arriving after it (a retry, a replay) links nothing to
    the deleted userId: as for the userId's own events, up to the deletion it stays gone."""
    apply(r, [{"type": "identify", "userId": "u1", "anonymousId": "a0", "messageId": "1",
               "timestamp": "2026-03-01T00:00:00Z"},
              {"type": "delete", "userId": "u1", "messageId": "2", "timestamp": "2026-03-01T00:10:00Z"},
              {"type": "alias", "anonymousId": "a1", "previousId": "u1", "messageId": "3",
               "timestamp": "2026-03-01T00:05:00Z"}])
    assert find(r, "user_id", "u1") is None and find(r, "anonymous_id", "a1") is not None
    # nor once the userId has a new profile (an event after the deletion)
    apply(r, [{"type": "identify", "userId": "u1", "messageId": "5", "timestamp": "2026-03-01T00:15:00Z"},
              {"type": "alias", "anonymousId": "a3", "previousId": "u1", "messageId": "6",
               "timestamp": "2026-03-01T00:06:00Z"}])
    assert find(r, "anonymous_id", "a3").id != find(r, "user_id", "u1").id
    # an alias after the deletion may link the userId again, as any later event of it builds a new profile
    apply(r, [{"type": "alias", "anonymousId": "a2", "previousId": "u1", "messageId": "4",
               "timestamp": "2026-03-01T00:20:00Z"}])
    assert find(r, "user_id", "u1").id == find(r, "anonymous_id", "a2").id


def test_alias_merges_unless_turned_off(r: redis.Redis) -> None:
    events = [{"type": "page", "anonymousId": "old-anon", "messageId": "1", "timestamp": "2026-03-01T00:00:00Z"},
              {"type": "identify", "userId": "u9", "messageId": "2", "timestamp": "2026-03-01T00:01:00Z"},
              {"type": "alias", "previousId": "old-anon", "userId": "u9", "messageId": "3",
               "timestamp": "2026-03-01T00:02:00Z"}]
    apply(r, events)
    assert find(r, "anonymous_id", "old-anon").id == find(r, "user_id", "u9").id
    r.flushall()
    apply(r, events, Settings(alias_merges=False))
    assert find(r, "anonymous_id", "old-anon").id != find(r, "user_id", "u9").id
    # analytics.js's alias('u9') carries the anonymousId too (as previousId and as itself): still no merge in Unify
    r.flushall()
    events[2]["anonymousId"] = "old-anon"
    assert [o.merged for o in apply(r, events, Settings(alias_merges=False))] == [0, 0, 0]
    assert find(r, "anonymous_id", "old-anon").id != find(r, "user_id", "u9").id
    assert [o.merged for o in apply(r, [{**events[2], "messageId": "4"}])] == [1]  # the default merges it


def test_alias_between_two_user_ids_is_protected(r: redis.Redis) -> None:
    apply(r, [{"type": "identify", "userId": "a", "messageId": "1", "timestamp": "2026-03-01T00:00:00Z"},
              {"type": "identify", "userId": "b", "messageId": "2", "timestamp": "2026-03-01T00:00:00Z"},
              {"type": "alias", "previousId": "a", "userId": "b", "messageId": "3",
               "timestamp": "2026-03-01T00:01:00Z"}])
    assert find(r, "user_id", "a").id != find(r, "user_id", "b").id


def test_blocked_values_are_never_identifiers(r: redis.Redis) -> None:
    apply(r, [{"type": "identify", "userId": "u1", "anonymousId": "00000000", "messageId": "1",
               "timestamp": "2026-03-01T00:00:00Z", "traits": {"email": "undefined"}},
              {"type": "identify", "userId": "u2", "anonymousId": "00000000", "messageId": "2",
               "timestamp": "2026-03-01T00:00:00Z"}])
    assert find(r, "user_id", "u1").id != find(r, "user_id", "u2").id
    assert [i.type for i in find(r, "user_id", "u1").identifiers] == ["user_id"]


def test_traits_last_write_wins_by_event_time(r: redis.Redis) -> None:
    late = {"type": "identify", "userId": "u", "messageId": "late", "timestamp": "2026-03-02T00:00:00Z",
            "traits": {"plan": "enterprise"}}
    early = {"type": "identify", "userId": "u", "messageId": "early", "timestamp": "2026-03-01T00:00:00Z",
             "traits": {"plan": "free", "name": "U"}}
    apply(r, [late, early])
    assert find(r, "user_id", "u").trait_values() == {"plan": "enterprise", "name": "U"}


def test_audience_membership_is_ordered_by_timestamp(r: redis.Redis) -> None:
    ctx = {"personas": {"computation_class": "audience", "computation_key": "vip"}}
    exited = {"type": "track", "event": "Audience Exited", "userId": "u", "messageId": "x",
              "timestamp": "2026-04-01T00:00:00Z", "properties": {"audience_key": "vip", "vip": False},
              "context": ctx}
    entered = dict(exited, event="Audience Entered", messageId="e", timestamp="2026-03-01T00:00:00Z",
                   properties={"audience_key": "vip", "vip": True})
    apply(r, [exited, entered])
    t = find(r, "user_id", "u").traits["vip"]
    assert t.value is False and t.kind == "audience"
    # recognised by name alone when a destination renamed nothing and sent no context.personas
    apply(r, [{"type": "track", "event": "Audience Entered", "userId": "w", "messageId": "n",
               "timestamp": "2026-03-01T00:00:00Z", "properties": {"audience_key": "buyers"}}])
    assert find(r, "user_id", "w").traits["buyers"].value is True


def test_sessions_are_distinct_half_hour_slots(r: redis.Redis) -> None:
    times = ["2026-03-01T10:00:00Z", "2026-03-01T10:29:59Z", "2026-03-01T10:30:00Z", "2026-03-02T00:00:00Z"]
    apply(r, [{"type": "page", "userId": "u", "messageId": f"p{i}", "timestamp": t} for i, t in enumerate(times)])
    p = find(r, "user_id", "u")
    assert p.sessions("web", 0, 10**6) == 3
    assert p.sessions("mobile", 0, 10**6) == 0


def test_group_links_account_and_its_traits(r: redis.Redis) -> None:
    apply(r, [{"type": "group", "userId": "u", "groupId": "acc1", "messageId": "g",
               "timestamp": "2026-03-01T00:00:00Z", "traits": {"industry": "SaaS", "employees": 10}}])
    assert list(find(r, "user_id", "u").groups) == ["acc1"]
    acct = r.hgetall(Keys("default").account("acc1"))
    assert acct[b"t:industry"] == b'"SaaS"' and acct[b"t:employees"] == b"10"


def test_gdpr_delete_erases_and_suppresses(r: redis.Redis) -> None:
    apply(r, [{"type": "identify", "userId": "gone", "anonymousId": "ga", "messageId": "1",
               "timestamp": "2026-03-01T00:00:00Z", "traits": {"email": "gone@example.com"}},
              {"type": "page", "anonymousId": "ga2", "messageId": "2", "timestamp": "2026-03-01T00:00:00Z"},
              {"type": "alias", "previousId": "ga2", "userId": "gone", "messageId": "3",
               "timestamp": "2026-03-01T00:01:00Z"},
              {"type": "identify", "userId": "stays", "messageId": "4", "timestamp": "2026-03-01T00:00:00Z"}])
    out = apply(r, [{"type": "delete", "userId": "gone", "timestamp": "2026-05-01T00:00:00Z"}])
    assert out[0].status == "deleted"
    for kind, value in [("user_id", "gone"), ("anonymous_id", "ga"), ("anonymous_id", "ga2"),
                        ("email", "gone@example.com")]:
        assert find(r, kind, value) is None
    k = Keys("default")
    assert purge_forgotten(r, "default") == 3
    assert [f[b"p"] for _, f in r.xrange(k.log)] == [find(r, "user_id", "stays").id.encode()]
    # a late retry from before the deletion stays out; one from after it builds a new profile (DELETE_ONLY)
    assert apply(r, [{"type": "identify", "userId": "gone", "messageId": "5", "traits": {"plan": "old"},
                      "timestamp": "2026-04-30T00:00:00Z"}])[0].status == "suppressed"
    assert apply(r, [{"type": "identify", "userId": "gone", "messageId": "5b", "anonymousId": "ga",
                      "timestamp": "2026-05-01T00:00:00Z"}])[0].status == "suppressed"  # at the deletion: out
    assert find(r, "user_id", "gone") is None
    fresh = apply(r, [{"type": "identify", "userId": "gone", "messageId": "6", "traits": {"plan": "new"},
                       "timestamp": "2026-06-01T00:00:00Z"}])[0]
    assert fresh.status == "ok" and fresh.created
    again = find(r, "user_id", "gone")
    assert again.id == fresh.profile_id and {t: v.value for t, v in again.traits.items()} == {"plan": "new"}
    assert [(i.type, i.value) for i in again.identifiers] == [("user_id", "gone")]
    assert apply(r, [{"type": "track", "userId": "gone", "event": "late", "messageId": "7",
                      "timestamp": "2026-04-01T00:00:00Z"}])[0].status == "suppressed"  # still, after the rebirth


def test_a_delete_retried_or_late_leaves_the_profile_a_returning_user_built_after_it(r: redis.Redis) -> None:
    """Segment retries a delete it got no answer for, and a classic delete carries no messageId, so a retry is not a
    duplicate: it erased the profile the user had built since the deletion, whose events' own retries were then
    duplicates, gone for good. A profile whose first event came after the deletion's time stays, whatever the
    order the delete and that profile's events arrive in; one with anything at or before it is erased whole."""
    import itertools

    delete = {"type": "delete", "userId": "back", "timestamp": "2026-05-01T00:00:00Z"}
    old = {"type": "identify", "userId": "back", "messageId": "old", "timestamp": "2026-04-01T00:00:00Z",
           "traits": {"plan": "old"}}
    new = {"type": "identify", "userId": "back", "anonymousId": "phone", "messageId": "new",
           "timestamp": "2026-05-02T00:00:00Z", "traits": {"plan": "new"}}
    out = apply(r, [old, delete, new, dict(delete)])
    assert [o.status for o in out] == ["ok", "deleted", "ok", "deleted"]
    person = find(r, "user_id", "back")
    assert person is not None and person.traits["plan"].value == "new"
    assert apply(r, [new])[0].status == "duplicate"
    states = []
    for order in itertools.permutations([delete, new]):
        r.flushall()
        apply(r, [dict(e) for e in order])
        states.append(snapshot(r))
        assert find(r, "anonymous_id", "phone") is not None, order
    assert states[0] == states[1]
    r.flushall()
    apply(r, [old, new, delete])  # the same person before and after: erased as the profile stands
    assert profiles(r) == []


def test_a_deleted_user_id_named_by_external_ids_is_suppressed_too(r: redis.Redis) -> None:
    """Only the top-level userId was checked against the deletions: an event from before the deletion that named
    the userId in context.externalIds rebuilt the deleted person (a new profile under that userId), and once the
    person came back, such a late event reached the new profile by its fast path."""
    def late(mid: str, anon: str) -> dict:
        return {"type": "identify", "anonymousId": anon, "messageId": mid, "timestamp": "2026-03-01T00:00:00Z",
                "traits": {"name": "Ada"},
                "context": {"externalIds": [{"id": "ada", "type": "user_id", "collection": "users",
                                             "encoding": "none"}]}}

    apply(r, [{"type": "identify", "userId": "ada", "messageId": "1", "timestamp": "2026-02-01T00:00:00Z"},
              {"type": "delete", "userId": "ada", "messageId": "d", "timestamp": "2026-04-01T00:00:00Z"}])
    assert apply(r, [late("late-1", "a9")])[0].status == "suppressed"
    assert find(r, "user_id", "ada") is None and find(r, "anonymous_id", "a9") is None
    back = apply(r, [{"type": "identify", "userId": "ada", "anonymousId": "phone", "messageId": "2",
                      "timestamp": "2026-05-01T00:00:00Z"}])[0]
    assert back.created
    assert apply(r, [late("late-2", "phone")])[0].status == "suppressed"  # known identifiers: the fast path
    assert "name" not in find(r, "user_id", "ada").traits


def test_an_erased_persons_anonymous_events_stay_out(r: redis.Redis) -> None:
    """A deletion erases every identifier of the profile, not only its userId: a late retry, a replay read before
    the purge or an import of the person's page views from before they logged in (anonymousId alone) stays out,
    and so do the events of a profile without a userId that ``forget`` erased. Events after the erasure build a
    new profile, and older ones stay out of it too (the fast path of a known identifier)."""
    apply(r, [{"type": "page", "anonymousId": "pre", "messageId": "1", "timestamp": "2026-03-01T00:00:00Z"},
              {"type": "identify", "userId": "leaver", "anonymousId": "pre", "messageId": "2",
               "timestamp": "2026-03-01T00:05:00Z"},
              {"type": "page", "anonymousId": "lone", "messageId": "3", "timestamp": "2026-03-01T00:00:00Z"}])
    assert apply(r, [{"type": "delete", "userId": "leaver", "timestamp": "2026-05-01T00:00:00Z"}])[0].status \
        == "deleted"
    late_page = {"type": "page", "anonymousId": "pre", "messageId": "1b", "timestamp": "2026-03-01T00:01:00Z"}
    assert apply(r, [late_page])[0].status == "suppressed"
    assert find(r, "anonymous_id", "pre") is None
    # the profile without a userId, erased by forget (now): its older events stay out as well
    assert forget(r, Settings(), "default", "anonymous_id:lone")[0].status == "deleted"
    assert apply(r, [{"type": "page", "anonymousId": "lone", "messageId": "3b",
                      "timestamp": "2026-03-01T00:02:00Z"}])[0].status == "suppressed"
    assert find(r, "anonymous_id", "lone") is None
    # after the erasure, the same browser builds a new profile; what came before still stays out of it
    later = NOW + 3_600_000
    fresh = apply(r, [{"type": "page", "anonymousId": "pre", "messageId": "5", "timestamp": "2026-06-01T00:00:00Z"},
                      {"type": "page", "anonymousId": "lone", "messageId": "6", "timestamp": _iso(later)}],
                  now=later)
    assert [(o.status, o.created) for o in fresh] == [("ok", True), ("ok", True)]
    for anon, mid in (("pre", "1c"), ("lone", "3c")):
        assert apply(r, [{"type": "page", "anonymousId": anon, "messageId": mid,
                          "timestamp": "2026-03-01T00:03:00Z"}], now=later)[0].status == "suppressed"
    assert find(r, "anonymous_id", "pre").first_seen == 1780272000000  # 2026-06-01: nothing older came back
    assert find(r, "anonymous_id", "lone").first_seen == later
    # an older event that also names someone else applies to them, without the erased identifier
    both = apply(r, [{"type": "identify", "userId": "someone", "anonymousId": "pre", "messageId": "7",
                      "timestamp": "2026-03-01T00:04:00Z"}], now=later)[0]
    assert both.status == "ok" and both.created
    assert [(i.type, i.value) for i in find(r, "user_id", "someone").identifiers] == [("user_id", "someone")]
    assert find(r, "anonymous_id", "pre").first_seen == 1780272000000


def test_an_old_event_led_by_an_erased_email_stays_out_with_its_traits(r: redis.Redis) -> None:
    """An event from before an erasure whose first identifier (by priority) is one the erasure took, here the
    person's email, is the erased person's even with an anonymousId never seen: it is suppressed, not applied to
    a new profile through the anonymousId with the email and name as traits. One led by somebody else's userId
    still applies to them (without the erased identifier)."""
    apply(r, [{"type": "identify", "userId": "ada", "messageId": "1", "timestamp": "2026-03-01T00:00:00Z",
               "traits": {"email": "ada@example.com", "name": "Ada"}}])
    assert forget(r, Settings(), "default", "user_id:ada")[0].status == "deleted"
    old = {"type": "identify", "anonymousId": "never-seen", "messageId": "2", "timestamp": "2026-03-01T00:01:00Z",
           "traits": {"email": "ada@example.com", "name": "Ada"}}
    assert apply(r, [old])[0].status == "suppressed"
    assert find(r, "anonymous_id", "never-seen") is None
    other = {"type": "identify", "userId": "bob", "messageId": "3", "timestamp": "2026-03-01T00:02:00Z",
             "traits": {"email": "ada@example.com"}}
    assert apply(r, [other])[0].status == "ok"
    assert [(i.type, i.value) for i in find(r, "user_id", "bob").identifiers] == [("user_id", "bob")]


def test_what_a_deleted_users_late_event_links_is_erased_in_every_order(r: redis.Redis) -> None:
    """The event that links a browser's page views to a userId may arrive after that userId's deletion (a retry,
    an import of an old export): the page views are erased as if it had come first, whatever the order. A profile
    that another userId holds is someone else's (merge protection keeps them apart) and stays."""
    import itertools

    page = {"type": "page", "anonymousId": "pre", "messageId": "p", "timestamp": "2026-03-01T00:00:00Z"}
    login = {"type": "identify", "userId": "leaver", "anonymousId": "pre", "messageId": "i",
             "timestamp": "2026-03-01T00:05:00Z"}
    delete = {"type": "delete", "userId": "leaver", "messageId": "d", "timestamp": "2026-05-01T00:00:00Z"}
    k = Keys("default")
    for order in itertools.permutations([page, login, delete]):
        r.flushall()
        outcomes = apply(r, list(order))
        assert profiles(r) == [], [e["messageId"] for e in order]
        if order[-1] is login:  # the late identify erased the browser's profile: its logged events are purged
            assert outcomes[-1].status == "suppressed" and outcomes[-1].erased
            assert r.sismember(k.forgotten_ids, "pre")
        # the browser's later visits build a new profile, in every order
        assert apply(r, [{"type": "page", "anonymousId": "pre", "messageId": "later",
                          "timestamp": "2026-06-01T00:00:00Z"}])[0].created
    r.flushall()
    apply(r, [{"type": "identify", "userId": "other", "anonymousId": "shared", "messageId": "o",
               "timestamp": "2026-03-01T00:00:00Z"}, dict(delete)])
    late = apply(r, [{"type": "identify", "userId": "leaver", "anonymousId": "shared", "messageId": "l",
                      "timestamp": "2026-03-02T00:00:00Z"}])[0]
    assert late.status == "suppressed" and not late.erased
    # nor a browser's profile that an email names (someone a limit may have kept apart), or that was used after
    # the deletion (that visit was never the deleted person's), or while a rebuild runs
    apply(r, [{"type": "page", "anonymousId": "mailed", "messageId": "m", "timestamp": "2026-03-01T00:00:00Z",
               "context": {"traits": {"email": "colleague@example.com"}}},
              {"type": "page", "anonymousId": "again", "messageId": "a1", "timestamp": "2026-03-01T00:00:00Z"},
              {"type": "page", "anonymousId": "again", "messageId": "a2", "timestamp": "2026-06-01T00:00:00Z"},
              {"type": "page", "anonymousId": "building", "messageId": "b", "timestamp": "2026-03-01T00:00:00Z"}])
    for n, anon in enumerate(("mailed", "again", "building")):
        if anon == "building":
            r.hset(k.rebuild_status, "state", "running")
        else:
            r.delete(k.rebuild_status)
        late = apply(r, [{"type": "identify", "userId": "leaver", "anonymousId": anon, "messageId": f"late-{n}",
                          "timestamp": "2026-03-02T00:00:00Z"}])[0]
        assert late.status == "suppressed" and not late.erased and find(r, "anonymous_id", anon) is not None, anon
    assert {(i.type, i.value) for i in find(r, "user_id", "other").identifiers} == {("user_id", "other"),
                                                                                   ("anonymous_id", "shared")}


def test_deletions_of_an_older_version_still_suppress(r: redis.Redis) -> None:
    """Live events look up nothing in a space's deletions when they are later than its latest one, whose time
    the apply script keeps; data of a version that kept no such time still suppresses (the time is worked out
    again from the deletions), and so does a deletion stamped earlier than the latest."""
    k = Keys("default")
    apply(r, [{"type": "identify", "userId": u, "anonymousId": f"{u}-anon", "messageId": f"{u}-1",
               "timestamp": "2026-03-01T00:00:00Z"} for u in ("early", "late")])
    apply(r, [{"type": "delete", "userId": "late", "timestamp": "2026-05-01T00:00:00Z"},
              {"type": "delete", "userId": "early", "timestamp": "2026-04-01T00:00:00Z"}])
    assert r.get(k.deletions_latest) == b"1777593600000"  # 2026-05-01, the greater of the two
    r.delete(k.deletions_latest)  # as an older version left it
    for uid, ts in (("late", "2026-04-30T00:00:00Z"), ("early", "2026-03-31T00:00:00Z")):
        assert apply(r, [{"type": "track", "userId": uid, "event": "x", "messageId": f"{uid}-2",
                          "timestamp": ts}])[0].status == "suppressed"
        assert apply(r, [{"type": "page", "anonymousId": f"{uid}-anon", "messageId": f"{uid}-3",
                          "timestamp": ts}])[0].status == "suppressed"
    assert r.get(k.deletions_latest) == b"1777593600000"
    after = apply(r, [{"type": "track", "userId": "early", "event": "x", "messageId": "early-4",
                       "timestamp": "2026-04-15T00:00:00Z"}])[0]
    assert after.status == "ok" and after.created  # after its own deletion, before the space's latest


def test_forget_command_path(r: redis.Redis) -> None:
    apply(r, [{"type": "identify", "userId": "x", "messageId": "1", "timestamp": "2026-03-01T00:00:00Z"}])
    assert forget(r, Settings(), "default", "x")[0].status == "deleted"
    assert find(r, "user_id", "x") is None and r.xlen(Keys("default").log) == 0


def test_events_of_one_script_call_fail_alone_and_apply_in_order(r: redis.Redis) -> None:
    """Several events go in one call of the apply script: an event the script cannot apply is reported as an error
    for itself alone, and the events around it still apply, in their order."""
    import orjson

    from service.spec.events import normalise
    from service.spec.identity import IdentityRules
    from service.state.store import SCRIPT, Applier, _outcomes

    settings = Settings()
    rules = IdentityRules.from_settings(settings)
    raws = [{"type": "identify", "userId": "o1", "messageId": f"call-{n}", "traits": {"step": n},
             "timestamp": f"2026-03-01T00:00:0{n}Z"} for n in range(3)]
    now = int(time.time() * 1000)
    entries = [(normalise(e, now, rules), orjson.dumps(e), None) for e in raws]
    keys, args = Applier(settings).call_args(Keys("default"), entries, now)
    args[2 + 4 + 2] = b"{not json"  # the second event's JSON: the script cannot decode it
    replies = r.eval(SCRIPT, len(keys), *keys, *args)
    outcomes = _outcomes([replies], [3])
    assert [o.status for o in outcomes] == ["ok", "error", "ok"] and "store error" in outcomes[1].profile_id
    assert outcomes[0].created and outcomes[2].profile_id == outcomes[0].profile_id
    assert find(r, "user_id", "o1").traits["step"].value == 2
    assert [f[b"e"] for _, f in r.xrange(Keys("default").log)] == [orjson.dumps(raws[0]), orjson.dumps(raws[2])]


def test_a_failed_event_is_not_remembered_so_its_replay_applies(r: redis.Redis) -> None:
    """The script records an event's messageId before applying it; an event that then fails is not kept as seen,
    so that applying it again (the replay of its dead letter) applies it rather than calling it a duplicate."""
    import orjson

    from service.spec.events import normalise
    from service.spec.identity import IdentityRules
    from service.state.store import SCRIPT, Applier, _outcomes

    settings = Settings()
    rules = IdentityRules.from_settings(settings)
    raws = [{"type": "track", "event": "Page Viewed", "userId": "f1", "messageId": f"fail-{n}",
             "timestamp": f"2026-03-01T00:00:0{n}Z"} for n in range(2)]
    now = int(time.time() * 1000)
    entries = [(normalise(e, now, rules), orjson.dumps(e), None) for e in raws]
    keys, args = Applier(settings).call_args(Keys("default"), entries, now)
    # the second event decodes, passes the dedupe check, then fails (its identifiers are not a list)
    args[2 + 4 + 2] = orjson.dumps({"t": "track", "mid": "fail-1", "ts": 1, "uid": "f1", "ids": 5, "tr": [],
                                    "o": None, "a": None, "g": None, "al": None, "rv": None, "rc": 1, "ep": None})
    outcomes = _outcomes([r.eval(SCRIPT, len(keys), *keys, *args)], [2])
    assert [o.status for o in outcomes] == ["ok", "error"]
    again = apply(r, raws, settings, now=now)
    assert [o.status for o in again] == ["duplicate", "ok"]
    assert r.xlen(Keys("default").log) == 2


def test_plain_and_json_event_forms_give_the_same_state(r: redis.Redis, monkeypatch) -> None:
    """Most events reach the script in the plain form, the rest as JSON: the same events sent all as JSON build
    the very same profiles, and a messageId or identifier with a tab in it (JSON's) is kept exactly."""
    from service.spec.events import Event

    events = mixed_stream(3_000, users=60)
    events.append({"type": "track", "event": "Page Viewed", "userId": "tab\tuser", "messageId": "tab\tid",
                   "context": {"library": {"name": "analytics.js"}}, "timestamp": "2026-03-01T00:00:00Z"})
    # traits may hold tabs (the plain form carries them) but not its trait separator (JSON does)
    events += [{"type": "identify", "userId": "user-1", "messageId": f"odd-{n}", "timestamp": "2026-03-01T00:00:00Z",
                "traits": {name: value}} for n, (name, value) in enumerate(
                    [("tab\tname", "tab\tvalue"), ("unit\x1fsep", 1), ("note", "record\x1esep")])]
    # orders take the plain form too: sent twice (corrected), refunded or cancelled before or after, by known and
    # new people, with a key or category the plain form cannot carry (JSON's)
    rnd = random.Random(11)
    for n in range(400):
        user = rnd.randint(0, 40)
        key = f"ord-{user}-{rnd.randint(0, 3)}" if n % 50 else f"ord\x1f{n}"
        category = rnd.choice(["books", "toys", "a\x1db"])
        at = f"2026-03-0{rnd.randint(1, 9)}T00:00:{rnd.randint(0, 59):02d}Z"
        who = {"userId": f"user-{user}"} if rnd.random() < 0.9 else {"anonymousId": f"anon-o-{n}"}
        if rnd.random() < 0.7:
            events.append({"type": "track", "event": "Order Completed", "messageId": f"ord-{n}", "timestamp": at,
                           **who, "properties": {"order_id": key, "revenue": rnd.choice([10, 12.5, 99.99]),
                                                 "products": [{"category": category}]}})
        else:
            events.append({"type": "track", "event": rnd.choice(["Order Refunded", "Order Cancelled"]),
                           "messageId": f"ord-{n}", "timestamp": at, **who, "properties": {"order_id": key}})
    rnd.shuffle(events)
    apply(r, events)
    mixed = snapshot(r)
    orders = [o for p in mixed.values() for o in p["orders"]]
    assert len(orders) > 50 and any(len(p["orders"]) > 1 for p in mixed.values())
    assert find(r, "user_id", "tab\tuser") is not None
    r.flushall()
    monkeypatch.setattr(Event, "_plain", lambda self: None)
    apply(r, events)
    assert snapshot(r) == mixed


def test_the_events_index_holds_the_events_of_its_retention_and_no_backfill_older_than_that(r: redis.Redis) -> None:
    """A profile's /events index keeps the events of the log's retention; it is trimmed and its expiry moved once
    per period (a sixteenth of the retention, at most an hour), to the period's bounds, not at every event; an event
    already older than the retention when it arrives (a backfill) is not indexed at all."""
    from service.spec.events import iso_ms

    hour, minute = 3_600_000, 60_000
    settings = Settings(event_log_retention=8 * 3600)
    period = 30 * minute  # 8 h / 16
    start = int(time.time() * 1000) // period * period
    t0 = start + 5 * minute

    def at(n: int, received: int, happened: int) -> None:
        event = {"type": "track", "event": "Page Viewed", "userId": "ix", "messageId": f"ix-{n}",
                 "timestamp": iso_ms(happened)}
        assert apply(r, [event], settings, now=received)[0].status == "ok"

    def expiry(index: str) -> int:  # PEXPIRETIME needs Redis 7
        return int(time.time() * 1000) + int(r.pttl(index))

    def calls(index: str, command: str) -> int:  # on a Cluster, of the node holding the space
        node = {"target_nodes": r.get_node_from_key(index)} if isinstance(r, RedisCluster) else {}
        return int(r.info("commandstats", **node).get(f"cmdstat_{command}", {}).get("calls", 0))

    at(0, t0, t0 - 7 * hour - 45 * minute)  # within the retention: indexed
    index = state_keys(r, "default").events_index(find(r, "user_id", "ix").id)
    assert r.zcard(index) == 1 and abs(expiry(index) - (start + period + 8 * hour)) < 2_000
    zadds, trims = calls(index, "zadd"), calls(index, "zremrangebyscore")
    at(1, t0, t0 - 9 * hour)  # older than the retention: not indexed (not even added, then trimmed)
    assert r.zcard(index) == 1 and calls(index, "zadd") == zadds
    at(2, t0 + 10 * minute, t0 + 10 * minute)  # the same period: added, neither trimmed nor its expiry moved
    assert r.zcard(index) == 2 and calls(index, "zadd") == zadds + 1 and calls(index, "zremrangebyscore") == trims
    assert abs(expiry(index) - (start + period + 8 * hour)) < 2_000
    at(3, start + period, start + period)  # the next period: the first entry is past the retention, trimmed
    assert r.zcard(index) == 2 and calls(index, "zremrangebyscore") == trims + 1
    assert abs(expiry(index) - (start + 2 * period + 8 * hour)) < 2_000


@pytest.mark.parametrize("general", ["early", "late"])
def test_ties_at_the_same_millisecond_are_broken_by_messageid_in_any_order(r: redis.Redis, general: str) -> None:
    """Events of one millisecond, in every order: first seen (the profile's and the identifier's) is the smallest
    messageId, last seen the greatest. Both paths of the script read the messageIds only for such a tie: page
    views of a known person take the fast path, identify calls with traits the general one."""
    from itertools import permutations

    from service.spec.events import parse_timestamp

    def at(stamp: str, mids: tuple[str, ...], identify: bool) -> list[dict]:
        if identify:
            return [{"type": "identify", "userId": "tie", "messageId": m, "timestamp": stamp, "traits": {"m": m}}
                    for m in mids]
        return [{"type": "page", "userId": "tie", "messageId": m, "timestamp": stamp} for m in mids]

    known = {"type": "identify", "userId": "tie", "messageId": "m-id", "timestamp": "2026-03-01T11:00:00Z"}
    early = at("2026-03-01T10:00:00.000Z", ("mb", "ma", "mc"), general == "early")
    late = at("2026-03-01T12:00:00.000Z", ("nb", "na", "nc"), general == "late")
    for a, b in zip(permutations(early), permutations(late), strict=True):
        r.flushall()
        apply(r, [known])
        assert [o.status for o in apply(r, [*a, *b])] == ["ok"] * 6
        p = find(r, "user_id", "tie")
        assert (p.meta["fs"], p.meta["fm"]) == (str(parse_timestamp("2026-03-01T10:00:00Z")), "ma")
        assert (p.meta["ls"], p.meta["lm"]) == (str(parse_timestamp("2026-03-01T12:00:00Z")), "nc")
        assert [i.first_message_id for i in p.identifiers if i.type == "user_id"] == ["ma"]


def test_a_profile_with_thousands_of_traits_merges_whole_and_a_group_call_with_thousands_applies(
        r: redis.Redis) -> None:
    """Lua passes at most ~8,000 values to one command: a merge of a profile holding thousands of traits (three
    fields each) and a group call carrying thousands of account traits go to Redis in slices, never failing
    half-way through an event (which left the userId pointing at a profile without it or its traits)."""
    t = "2026-03-01T00:00:00Z"
    apply(r, [{"type": "identify", "userId": "wide", "messageId": f"w{n}", "timestamp": t,
               "traits": {f"t{n}_{i}": i for i in range(299)}} for n in range(12)])
    apply(r, [{"type": "page", "anonymousId": "narrow", "messageId": "n", "timestamp": t}])
    linked = apply(r, [{"type": "identify", "userId": "wide", "anonymousId": "narrow", "messageId": "link",
                        "timestamp": t}])[0]
    assert linked.status == "ok" and linked.merged == 1, linked
    merged = find(r, "user_id", "wide")
    assert merged is not None and merged.id == find(r, "anonymous_id", "narrow").id
    assert len(merged.traits) == 12 * 299
    group = apply(r, [{"type": "group", "userId": "wide", "groupId": "big-account", "messageId": "g", "timestamp": t,
                       "traits": {f"a{i}": i for i in range(5000)}}])[0]
    assert group.status == "ok", group
    assert r.hlen(state_keys(r, "default").account("big-account")) == 10_000  # value and stamp per trait
    assert list(find(r, "user_id", "wide").groups) == ["big-account"]


def test_a_limit_with_a_sliding_window_holds_in_every_stretch_of_that_length(r: redis.Redis) -> None:
    """`anonymous_id:5:weekly`, as Segment advises for ids that change constantly: a person who logs in from a
    new browser every week keeps getting them; five new browsers within one week are still the most."""
    week = 7 * 86_400_000
    weekly = Settings.from_env({"IDENTITY_LIMITS": "anonymous_id:5:weekly"})
    ever = Settings.from_env({"IDENTITY_LIMITS": "anonymous_id:5"})

    def logins(settings: Settings, gap_ms: int, newest_first: bool = False) -> list[set[str]]:
        r.flushall()
        for k in sorted(range(1, 8), reverse=newest_first):  # a page view from a new browser, then the login
            at = NOW - (8 - k) * gap_ms
            apply(r, [{"type": "page", "anonymousId": f"browser-{k}", "messageId": f"p{k}", "timestamp": _iso(at)},
                      {"type": "identify", "userId": "u1", "anonymousId": f"browser-{k}", "messageId": f"i{k}",
                       "timestamp": _iso(at + 60_000)}], settings=settings)
        return sorted(({f"{i.type}:{i.value}" for i in p.identifiers} for p in profiles(r)), key=len)

    weekly_logins = logins(weekly, week)
    assert len(weekly_logins) == 1 and len(weekly_logins[0]) == 8  # u1 and its seven browsers
    # an import of the same history newest first: browsers first seen after an event do not count against it
    assert logins(weekly, week, newest_first=True) == weekly_logins
    # the window of `*` is that of every type without a limit of its own
    assert logins(Settings.from_env({"IDENTITY_LIMITS": "*:5:weekly"}), week) == weekly_logins
    assert len(logins(ever, week)) == 3  # counted for ever: browsers 6 and 7 stay on profiles of their own
    within_a_week = logins(weekly, 3_600_000)  # seven browsers within seven hours
    assert len(within_a_week) == 3 and within_a_week[-1] >= {"user_id:u1", "anonymous_id:browser-5"}
    newest_first = logins(weekly, 3_600_000, newest_first=True)  # out of order, still five at most
    assert len(newest_first) == 3 and len(newest_first[-1]) == 6
    # a value is refused only where some week would hold more than the limit: browsers on days 0, 5 and 10 under
    # `anonymous_id:2:weekly` fit in any order (the week before and the week after the middle one hold two each;
    # the two weeks around it together were counted, and the middle one refused when it came last)
    pair = Settings.from_env({"IDENTITY_LIMITS": "anonymous_id:2:weekly"})
    states = []
    for order in ((0, 5, 10), (0, 10, 5), (10, 5, 0)):
        r.flushall()
        for day in order:
            apply(r, [{"type": "page", "userId": "u1", "anonymousId": f"day-{day}", "messageId": f"d{day}",
                       "timestamp": _iso(NOW - (20 - day) * 86_400_000)}], settings=pair)
        states.append(snapshot(r))
        assert {i.value for i in find(r, "user_id", "u1").identifiers} == {"u1", "day-0", "day-5", "day-10"}, order
    assert states[0] == states[1] == states[2]
    # and three within one week are one too many, whichever comes last
    for order, kept in (((0, 6, 3), {"d-0", "d-6"}), ((3, 6, 0), {"d-3", "d-6"}), ((6, 3, 0), {"d-3", "d-6"}),
                        ((0, 3, 6), {"d-0", "d-3"})):
        r.flushall()
        for day in order:
            apply(r, [{"type": "page", "userId": "u1", "anonymousId": f"d-{day}", "messageId": f"e{day}",
                       "timestamp": _iso(NOW - (20 - day) * 86_400_000)}], settings=pair)
        assert {i.value for i in find(r, "user_id", "u1").identifiers} == {"u1", *kept}, order
