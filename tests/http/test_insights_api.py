"""The /api read routes and the KPI endpoint over HTTP."""

from __future__ import annotations

import gzip
import socket

import orjson
import redis
from starlette.testclient import TestClient

from service.config import ConfigError, Settings
from service.http.app import create_app
from service.http.insights_api import MAX_KPI_BODY
from tests.conftest import ADMIN_TOKEN, LiveServer
from tests.helpers import NOW, apply
from tests.spec.test_kpis import SEED_BODY, SEED_FIGURES
from workers.recompute import refresh

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KPI = "/api/v1/segment_cluster_profiles"


def test_seed_004_example_over_http(client: TestClient) -> None:
    resp = client.post("/api/v1/segment_cluster_profiles", content=orjson.dumps(SEED_BODY), headers=AUTH)
    assert resp.status_code == 200
    cards = {c["cluster_id"]: c for c in resp.json()["cluster_profiles"]}
    for cid, figures in SEED_FIGURES.items():
        for name, value in figures.items():
            assert cards[cid][name] == value, (cid, name)


def test_seed_004_bad_bodies_are_clear_400s(client: TestClient) -> None:
    unknown = dict(SEED_BODY, labels={**SEED_BODY["labels"], "C999": 1})
    resp = client.post(KPI, content=orjson.dumps(unknown), headers=AUTH)
    assert resp.status_code == 400 and "C999" in resp.json()["error"]["message"]
    negative = dict(SEED_BODY, customers=[dict(SEED_BODY["customers"][0], amount_spent=-1)]
                    + SEED_BODY["customers"][1:])
    assert client.post(KPI, content=orjson.dumps(negative), headers=AUTH).status_code == 400
    empty = {"customers": [], "labels": {}}
    assert client.post(KPI, content=orjson.dumps(empty), headers=AUTH).status_code == 400
    assert client.post(KPI, content=b"{", headers=AUTH).status_code == 400


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
    [row] = client.get("/admin/status", headers=AUTH).json()["spaces"]
    assert row["profiles_created"] == 1 and row["dirty_profiles"] == 1 and row["event_log"]["entries"] == 1


def test_kpi_endpoint_needs_a_credential(client: TestClient) -> None:
    body = orjson.dumps(SEED_BODY)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN_TOKEN}"},
                    {"X-Customer-Api-Id": "", "X-Secret": ""}, {"X-Customer-Api-Id": "id", "X-Secret": "secret"}):
        resp = client.post(KPI, content=body, headers=headers)
        assert resp.status_code == 401, headers
        err = resp.json()["error"]
        assert err["code"] == "authentication_error" and "Bearer" in err["message"]
        assert "X-Secret" not in err["message"]  # the header pair is not configured here: not offered
    assert client.post(KPI, content=body, headers=AUTH).status_code == 200


def test_kpi_endpoint_accepts_the_kpi_api_header_pair_when_configured(settings: Settings, redis_url: str) -> None:
    pair = {"X-Customer-Api-Id": "cust-1", "X-Secret": "s3cret"}
    app = create_app(settings.replace(kpi_api_id="cust-1", kpi_api_secret="s3cret"), redis_url, "")
    with TestClient(app) as c:
        body = orjson.dumps(SEED_BODY)
        assert c.post(KPI, content=body, headers=pair).status_code == 200
        assert c.post(KPI, content=body, headers=AUTH).status_code == 200
        for wrong in ({**pair, "X-Secret": "s3cre"}, {**pair, "X-Customer-Api-Id": "cust-2"},
                      {"X-Customer-Api-Id": "cust-1"}, {"X-Secret": "s3cret"}):
            resp = c.post(KPI, content=body, headers=wrong)
            assert resp.status_code == 401 and "X-Customer-Api-Id and X-Secret" in resp.json()["error"]["message"]
    try:
        Settings.from_env({"KPI_API_ID": "only-the-id"})
    except ConfigError as exc:
        assert "KPI_API_SECRET" in str(exc)
    else:
        raise AssertionError("a lone KPI_API_ID must be a configuration error")


def _raw_request(server: LiveServer, head: str, chunks: list[bytes] = ()) -> tuple[bytes, int]:
    """Send a request head, then body chunks while the server has not answered; return its answer (within 5 s)
    and how many chunks were sent before it came."""
    import select

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(head.encode() + b"\r\n")
        sent = 0
        for chunk in chunks:
            if select.select([s], [], [], 0.05)[0]:
                break
            s.sendall(chunk)
            sent += 1
        try:
            return s.recv(65536), sent
        except TimeoutError:
            return b"(no answer: the server is waiting for the body)", sent


def test_kpi_endpoint_answers_before_reading_a_body_it_refuses(live_server: LiveServer) -> None:
    # no credential: 401 at once, although the 1 MB body announced was never sent
    head = f"POST {KPI} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n"
    answer, _ = _raw_request(live_server, head)
    assert answer.startswith(b"HTTP/1.1 401") and b"ADMIN_TOKEN" in answer, answer[:200]
    # credential, but a body larger than the limit: 413 without reading it
    head = (f"POST {KPI} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
            f"Content-Length: {MAX_KPI_BODY + 1}\r\n")
    assert _raw_request(live_server, head)[0].startswith(b"HTTP/1.1 413")
    # chunked (no length announced): refused as soon as the limit is passed, not after the whole body
    head = f"POST {KPI} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nTransfer-Encoding: chunked\r\n"
    chunk = b"%x\r\n" % (1024 * 1024) + b" " * (1024 * 1024) + b"\r\n"
    chunks = [chunk] * (3 * MAX_KPI_BODY // (1024 * 1024))  # 24 MiB, never terminated
    answer, sent = _raw_request(live_server, head, chunks)
    assert answer.startswith(b"HTTP/1.1 413") and sent < len(chunks), (answer[:100], sent)


def test_kpi_gzip_body_is_limited_by_its_inflated_size(client: TestClient) -> None:
    ok = client.post(KPI, content=gzip.compress(orjson.dumps(SEED_BODY)),
                     headers={**AUTH, "Content-Encoding": "gzip"})
    assert ok.status_code == 200
    bomb = gzip.compress(b" " * (MAX_KPI_BODY + 1))
    resp = client.post(KPI, content=bomb, headers={**AUTH, "Content-Encoding": "gzip"})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
