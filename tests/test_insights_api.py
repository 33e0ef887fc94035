"""The /api read routes and seed 004's KPI endpoint over HTTP."""

from __future__ import annotations

import orjson
import redis
from starlette.testclient import TestClient

from service.config import Settings
from tests.conftest import ADMIN_TOKEN
from tests.helpers import NOW, apply
from tests.test_kpis import SEED_BODY, SEED_FIGURES
from workers.recompute import refresh

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_seed_004_example_over_http(client: TestClient) -> None:
    resp = client.post("/api/v1/segment_cluster_profiles", content=orjson.dumps(SEED_BODY))
    assert resp.status_code == 200
    cards = {c["cluster_id"]: c for c in resp.json()["cluster_profiles"]}
    for cid, figures in SEED_FIGURES.items():
        for name, value in figures.items():
            assert cards[cid][name] == value, (cid, name)


def test_seed_004_bad_bodies_are_clear_400s(client: TestClient) -> None:
    unknown = dict(SEED_BODY, labels={**SEED_BODY["labels"], "C999": 1})
    resp = client.post("/api/v1/segment_cluster_profiles", content=orjson.dumps(unknown))
    assert resp.status_code == 400 and "C999" in resp.json()["error"]["message"]
    negative = dict(SEED_BODY, customers=[dict(SEED_BODY["customers"][0], amount_spent=-1)]
                    + SEED_BODY["customers"][1:])
    assert client.post("/api/v1/segment_cluster_profiles", content=orjson.dumps(negative)).status_code == 400
    empty = {"customers": [], "labels": {}}
    assert client.post("/api/v1/segment_cluster_profiles", content=orjson.dumps(empty)).status_code == 400
    assert client.post("/api/v1/segment_cluster_profiles", content=b"{").status_code == 400


def test_clusters_and_patterns_need_the_admin_token(client: TestClient, r: redis.Redis) -> None:
    apply(r, [{"type": "identify", "userId": f"u{i}", "messageId": f"m{i}", "timestamp": "2026-03-01T00:00:00Z",
               "traits": {"ltv": 1000 + i, "churn_risk": 0.05, "plan": "pro"},
               "context": {"library": {"name": "analytics.js"}}} for i in range(4)])
    refresh(r, Settings(), "default", now_ms=NOW)
    assert client.get("/api/clusters").status_code == 401
    body = client.get("/api/clusters", headers=AUTH).json()
    [high] = body["clusters"]
    assert high["cluster"] == "high_value" and high["n"] == 4 and high["summary"]["plans"] == ["pro"]
    assert high["kpi"]["n_customers"] == 4
    patterns = client.get("/api/patterns", headers=AUTH).json()
    assert patterns["patterns"] == {} or "web_dominant" in patterns["patterns"]
    assert client.get("/api/personas", headers=AUTH).json()["personas"] == []
    assert client.get("/api/clusters?space=%7Bx", headers=AUTH).status_code == 400


def test_admin_status(client: TestClient, r: redis.Redis) -> None:
    apply(r, [{"type": "identify", "userId": "s1", "messageId": "s1", "timestamp": "2026-03-01T00:00:00Z"}])
    assert client.get("/admin/status").status_code == 401
    body = client.get("/admin/status", headers=AUTH).json()
    assert body["profiles_created"] == 1 and body["dirty_profiles"] == 1 and body["event_log_entries"] == 1
