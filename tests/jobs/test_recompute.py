"""Incremental refresh and full recompute over real Redis: identical aggregates, cost bound to the dirty set."""

from __future__ import annotations

import orjson
import pytest
import redis

from service.config import Settings
from service.spec.keys import Keys
from tests.helpers import NOW, apply, big_if_ltv_above, mixed_stream
from workers import mapreduce, recompute
from workers.recompute import full_recompute, refresh

K = Keys("default")


def state(r: redis.Redis) -> dict:
    out = {key: {k: orjson.loads(v) for k, v in r.hgetall(key).items()}
           for key in (K.clusters, K.patterns, K.cluster_aggregates, K.pattern_aggregates, K.contributions)}
    for name in ("high_value", "growth", "at_risk", "new"):
        out[name] = r.zrange(K.cluster_spend(name), 0, -1, withscores=True)
    return out


@pytest.mark.parametrize("parallel_from", [10**9, 1], ids=["one-process", "forked"])
def test_incremental_equals_full(r: redis.Redis, monkeypatch: pytest.MonkeyPatch, parallel_from: int) -> None:
    monkeypatch.setattr(recompute, "PARALLEL_REFRESH_FROM", parallel_from)
    s = Settings()
    events = mixed_stream(6000, users=150, seed=11)
    for i in range(0, len(events), 700):  # refresh after every slice, as the debounced job would
        apply(r, events[i:i + 700])
        report = refresh(r, s, "default", now_ms=NOW)
        assert report["profiles"] > 0
    incremental = state(r)
    assert r.scard(K.dirty) == 0
    full = full_recompute(r, s, "default", now_ms=NOW)
    assert full["profiles"] == 150
    assert state(r) == incremental
    parallel = full_recompute(r, s, "default", now_ms=NOW, processes=3)
    assert parallel["processes"] == 3 and parallel["changed_clusters"] == []
    assert state(r) == incremental
    queued: list[int] = []  # the chunk jobs it would queue; this process computes every chunk itself
    shared = mapreduce.full_recompute(r, s, "default", lambda space, run, chunks: queued.extend(chunks), now_ms=NOW)
    assert shared["chunks"] == shared["chunks_here"] == len(queued) == 1 and shared["changed_clusters"] == []
    assert state(r) == incremental and not r.exists(K.recompute_run)
    clusters = incremental[K.clusters]
    assert sum(c["n"] for c in clusters.values()) == 150
    assert {b"high_value", b"growth", b"at_risk", b"new"} >= set(clusters)
    kpi = next(iter(clusters.values()))["kpi"]
    assert set(kpi) >= {"n_customers", "avg_spend", "median_spend", "avg_frequency", "top_categories",
                        "share_of_revenue_pct", "insight"}


def test_each_kind_of_run_is_kept_for_the_status_with_its_result(r: redis.Redis) -> None:
    s = Settings()
    apply(r, [{"type": "identify", "userId": f"k{i}", "messageId": f"k{i}"} for i in range(4)])
    refresh(r, s, "default")
    runs = {k.decode(): orjson.loads(v) for k, v in r.hgetall(K.recompute_runs).items()}
    assert set(runs) == {"refresh"} and runs["refresh"]["profiles"] == 4 and runs["refresh"]["changed_clusters"] == 1
    assert runs["refresh"]["at_ms"] >= NOW and runs["refresh"]["seconds"] >= 0
    refresh(r, s, "default")  # nothing dirty: nothing ran, nothing recorded
    assert orjson.loads(r.hget(K.recompute_runs, "refresh")) == runs["refresh"]
    full_recompute(r, s, "default")
    full = orjson.loads(r.hget(K.recompute_runs, "full"))
    assert full["profiles"] == 4 and full["reason"] == "scheduled" and full["at_ms"] >= runs["refresh"]["at_ms"]


