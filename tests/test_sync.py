"""Persona sync end to end: real Redis, the real recompute, and the loopback Mavera-compatible server."""

from __future__ import annotations

import time
from collections.abc import Iterator

import orjson
import pytest
import redis

from service.config import Settings
from service.keys import Keys
from tests.helpers import NOW, apply
from tests.mavera_server import API_KEY, MaveraServer
from workers.mavera import MaveraClient, paused, resume
from workers.recompute import refresh
from workers.sync import SyncFailed, narrate_space, persona_name, sync_space

K = Keys("default")


@pytest.fixture
def mavera() -> Iterator[MaveraServer]:
    with MaveraServer() as server:
        yield server


def settings_for(server: MaveraServer | None) -> Settings:
    if server is None:
        return Settings()
    return Settings(mavera_api_key=API_KEY, mavera_base_url=server.url, mavera_timeout=1.0)


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


@pytest.mark.parametrize("fault", [{"lose": True}, {"sleep": 1.5}], ids=["lost-response", "timeout"])
def test_lost_create_never_duplicates(mavera: MaveraServer, r: redis.Redis, fault: dict) -> None:
    seed(r)
    mavera.fault("POST", "/personas", **fault)
    client = client_for(mavera, r)
    with pytest.raises(SyncFailed, match="may exist|ReadTimeout|RemoteProtocolError|Maybe|POST"):
        sync_space(r, settings_for(mavera), "default", client)
    with pytest.raises(SyncFailed, match="settle"):  # too soon: the lost create may still be running
        sync_space(r, settings_for(mavera), "default", client)
    time.sleep(2.1)  # the grace period: twice MAVERA_TIMEOUT
    report = sync_space(r, settings_for(mavera), "default", client)
    for cluster in ("high_value", "at_risk"):
        name = persona_name("default", {"cluster": cluster, "label": records(r)[cluster]["name"].split(" · ")[0]})
        assert len(mavera.named(name)) == 1, name
    assert len(report["adopted"]) == 1, report
    assert mavera.state.credits == 600  # two personas, never a third
    assert all(rec["state"] == "synced" for rec in records(r).values())


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
