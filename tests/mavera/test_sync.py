"""Persona sync end to end: real Redis, the real recompute, and the loopback Mavera-compatible server."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from service.config import Settings
from service.spec.keys import Keys
from service.state.ops import paused, resume
from tests.helpers import NOW, apply
from tests.mavera_server import API_KEY, MaveraServer
from workers.mavera.client import MaveraClient
from workers.mavera.sync import SyncFailed, narrate_space, persona_name, persona_payload, sync_space
from workers.recompute import refresh

BOTH_BACKENDS = True  # each test runs on a standalone Redis and on a Redis Cluster (tests/conftest.py)

K = Keys("default")


@pytest.fixture
def mavera() -> Iterator[MaveraServer]:
    with MaveraServer() as server:
        yield server


def settings_for(server: MaveraServer | None) -> Settings:
    if server is None:
        return Settings()
    return settings_for_url(server.url)


def settings_for_url(url: str) -> Settings:
    return Settings(mavera_api_key=API_KEY, mavera_base_url=url, mavera_timeout=1.0)


def client_for(server: MaveraServer, r: redis.Redis) -> MaveraClient:
    return MaveraClient(settings_for(server), r, base_delay=0.05)


def people(r: redis.Redis, tag: str, n: int, ltv: float, churn: float, ts: str = "2026-03-01T00:00:00Z") -> None:
    apply(r, [{"type": "identify", "userId": f"{tag}-{i}", "messageId": f"{tag}-{i}-{ts}", "timestamp": ts,
               "traits": {"ltv": ltv, "churn_risk": churn, "plan": "pro", "industry": "SaaS"},
               "context": {"library": {"name": "analytics-ios"}}} for i in range(n)])


def seed(r: redis.Redis) -> None:
    people(r, "hv", 4, 900, 0.05)
    people(r, "risk", 3, 50, 0.7)
    people(r, "tiny", 1, 200, 0.2)  # "new" cluster with 1 profile: below MIN_CLUSTER_SIZE
    refresh(r, Settings(), "default", now_ms=NOW)


def records(r: redis.Redis) -> dict:
    return {k.decode(): orjson.loads(v) for k, v in r.hgetall(K.personas).items()}


def test_created_once_then_unchanged_then_patched(mavera: MaveraServer, r: redis.Redis) -> None:
    seed(r)
    client = client_for(mavera, r)
    first = sync_space(r, settings_for(mavera), "default", client)
    assert sorted(first["created"]) == ["at_risk", "high_value"] and first["small"] == ["new"]
    assert mavera.state.credits == 600
    assert {c["json"]["name"] for c in mavera.calls("POST", "/personas")} == {
        "High-value customers · default", "At-risk customers · default"}
    body = mavera.calls("POST", "/personas")[0]["json"]
    assert set(body) <= {"name", "description", "pipeline_type", "type", "industry", "goals", "pains", "values",
                         "purchase_cadence"}
    before = len(mavera.state.requests)
    again = sync_space(r, settings_for(mavera), "default", client)
    assert sorted(again["unchanged"]) == ["at_risk", "high_value"] and len(mavera.state.requests) == before
    # one more high-value customer changes that cluster's summary only
    people(r, "hv2", 1, 1500, 0.01, ts="2026-03-02T00:00:00Z")
    changed = refresh(r, Settings(), "default", now_ms=NOW)["changed_clusters"]
    assert changed == ["high_value"]
    third = sync_space(r, settings_for(mavera), "default", client)
    assert third["updated"] == ["high_value"] and third["unchanged"] == ["at_risk"]
    [patch] = mavera.calls("PATCH")
    assert patch["path"] == f"/personas/{records(r)['high_value']['mavera_id']}"
    assert "5 customers" in patch["json"]["description"]
    assert len(mavera.calls("POST", "/personas")) == 2
    rec = records(r)["high_value"]
    assert rec["state"] == "synced" and rec["last_sync_ms"] and rec["mavera_id"].startswith("per_")


def test_the_persona_names_the_clusters_top_categories_as_the_kpi_card_has_them(mavera: MaveraServer,
                                                                               r: redis.Redis) -> None:
    seed(r)
    apply(r, [{"type": "track", "event": "Order Completed", "userId": f"hv-{i}", "messageId": f"o{i}",
               "timestamp": "2026-03-01T00:00:00Z",
               "properties": {"order_id": f"o{i}", "revenue": 100, "products": [{"category": "books"}]}}
              for i in range(4)])
    refresh(r, Settings(), "default", now_ms=NOW)
    sync_space(r, settings_for(mavera), "default", client_for(mavera, r))
    [body] = [c["json"] for c in mavera.calls("POST", "/personas") if c["json"]["name"] == HIGH_VALUE]
    assert "Top categories: books." in body["description"], body["description"]


AT_RISK, HIGH_VALUE = "At-risk customers · default", "High-value customers · default"


def test_a_create_that_times_out_is_never_duplicated(mavera: MaveraServer, r: redis.Redis) -> None:
    """Our side gives up after MAVERA_TIMEOUT while Mavera is still creating: the lookup right after finds
    nothing, so the sync waits the grace period, looks again and adopts; it never creates a second one."""
    seed(r)
    mavera.fault("POST", "/personas", sleep=2.5)  # the first create (at_risk) finishes 1.5 s after we gave up
    client = client_for(mavera, r)
    with pytest.raises(SyncFailed, match="ReadTimeout") as failed:
        sync_space(r, settings_for(mavera), "default", client)
    assert failed.value.retry == ["at_risk"]
    with pytest.raises(SyncFailed, match="settle"):  # too soon: the lost create is still running
        sync_space(r, settings_for(mavera), "default", client)
    time.sleep(2.1)  # the grace period: twice MAVERA_TIMEOUT
    report = sync_space(r, settings_for(mavera), "default", client)
    assert report["adopted"] == ["at_risk"] and report["created"] == [], report
    assert len(mavera.named(AT_RISK)) == 1 and len(mavera.named(HIGH_VALUE)) == 1
    assert mavera.state.credits == 600  # two personas, never a third
    assert mavera.calls("PATCH") == []  # Mavera holds what the create sent
    assert all(rec["state"] == "synced" for rec in records(r).values())


def test_a_lost_create_that_mavera_performed_is_adopted_in_the_same_job_without_a_patch(
        mavera: MaveraServer, r: redis.Redis) -> None:
    seed(r)
    mavera.fault("POST", "/personas", lose=True)  # at_risk is created, its answer lost
    client = client_for(mavera, r)
    report = sync_space(r, settings_for(mavera), "default", client)  # no grace period, no failed job
    assert report["adopted"] == ["at_risk"] and report["created"] == ["high_value"], report
    assert len(mavera.named(AT_RISK)) == 1 and mavera.state.credits == 600
    assert mavera.calls("PATCH") == []  # its fields already hold the payload
    rec = records(r)["at_risk"]
    assert rec["state"] == "synced" and rec["mavera_id"] == mavera.named(AT_RISK)[0]["id"]
    assert "uncertain_create_ms" not in rec
    before = len(mavera.state.requests)
    again = sync_space(r, settings_for(mavera), "default", client)  # recorded as sent: not PATCHed later either
    assert sorted(again["unchanged"]) == ["at_risk", "high_value"] and len(mavera.state.requests) == before


def test_an_adopted_persona_whose_fields_differ_is_patched_once(mavera: MaveraServer, r: redis.Redis) -> None:
    """A lost create, a lookup that fails right after, then the cluster changes: the next sync, well inside the
    grace period, finds the persona with the old fields, adopts it and PATCHes it once."""
    seed(r)
    settings = Settings(mavera_api_key=API_KEY, mavera_base_url=mavera.url, mavera_timeout=10.0)  # grace: 20 s
    client = MaveraClient(settings, r, base_delay=0.05)
    mavera.fault("POST", "/personas", lose=True)  # at_risk is created, its answer lost
    mavera.fault("GET", "/personas", status=503, skip=1, times=5)  # the first listing passes, the lookup fails
    with pytest.raises(SyncFailed, match="at_risk") as failed:
        sync_space(r, settings, "default", client)
    assert failed.value.retry == ["at_risk"] and records(r)["at_risk"]["uncertain_create_ms"]
    people(r, "risk3", 1, 40, 0.9, ts="2026-03-03T00:00:00Z")
    assert "at_risk" in refresh(r, Settings(), "default", now_ms=NOW)["changed_clusters"]
    report = sync_space(r, settings, "default", client)
    assert report["adopted"] == ["at_risk"] and report["created"] == [], report
    persona = mavera.named(AT_RISK)[0]
    assert [c["path"] for c in mavera.calls("PATCH")] == [f"/personas/{persona['id']}"]
    assert mavera.calls("PATCH")[0]["json"] == records(r)["at_risk"]["payload"]
    assert persona["description"].startswith("4 customers")
    assert mavera.state.credits == 600 and len(mavera.named(AT_RISK)) == 1
    before = len(mavera.state.requests)
    again = sync_space(r, settings, "default", client)
    assert sorted(again["unchanged"]) == ["at_risk", "high_value"] and len(mavera.state.requests) == before


def test_a_lost_create_mavera_never_performed_waits_the_grace_then_creates_once(mavera: MaveraServer,
                                                                                  r: redis.Redis) -> None:
    """Nothing is listed right after the lost create: it might still be in flight, so no second create before
    the grace period; after it, one create."""
    people(r, "risk", 3, 50, 0.7)
    refresh(r, Settings(), "default", now_ms=NOW)
    mavera.fault("POST", "/personas", status=503, lose=True)  # dropped before Mavera created anything
    client = client_for(mavera, r)
    with pytest.raises(SyncFailed, match="at_risk") as failed:
        sync_space(r, settings_for(mavera), "default", client)
    assert failed.value.retry == ["at_risk"]
    [lost] = mavera.calls("POST", "/personas")
    assert [c for c in mavera.calls("GET", "/personas") if c["at"] > lost["at"]]  # looked for it at once
    looked = len(mavera.calls("GET", "/personas"))
    with pytest.raises(SyncFailed, match="settle"):
        sync_space(r, settings_for(mavera), "default", client)
    assert len(mavera.calls("GET", "/personas")) == looked + 1  # looked again, found nothing, created nothing
    assert len(mavera.calls("POST", "/personas")) == 1 and mavera.state.personas == {}
    time.sleep(2.1)  # the grace period: twice MAVERA_TIMEOUT
    report = sync_space(r, settings_for(mavera), "default", client)
    assert report["created"] == ["at_risk"] and report["adopted"] == [], report
    posts = mavera.calls("POST", "/personas")
    assert len(posts) == 2 and posts[1]["at"] - lost["at"] >= 2.0
    assert len(mavera.named(AT_RISK)) == 1 and mavera.state.credits == 300
    assert records(r)["at_risk"]["state"] == "synced"


def test_a_refresh_right_after_a_rebuild_switch_sends_true_counts(mavera: MaveraServer, r: redis.Redis) -> None:
    """A rebuild switches the space to a new generation of profile ids: the stored contributions are the old ids'.
    A refresh before the queued full recompute ran added the new ids on top (5 customers for 4); it runs the full
    recompute instead."""
    from service.state.rebuild import rebuild

    seed(r)  # high_value: 4 profiles
    client = client_for(mavera, r)
    sync_space(r, settings_for(mavera), "default", client)
    # forced: the profiles were stamped with the suite's start as their receipt, before the log's first entry
    rebuild(r, Settings(), "default", force=True)
    people(r, "hv", 1, 900, 0.05, ts="2026-03-03T00:00:00Z")  # a known customer comes back at once
    report = refresh(r, Settings(), "default", now_ms=NOW)
    assert report.get("reason") == "a rebuild switched the space to another generation of profiles", report
    assert orjson.loads(r.hget(K.clusters, "high_value"))["n"] == 4
    sync_space(r, settings_for(mavera), "default", client)
    assert mavera.state.personas[records(r)["high_value"]["mavera_id"]]["description"].startswith("4 ")


def test_outbox_then_key_configured_pushes_once(mavera: MaveraServer, r: redis.Redis) -> None:
    seed(r)
    outbox = sync_space(r, Settings(), "default", None)
    assert sorted(outbox["outbox"]) == ["at_risk", "high_value"]
    assert {rec["state"] for rec in records(r).values()} == {"outbox"}
    assert records(r)["high_value"]["payload"]["name"] == "High-value customers · default"
    client = client_for(mavera, r)
    assert sorted(sync_space(r, settings_for(mavera), "default", client)["created"]) == ["at_risk", "high_value"]
    assert sync_space(r, settings_for(mavera), "default", client)["created"] == []
    assert mavera.state.credits == 600


def test_402_pauses_sync_and_resume_continues(mavera: MaveraServer, r: redis.Redis) -> None:
    seed(r)
    mavera.fault("GET", "/personas", status=402, message="Credits exhausted")
    client = client_for(mavera, r)
    report = sync_space(r, settings_for(mavera), "default", client)
    assert report["paused"] and paused(r)
    calls = len(mavera.state.requests)
    sync_space(r, settings_for(mavera), "default", client)
    assert len(mavera.state.requests) == calls  # paused: no call at all
    resume(r)
    assert sorted(sync_space(r, settings_for(mavera), "default", client)["created"]) == ["at_risk", "high_value"]


def test_400_marks_the_cluster_failed_with_mavera_message(mavera: MaveraServer, r: redis.Redis) -> None:
    seed(r)
    mavera.fault("POST", "/personas", status=400, message="description too long")
    with pytest.raises(SyncFailed, match="description too long"):
        sync_space(r, settings_for(mavera), "default", client_for(mavera, r))
    states = {c: rec["state"] for c, rec in records(r).items()}
    assert sorted(states.values()) == ["failed", "synced"]


def test_a_refused_payload_is_not_resent_until_it_changes_or_its_job_is_requeued(mavera: MaveraServer,
                                                                                 r: redis.Redis) -> None:
    seed(r)
    client = client_for(mavera, r)
    mavera.fault("POST", "/personas", status=400, message="description too long")
    with pytest.raises(SyncFailed, match="description too long"):
        sync_space(r, settings_for(mavera), "default", client, job_id="job-1")
    [refused] = [c for c, rec in records(r).items() if rec["state"] == "failed"]
    posts = len(mavera.calls("POST"))
    later = sync_space(r, settings_for(mavera), "default", client, job_id="job-2")  # a new sync: not sent again
    assert later["refused"] == [refused] and len(mavera.calls("POST")) == posts
    assert records(r)[refused]["error"] == "Mavera 400: description too long (api_error)"
    retried = sync_space(r, settings_for(mavera), "default", client, job_id="job-1")  # `rq requeue` of job-1
    assert retried["created"] == [refused] and records(r)[refused]["state"] == "synced"


def test_a_refused_payload_is_sent_again_once_it_changed(mavera: MaveraServer, r: redis.Redis) -> None:
    seed(r)
    client = client_for(mavera, r)
    mavera.fault("POST", "/personas", status=400, message="description too long")
    with pytest.raises(SyncFailed):
        sync_space(r, settings_for(mavera), "default", client, job_id="job-1")
    [refused] = [c for c, rec in records(r).items() if rec["state"] == "failed"]
    tag, ltv, churn = ("hv3", 2000, 0.01) if refused == "high_value" else ("risk3", 40, 0.9)
    people(r, tag, 1, ltv, churn, ts="2026-03-03T00:00:00Z")
    refresh(r, Settings(), "default", now_ms=NOW)
    assert sync_space(r, settings_for(mavera), "default", client, job_id="job-2")["created"] == [refused]


def test_a_worker_killed_mid_create_never_leads_to_a_second_persona(mavera: MaveraServer, redis_url: str,
                                                                     redis_backend: str, r: redis.Redis) -> None:
    """SIGKILL (OOM, RQ's hard timeout) while the POST is at Mavera: Mavera creates the persona, we never store
    its id. The next sync must wait for the create to settle, then adopt it by name."""
    seed(r)
    mavera.fault("POST", "/personas", sleep=1.0)
    code = ("from service.state.connect import connect; from workers.mavera.client import MaveraClient; "
            "from tests.mavera.test_sync import settings_for_url, sync_space; "
            f"r = connect({redis_url!r}, cluster={redis_backend == 'cluster'}); "
            f"s = settings_for_url({mavera.url!r}); "
            "sync_space(r, s, 'default', MaveraClient(s, r))")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2])
    deadline = time.monotonic() + 20
    while not mavera.calls("POST") and time.monotonic() < deadline:
        time.sleep(0.02)
    child.kill()
    child.wait()
    time.sleep(1.2)  # the POST completes at Mavera after its sleep
    assert len(mavera.calls("POST")) == 1 and len(mavera.state.personas) == 1
    [(cluster, rec)] = [(c, rec) for c, rec in records(r).items() if rec.get("state") == "creating"]
    assert not rec.get("mavera_id") and rec["uncertain_create_ms"]
    client = client_for(mavera, r)
    with pytest.raises(SyncFailed, match=f"{cluster}: (waiting for a lost create to settle|another worker is "
                                          "creating)") as failed:  # the dead worker's lock, or its mark
        sync_space(r, settings_for(mavera), "default", client)  # the other cluster is created meanwhile
    assert failed.value.retry == [cluster]
    time.sleep(3.2)  # the grace period (2 x MAVERA_TIMEOUT) and the dead worker's lock (3 x) have lapsed
    report = sync_space(r, settings_for(mavera), "default", client)
    assert report["adopted"] == [cluster] and report["created"] == [], report
    assert mavera.state.credits == 600 and len(mavera.state.personas) == 2
    assert mavera.calls("PATCH") == []  # the dead worker's create sent this very payload
    assert sorted(p["name"] for p in mavera.state.personas.values()) == sorted(
        rec["name"] for rec in records(r).values() if rec["state"] == "synced")


def test_a_persona_deleted_at_mavera_is_created_again_once(mavera: MaveraServer, r: redis.Redis) -> None:
    seed(r)
    client = client_for(mavera, r)
    sync_space(r, settings_for(mavera), "default", client)
    gone = records(r)["high_value"]["mavera_id"]
    del mavera.state.personas[gone]  # someone deleted it in Mavera's app
    people(r, "hv2", 1, 1500, 0.01, ts="2026-03-02T00:00:00Z")
    refresh(r, Settings(), "default", now_ms=NOW)
    report = sync_space(r, settings_for(mavera), "default", client)  # PATCH 404 → look up by name → create
    assert report["created"] == ["high_value"] and records(r)["high_value"]["mavera_id"] != gone
    assert records(r)["high_value"]["state"] == "synced" and mavera.state.credits == 900
    assert len(mavera.named("High-value customers · default")) == 1


def test_a_create_is_not_sent_once_its_lock_lapsed(mavera: MaveraServer, r: redis.Redis) -> None:
    seed(r)
    mavera.fault("GET", "/personas", sleep=0.6)  # while the worker lists, its lock lapses (Redis lost it)
    lapse = threading.Timer(0.3, lambda: r.delete(*r.scan_iter(match="sps:{default}:w:plock:*")))
    lapse.start()
    with pytest.raises(SyncFailed, match="lost the create lock") as failed:
        sync_space(r, settings_for(mavera), "default", client_for(mavera, r))
    lapse.join()
    assert "at_risk" in failed.value.retry
    assert [c["json"]["name"] for c in mavera.calls("POST", "/personas")] == ["High-value customers · default"]


LONG_CLUSTER = "enterprise_accounts_with_declining_weekly_usage_in_the_last_quarter"[:64]
LONG_SPACES = ("acme-production-eu-west-1-webshop-segment-source-0001",
               "acme-production-eu-west-1-webshop-segment-source-0002")


def test_persona_names_stay_distinct_per_space_and_cluster_within_mavera_s_length() -> None:
    """The name is how a lost create is found again, and any persona listed under it is taken: a name too long for
    Mavera shortens the label, keeps the space id whole, and still differs between spaces and between clusters."""
    names = {persona_name(space, {"cluster": cluster, "label": cluster.replace("_", " ").capitalize()})
             for space in (*LONG_SPACES, "s" * 64) for cluster in (LONG_CLUSTER, LONG_CLUSTER[:-1] + "x")}
    assert len(names) == 6 and all(2 <= len(n) <= 100 for n in names)
    assert {n.rsplit(" · ", 1)[1] for n in names} == {*LONG_SPACES, "s" * 64}
    assert persona_name("default", {"cluster": "high_value", "label": "High-value customers"}) == HIGH_VALUE


def test_two_spaces_with_long_names_get_a_persona_each(mavera: MaveraServer, r: redis.Redis,
                                                       tmp_path: Path) -> None:
    """Two spaces whose ids share a long prefix, one long cluster name: each space creates its own persona and
    PATCHes only its own (before, the names were cut to the same 100 characters and the second space adopted and
    overwrote the first one's persona)."""
    rules = tmp_path / "rules.json"
    rules.write_bytes(orjson.dumps({"rules": [{"cluster": LONG_CLUSTER,
                                               "all": [{"feature": "ltv", "op": ">", "value": 0}]}],
                                    "default": "new"}))
    settings = Settings(mavera_api_key=API_KEY, mavera_base_url=mavera.url, mavera_timeout=1.0,
                        cluster_rules_file=str(rules))
    client = client_for(mavera, r)
    for space, ltv in zip(LONG_SPACES, (900, 100), strict=True):
        apply(r, [{"type": "identify", "userId": f"{space[-4:]}-{i}", "messageId": f"{space[-4:]}-{i}",
                   "timestamp": "2026-03-01T00:00:00Z", "traits": {"ltv": ltv}} for i in range(4)], space=space)
        refresh(r, settings, space, now_ms=NOW)
        assert sync_space(r, settings, space, client)["created"] == [LONG_CLUSTER]
    ids = [orjson.loads(r.hget(Keys(space).personas, LONG_CLUSTER))["mavera_id"] for space in LONG_SPACES]
    assert ids[0] != ids[1] and len(mavera.state.personas) == 2
    assert [p["name"].rsplit(" · ", 1)[1] for p in mavera.state.personas.values()] == list(LONG_SPACES)


def test_cents_do_not_make_a_new_persona_payload() -> None:
    doc = {"cluster": "growth", "label": "Growth customers", "n": 40,
           "summary": {"avg_ltv": 250.11, "avg_purchases": 3.02, "avg_churn": 0.1, "industries": [], "plans": []},
           "kpi": {"avg_spend": 120.4, "median_spend": 99.99, "avg_frequency": 3.01, "share_of_revenue_pct": 21.2,
                   "top_categories": "tea, coffee", "insight": ""}}
    nudged = {**doc, "summary": {**doc["summary"], "avg_ltv": 250.32},
              "kpi": {**doc["kpi"], "avg_spend": 120.45, "share_of_revenue_pct": 21.4}}
    assert persona_payload("default", doc) == persona_payload("default", nudged)
    assert "Top categories: tea, coffee." in persona_payload("default", doc)["description"]
    grown = {**doc, "n": 41}
    assert persona_payload("default", doc) != persona_payload("default", grown)


def test_narrative_asks_mave_once_per_material_change(mavera: MaveraServer, r: redis.Redis) -> None:
    now_ts = "2026-11-20T10:00:00Z"
    people(r, "mob", 4, 300, 0.1, ts=now_ts)
    refresh(r, Settings(), "default")
    client = client_for(mavera, r)
    assert narrate_space(r, Settings(), "default", None)["state"] == "outbox"
    first = narrate_space(r, settings_for(mavera), "default", client)
    assert first["state"] == "synced"
    stored = r.hgetall(K.narrative)
    assert stored[b"content"].startswith(b"Unified persona framework") and stored[b"thread_id"]
    assert b"MOBILE" in mavera.calls("POST", "/mave/chat")[0]["json"]["message"].upper().encode()
    assert narrate_space(r, settings_for(mavera), "default", client)["state"] == "unchanged"
    apply(r, [{"type": "page", "userId": f"web-{i}", "messageId": f"w{i}", "timestamp": now_ts}
              for i in range(3)])
    refresh(r, Settings(), "default")
    assert narrate_space(r, settings_for(mavera), "default", client)["state"] == "synced"
    chats = mavera.calls("POST", "/mave/chat")
    assert len(chats) == 2 and chats[1]["json"]["thread_id"] == stored[b"thread_id"].decode()


def test_the_narrative_never_sends_a_pattern_of_fewer_people_than_a_persona(mavera: MaveraServer,
                                                                            r: redis.Redis) -> None:
    """A channel pattern of one person would give Mave that person's LTV, plan and sessions: patterns below
    MIN_CLUSTER_SIZE are left out of the prompt, as clusters below it get no persona."""
    now_ts = "2026-11-20T10:00:00Z"
    people(r, "mob", 4, 300, 0.1, ts=now_ts)
    apply(r, [{"type": "identify", "userId": "ada", "messageId": "ada-1", "timestamp": now_ts,
               "traits": {"ltv": 12345, "plan": "ada-private-plan"}},
              {"type": "page", "userId": "ada", "messageId": "ada-2", "timestamp": now_ts}])
    refresh(r, Settings(), "default")
    patterns = {k.decode(): orjson.loads(v) for k, v in r.hgetall(K.patterns).items()}
    assert sorted(p["n"] for p in patterns.values()) == [1, 4]  # the one-person pattern exists
    client = client_for(mavera, r)
    assert narrate_space(r, settings_for(mavera), "default", client)["state"] == "synced"
    [chat] = mavera.calls("POST", "/mave/chat")
    message = chat["json"]["message"]
    assert "(N=4)" in message and "N=1" not in message
    assert "12,345" not in message and "ada-private-plan" not in message
    assert b"ada-private-plan" not in r.hget(K.narrative, "patterns")


def test_a_narrative_whose_thread_is_gone_at_mavera_starts_a_new_one(mavera: MaveraServer, r: redis.Redis) -> None:
    """The stored Mave thread was deleted in Mavera's app (or expired): the chat in it is a 404, and asking again
    without it starts a new thread, rather than every later sync failing on the dead one."""
    people(r, "mob", 4, 300, 0.1, ts="2026-11-20T10:00:00Z")
    refresh(r, Settings(), "default")
    client = client_for(mavera, r)
    assert narrate_space(r, settings_for(mavera), "default", client)["state"] == "synced"
    old = r.hget(K.narrative, "thread_id").decode()
    mavera.state.threads.discard(old)
    again = narrate_space(r, settings_for(mavera), "default", client, force=True)
    assert again["state"] == "synced" and again["thread_id"] not in (None, old)
    assert r.hget(K.narrative, "thread_id").decode() == again["thread_id"]
    assert [c["json"].get("thread_id") for c in mavera.calls("POST", "/mave/chat")] == [None, old, None]


def test_a_chat_whose_answer_is_lost_is_not_sent_again_at_once(mavera: MaveraServer, r: redis.Redis) -> None:
    """Mave chat is charged per answer and has no idempotency key: when the connection breaks after the chat went
    out, Mavera may have answered (and charged). The narrative fails as only needing time, and the chat is sent
    again by the next sync, not straight away by the client's retries."""
    from workers.mavera.client import MaybeAnswered
    from workers.mavera.sync import transient

    people(r, "mob", 4, 300, 0.1, ts="2026-11-20T10:00:00Z")
    refresh(r, Settings(), "default")
    client = client_for(mavera, r)
    mavera.fault("POST", "/mave/chat", lose=True)
    with pytest.raises(MaybeAnswered) as lost:
        narrate_space(r, settings_for(mavera), "default", client)
    assert transient(lost.value)
    assert len(mavera.calls("POST", "/mave/chat")) == 1
    assert r.hget(K.narrative, "state") == b"failed"
    assert narrate_space(r, settings_for(mavera), "default", client)["state"] == "synced"  # the next sync
    assert len(mavera.calls("POST", "/mave/chat")) == 2


def test_a_chat_answered_by_a_gateway_5xx_is_not_sent_again_at_once(mavera: MaveraServer, r: redis.Redis) -> None:
    """A 503 or 500 from a gateway that gave up while Mave answered (and charged) is no proof the chat was not
    answered: as for a lost connection, it is left to the next sync, not resent by the client's retries (a 503
    with Retry-After, Mavera asking to come back later, is retried: test_a_chat_keeps_its_slot_through_its_retries)."""
    from workers.mavera.client import MaybeAnswered

    people(r, "mob", 4, 300, 0.1, ts="2026-11-20T10:00:00Z")
    refresh(r, Settings(), "default")
    mavera.fault("POST", "/mave/chat", status=503, times=3)
    with pytest.raises(MaybeAnswered):
        narrate_space(r, settings_for(mavera), "default", client_for(mavera, r))
    assert len(mavera.calls("POST", "/mave/chat")) == 1


def test_an_answer_that_is_not_json_fails_one_persona_for_a_retry_and_never_duplicates(mavera: MaveraServer,
                                                                                        r: redis.Redis) -> None:
    """A gateway's HTML page with a 200: after a create (which happened), the create is uncertain and adopted by
    the next sync rather than made twice; after a PATCH, that cluster fails for a retry and the others sync."""
    seed(r)
    client = client_for(mavera, r)
    mavera.fault("POST", "/personas", page=b"<html>ok</html>")
    first = sync_space(r, settings_for(mavera), "default", client)
    assert first["created"] == ["at_risk"] or first["created"] == ["high_value"], first  # the other was uncertain
    report = sync_space(r, settings_for(mavera), "default", client)
    assert len(mavera.state.personas) == 2, report
    assert {c: v["state"] for c, v in records(r).items()} == {"high_value": "synced", "at_risk": "synced"}, report
    people(r, "hv2", 2, 1500, 0.01, ts="2026-03-02T00:00:00Z")
    people(r, "risk2", 2, 40, 0.8, ts="2026-03-02T00:00:00Z")
    refresh(r, Settings(), "default", now_ms=NOW)
    mavera.fault("PATCH", "/personas/", page=b"<html>")
    with pytest.raises(SyncFailed) as failed:
        sync_space(r, settings_for(mavera), "default", client)
    assert failed.value.retry and "not JSON (text/html)" in str(failed.value)
    assert len(mavera.calls("PATCH")) == 2  # the second cluster was still sent
    assert len(mavera.state.personas) == 2


def test_the_persona_of_a_cluster_that_is_gone_withholds_its_figures(mavera: MaveraServer, r: redis.Redis) -> None:
    """Every person of a cluster erased: the cluster leaves the aggregates, and its persona, which still described
    them, is PATCHed to withhold its figures rather than left as it was."""
    from service.state.ops import forget

    seed(r)
    client = client_for(mavera, r)
    sync_space(r, settings_for(mavera), "default", client)
    for i in range(3):
        forget(r, Settings(), "default", f"user_id:risk-{i}")
    refresh(r, Settings(), "default", now_ms=NOW)
    assert r.hget(K.clusters, "at_risk") is None
    after = sync_space(r, settings_for(mavera), "default", client)
    assert after["withheld"] == ["at_risk"]
    persona = mavera.state.personas[records(r)["at_risk"]["mavera_id"]]
    assert persona["description"].startswith("Fewer than 3 customers") and "$" not in persona["description"]


def test_a_forgotten_profile_leaves_its_persona_at_the_next_refresh(mavera: MaveraServer, r: redis.Redis) -> None:
    """GDPR erasure reaches Mavera: the persona of a cluster that lost the person is PATCHed without them, and
    the persona of a cluster that falls under MIN_CLUSTER_SIZE is PATCHed to withhold its figures (they still
    counted the erased person, and would now be two people's), once."""
    from service.state.ops import forget

    seed(r)
    client = client_for(mavera, r)
    assert sorted(sync_space(r, settings_for(mavera), "default", client)["created"]) == ["at_risk", "high_value"]
    forget(r, Settings(), "default", "user_id:hv-0")
    forget(r, Settings(), "default", "risk-1")
    refresh(r, Settings(), "default", now_ms=NOW)
    sizes = {k.decode(): orjson.loads(v)["n"] for k, v in r.hgetall(K.clusters).items()}
    assert sizes["high_value"] == 3 and sizes["at_risk"] == 2
    after = sync_space(r, settings_for(mavera), "default", client)
    assert after["updated"] == ["high_value"] and after["withheld"] == ["at_risk"] and "at_risk" in after["small"]
    patches = {p["path"]: p["json"] for p in mavera.calls("PATCH")}
    assert "3 customers" in patches[f"/personas/{records(r)['high_value']['mavera_id']}"]["description"]
    withheld = patches[f"/personas/{records(r)['at_risk']['mavera_id']}"]
    assert withheld == {"description": "Fewer than 3 customers in this cluster at the moment: its figures are "
                                       "withheld until it has 3 or more again."}
    assert "churn" not in mavera.state.personas[records(r)["at_risk"]["mavera_id"]]["description"]
    again = sync_space(r, settings_for(mavera), "default", client)
    assert again["withheld"] == [] and len(mavera.calls("PATCH")) == 2  # said once