def test_refresh_reads_only_dirty_profiles_and_reports_moves(r: redis.Redis) -> None:
    s = Settings()
    apply(r, [{"type": "identify", "userId": f"u{i}", "messageId": f"i{i}", "timestamp": "2026-03-01T00:00:00Z",
               "traits": {"ltv": 50, "churn_risk": 0.2}} for i in range(10)])
    first = refresh(r, s, "default", now_ms=NOW)
    assert first["profiles"] == 10 and first["changed_clusters"] == ["new"]
    assert refresh(r, s, "default", now_ms=NOW)["profiles"] == 0  # nothing dirty, nothing read
    r.delete(K.changed_clusters)
    apply(r, [{"type": "identify", "userId": "u3", "messageId": "up", "timestamp": "2026-03-02T00:00:00Z",
               "traits": {"ltv": 900, "churn_risk": 0.01}}])
    moved = refresh(r, s, "default", now_ms=NOW)
    assert moved["profiles"] == 1
    assert moved["changed_clusters"] == ["high_value", "new"]
    assert r.smembers(K.changed_clusters) == {b"high_value", b"new"}
    clusters = {k.decode(): orjson.loads(v) for k, v in r.hgetall(K.clusters).items()}
    assert clusters["high_value"]["n"] == 1 and clusters["new"]["n"] == 9


def test_deleted_and_merged_profiles_leave_the_aggregates(r: redis.Redis) -> None:
    s = Settings()
    apply(r, [{"type": "page", "anonymousId": "a", "messageId": "1", "timestamp": "2026-03-01T00:00:00Z"},
              {"type": "identify", "userId": "u", "messageId": "2", "timestamp": "2026-03-01T00:00:00Z"}])
    refresh(r, s, "default", now_ms=NOW)
    assert sum(orjson.loads(v)["n"] for v in r.hvals(K.clusters)) == 2
    apply(r, [{"type": "identify", "userId": "u", "anonymousId": "a", "messageId": "3",
               "timestamp": "2026-03-01T00:01:00Z"}])
    refresh(r, s, "default", now_ms=NOW)
    assert sum(orjson.loads(v)["n"] for v in r.hvals(K.clusters)) == 1
    apply(r, [{"type": "delete", "userId": "u", "timestamp": "2026-03-02T00:00:00Z"}])
    refresh(r, s, "default", now_ms=NOW)
    assert r.hlen(K.clusters) == 0 and r.hlen(K.contributions) == 0


def test_median_follows_moves_through_the_spend_index(r: redis.Redis) -> None:
    s = Settings()
    apply(r, [{"type": "identify", "userId": f"u{i}", "messageId": f"i{i}", "timestamp": "2026-03-01T00:00:00Z",
               "traits": {"ltv": 50, "churn_risk": 0.1}} for i in range(5)])  # all five in "new"
    apply(r, [{"type": "track", "event": "Order Completed", "userId": f"u{i}", "messageId": f"o{i}",
               "timestamp": "2026-03-01T00:00:00Z", "properties": {"revenue": 10 * (i + 1)}} for i in range(5)])
    refresh(r, s, "default", now_ms=NOW)

    def card() -> dict:
        return orjson.loads(r.hget(K.clusters, "new"))["kpi"]

    assert card()["median_spend"] == 30.0  # 10 20 30 40 50
    apply(r, [{"type": "identify", "userId": "u4", "messageId": "hv", "timestamp": "2026-03-02T00:00:00Z",
               "traits": {"ltv": 900, "churn_risk": 0.01}}])
    refresh(r, s, "default", now_ms=NOW)
    assert card()["median_spend"] == 25.0 and card()["n_customers"] == 4  # 10 20 30 40; 50 moved out
    assert r.zcard(K.cluster_spend("high_value")) == 1 and r.zcard(K.cluster_spend("new")) == 4


def test_a_drifted_spend_index_is_detected_and_rebuilt(r: redis.Redis) -> None:
    s = Settings()
    apply(r, [{"type": "track", "event": "Order Completed", "userId": f"u{i}", "messageId": f"o{i}",
               "timestamp": "2026-03-01T00:00:00Z", "properties": {"revenue": 10 * (i + 1)}} for i in range(5)])
    refresh(r, s, "default", now_ms=NOW)
    healthy = state(r)
    r.zadd(K.cluster_spend("new"), {"stray": 1})  # e.g. written by a refresh that crashed half-way
    apply(r, [{"type": "page", "userId": "u0", "messageId": "p", "timestamp": "2026-03-01T00:00:00Z"}])
    report = refresh(r, s, "default", now_ms=NOW)
    assert report.get("full") and "spend index" in report["reason"]
    assert r.zscore(K.cluster_spend("new"), "stray") is None
    assert state(r)[K.cluster_aggregates] == healthy[K.cluster_aggregates]


@pytest.mark.parametrize("corrupt", [
    lambda r, pid: r.hset(K.contributions, pid, b"{not json"),
    lambda r, pid: r.hset(K.contributions, pid, orjson.dumps({"cluster": "new"})),
    lambda r, pid: r.hset(K.cluster_aggregates, "new", b"[1, 2"),
], ids=["contribution-not-json", "contribution-incomplete", "aggregate-not-json"])
def test_unreadable_stored_state_makes_the_refresh_rebuild(r: redis.Redis, corrupt) -> None:
    s = Settings()
    apply(r, [{"type": "identify", "userId": f"u{i}", "messageId": f"i{i}", "timestamp": "2026-03-01T00:00:00Z",
               "traits": {"ltv": 50, "churn_risk": 0.1}} for i in range(4)])
    refresh(r, s, "default", now_ms=NOW)
    healthy = state(r)
    corrupt(r, r.get(K.ident("user_id", "u0")).decode())  # the profile the next event touches
    apply(r, [{"type": "page", "userId": "u0", "messageId": "p", "timestamp": "2026-03-01T00:00:00Z"}])
    report = refresh(r, s, "default", now_ms=NOW)
    assert report.get("full") and r.scard(K.dirty) == 0
    assert state(r)[K.cluster_aggregates] == healthy[K.cluster_aggregates]
    assert state(r)[K.clusters] == healthy[K.clusters]


class _RepeatingScan(redis.Redis):
    """Real Redis whose SCAN hands some keys back twice, as SCAN may while a hash table is resized."""

    def scan_iter(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        for i, key in enumerate(super().scan_iter(*args, **kwargs)):
            yield key
            if i % 3 == 0:
                yield key


def test_full_recompute_counts_a_key_scan_returns_twice_once(r: redis.Redis) -> None:
    apply(r, mixed_stream(1500, users=40, seed=5))
    once = full_recompute(r, Settings(), "default", now_ms=NOW)
    expected = state(r)
    twice = _RepeatingScan(connection_pool=r.connection_pool)
    again = full_recompute(twice, Settings(), "default", now_ms=NOW)
    assert again["profiles"] == once["profiles"] == 40 and again["changed_clusters"] == []
    assert state(r) == expected


def test_taking_the_dirty_marks_never_loses_one_added_meanwhile(redis_url: str, r: redis.Redis) -> None:
    """The web marks profiles dirty at any moment; a refresh takes the marks while it does. Every mark added while
    marks are being taken ends up taken or still waiting, never dropped."""
    import threading

    from workers.recompute import _take

    stop, added = threading.Event(), []

    def web() -> None:
        client = redis.Redis.from_url(redis_url)
        while not stop.is_set():
            member = f"p{len(added)}"
            client.sadd("dirty", member)
            added.append(member)
        client.close()

    writer = threading.Thread(target=web)
    writer.start()
    for _ in range(1500):
        _take(r, "work", ["dirty"])
    stop.set()
    writer.join()
    _take(r, "work", ["dirty"])
    assert len(added) > 100 and {m.decode() for m in r.smembers("work")} == set(added)


def test_a_profile_forgotten_by_email_leaves_its_cluster_at_the_next_refresh(r: redis.Redis) -> None:
    from service.state.ops import forget

    s = Settings()
    apply(r, [{"type": "identify", "userId": f"c{i}", "messageId": f"c{i}", "timestamp": "2026-03-01T00:00:00Z",
               "traits": {"email": f"c{i}@example.com"}} for i in range(3)])
    refresh(r, s, "default", now_ms=NOW)
    [cluster] = [orjson.loads(v) for v in r.hvals(K.clusters)]
    assert cluster["n"] == 3
    forget(r, s, "default", "email:c1@example.com")
    refresh(r, s, "default", now_ms=NOW)
    [cluster] = [orjson.loads(v) for v in r.hvals(K.clusters)]
    assert cluster["n"] == 2 and r.hlen(K.contributions) == 2


@pytest.mark.parametrize("parallel_from", [10**9, 1], ids=["one-process", "forked"])
def test_recompute_after_a_rebuild(r: redis.Redis, monkeypatch: pytest.MonkeyPatch, parallel_from: int) -> None:
    """A rebuild switches the space to a new generation: refresh and full recompute read it (their forked
    workers' connections decode replies to text, which the generation's lookup must take too)."""
    from service.spec.clock import now_ms
    from service.state.rebuild import rebuild

    monkeypatch.setattr(recompute, "PARALLEL_REFRESH_FROM", parallel_from)
    s = Settings()
    apply(r, mixed_stream(600, users=40, seed=5), now=now_ms())  # created as logged: the rebuild's history covers them
    rebuild(r, s, "default")
    assert r.get(K.generation_key) == b"g1:"
    assert full_recompute(r, s, "default", now_ms=NOW, processes=2)["profiles"] == 40  # the job a rebuild queues
    apply(r, [{"type": "identify", "userId": "after-rebuild", "messageId": "ar", "traits": {"plan": "pro"}}])
    assert refresh(r, s, "default", now_ms=NOW)["profiles"] == 1
    incremental = state(r)
    assert full_recompute(r, s, "default", now_ms=NOW, processes=2)["profiles"] == 41 and state(r) == incremental


def test_a_forked_worker_that_cannot_start_fails_the_recompute_rather_than_hang() -> None:
    """multiprocessing's Pool replaces a process whose initializer raised, for ever: a worker that cannot reach
    Redis must end the recompute with its error."""
    import socket
    import threading

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gone = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    job = (recompute._pool_args(gone), Settings(), "default", NOW)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            with recompute._chunk_map(recompute._full_chunk, [["use_1"], ["use_2"]], job, 2) as parts:
                list(parts)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - what the recompute would raise
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert outcome and isinstance(outcome[0], redis.ConnectionError), outcome


def test_an_accounts_new_traits_reach_every_member_at_the_next_refresh(r: redis.Redis) -> None:
    """Each member's contribution carries its account's traits (industry, plan): when a group call changes them,
    the refresh recomputes every member, not only the one that sent it, and agrees with a full recompute."""
    s = Settings()

    def group(user: str, mid: str, ts: str, traits: dict | None = None) -> dict:
        return {"type": "group", "userId": user, "groupId": "g1", "messageId": mid, "timestamp": ts,
                "traits": traits or {}}

    apply(r, [group("A", "g-a", "2026-03-01T00:00:00Z", {"industry": "SaaS"}),
              group("B", "g-b", "2026-03-01T00:00:00Z"), group("C", "g-c", "2026-03-01T00:00:00Z")])
    assert refresh(r, s, "default", now_ms=NOW)["profiles"] == 3
    apply(r, [group("A", "g-a2", "2026-03-02T00:00:00Z", {"industry": "Retail"})])
    assert refresh(r, s, "default", now_ms=NOW)["profiles"] == 3  # A, and the account's other members
    incremental = state(r)
    assert full_recompute(r, s, "default", now_ms=NOW)["profiles"] == 3 and state(r) == incremental
    # the same traits again (analytics.js sends them with every group call): only the sender is recomputed
    apply(r, [group("B", "g-b2", "2026-03-03T00:00:00Z", {"industry": "Retail"})])
    assert refresh(r, s, "default", now_ms=NOW)["profiles"] == 1


def test_a_refresh_on_a_later_day_equals_a_full_recompute(r: redis.Redis) -> None:
    """Churn, 30-day sessions and the spend window move with time for profiles nobody touched: the first refresh
    of a new UTC day recomputes everything, so an order that left the window, or a visit now 32 days old, leaves
    the cards of a person who sent nothing since."""
    from service.spec.keys import DAY_MS
    from tests.helpers import _iso

    s, t0 = Settings(), NOW - 360 * DAY_MS
    apply(r, [{"type": "identify", "userId": "a", "messageId": "i1", "timestamp": _iso(t0), "traits": {"ltv": 900}},
              {"type": "page", "userId": "a", "messageId": "p1", "timestamp": _iso(NOW - 12 * DAY_MS)},
              {"type": "track", "event": "Order Completed", "userId": "a", "messageId": "o1", "timestamp": _iso(t0),
               "properties": {"order_id": "A1", "revenue": 100, "products": [{"category": "books"}]}},
              {"type": "identify", "userId": "b", "messageId": "i2", "timestamp": _iso(t0),
               "traits": {"ltv": 50, "churn_risk": 0.1}}])
    refresh(r, s, "default", now_ms=NOW)
    later = NOW + 20 * DAY_MS  # A1 is out of the 365-day window, the page view out of the 30-day sessions
    apply(r, [{"type": "identify", "userId": "b", "messageId": "i3", "timestamp": _iso(NOW),
               "traits": {"plan": "pro"}}])
    report = refresh(r, s, "default", now_ms=later)
    assert report["full"] and "new UTC day" in report["reason"]
    refreshed = state(r)
    full_recompute(r, s, "default", now_ms=later)
    assert refreshed == state(r)
    # within the day, refreshes stay incremental
    apply(r, [{"type": "identify", "userId": "b", "messageId": "i4", "timestamp": _iso(NOW),
               "traits": {"plan": "x"}}])
    assert "full" not in refresh(r, s, "default", now_ms=later // DAY_MS * DAY_MS + DAY_MS - 1)


def test_a_refresh_under_changed_cluster_rules_equals_a_full_recompute(r: redis.Redis, tmp_path) -> None:
    """New cluster rules (or analysis window, or insight rule) apply to every profile at the next refresh, not
    only to those with new events."""
    rules = tmp_path / "rules.json"

    def write(threshold: int) -> None:
        big_if_ltv_above(rules, threshold)

    write(500)
    s = Settings(cluster_rules_file=str(rules))
    apply(r, [{"type": "identify", "userId": f"u{i}", "messageId": f"i{i}", "timestamp": "2026-03-01T00:00:00Z",
               "traits": {"ltv": 900, "churn_risk": 0.1}} for i in range(3)])
    refresh(r, s, "default", now_ms=NOW)
    write(1000)
    apply(r, [{"type": "identify", "userId": "u0", "messageId": "x", "timestamp": "2026-03-02T00:00:00Z",
               "traits": {"plan": "pro"}}])
    report = refresh(r, s, "default", now_ms=NOW)
    assert report["full"] and "rules" in report["reason"]
    assert {k.decode(): orjson.loads(v)["n"] for k, v in r.hgetall(K.clusters).items()} == {"small": 3}


def test_a_recompute_process_connects_to_a_cluster_as_the_worker_does(redis_cluster) -> None:
    """A forked recompute process (and a chunk job's decoded client) opens its own connections with the worker's
    connection class: with ``rediss://`` that class is what makes them TLS, and it was dropped for a Cluster."""
    from redis.cluster import RedisCluster
    from redis.connection import Connection

    class Marked(Connection):
        pass

    worker = RedisCluster.from_url(redis_cluster.url, connection_class=Marked)
    try:
        child = recompute.connect_decoded(worker)
        child.ping()
        assert child.get_default_node().redis_connection.connection_pool.connection_class is Marked
        child.close()
    finally:
        worker.close()


def test_a_refresh_whose_clock_is_behind_the_last_recompute_does_not_go_back_a_day(r: redis.Redis) -> None:
    """A refresh that waited for the lock over midnight (or runs on a host whose clock is behind) computes as of
    the day already recorded, instead of a full recompute for the day before and another after it."""
    from service.spec.keys import DAY_MS

    s = Settings()
    apply(r, [{"type": "identify", "userId": f"c{i}", "messageId": f"c{i}", "traits": {"ltv": 5}} for i in range(3)])
    full_recompute(r, s, "default", now_ms=NOW + DAY_MS)
    recorded = r.get(K.recompute_basis)
    apply(r, [{"type": "identify", "userId": "c0", "messageId": "c0b", "traits": {"plan": "pro"}}])
    report = refresh(r, s, "default", now_ms=NOW)
    assert "full" not in report and report["profiles"] == 1
    assert r.get(K.recompute_basis) == recorded
