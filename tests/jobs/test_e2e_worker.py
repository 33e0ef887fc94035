"""Events in over HTTP → the real RQ worker → personas created once in a Mavera-compatible server → an event that
moves profiles between clusters → only the affected personas PATCHed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import redis
from rq import Queue
from rq.registry import FailedJobRegistry
from starlette.testclient import TestClient

from tests.mavera_server import API_KEY, MaveraServer

EXE = str(Path(sys.executable).with_name("persona-sync"))


def run_worker(redis_url: str, server: MaveraServer) -> None:
    env = dict(os.environ, REDIS_URL=redis_url, MAVERA_API_KEY=API_KEY, MAVERA_BASE_URL=server.url,
               LOG_LEVEL="WARNING")
    env.pop("QUEUE_REDIS_URL", None)
    out = subprocess.run([EXE, "worker", "--burst"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def send(client: TestClient, events: list[dict]) -> None:
    assert client.post("/segment", content=orjson.dumps(events),
                       headers={"X-Signature": _sign(events)}).json()["accepted"] == len(events)


def _sign(events: list[dict]) -> str:
    import hashlib
    import hmac

    from tests.conftest import SECRET

    return hmac.new(SECRET.encode(), orjson.dumps(events[0]), hashlib.sha1).hexdigest()


def identify(uid: str, ltv: float, churn: float, ts: str) -> dict:
    return {"type": "identify", "userId": uid, "messageId": f"{uid}-{ts}-{ltv}", "timestamp": ts,
            "traits": {"ltv": ltv, "churn_risk": churn, "plan": "pro"}}


def test_worker_syncs_personas_once_and_patches_only_what_moved(client: TestClient, r: redis.Redis,
                                                                redis_url: str) -> None:
    queue = Queue("persona-sync", connection=r)
    with MaveraServer() as mavera:
        ts = "2026-03-01T00:00:00Z"
        send(client, [identify(f"hv{i}", 900, 0.05, ts) for i in range(4)]
             + [identify(f"gr{i}", 300, 0.2, ts) | {"traits": {"ltv": 300, "churn_risk": 0.2,
                                                               "purchase_count": 3}} for i in range(3)]
             + [identify(f"rk{i}", 20, 0.8, ts) for i in range(4)])
        queue.enqueue("workers.jobs.refresh", "default")
        run_worker(redis_url, mavera)
        created = {c["json"]["name"] for c in mavera.calls("POST", "/personas")}
        assert created == {"High-value customers · default", "Growth customers · default",
                           "At-risk customers · default"}
        assert len(mavera.calls("POST", "/mave/chat")) == 0  # no channel activity in the window: no patterns

        # a second run with nothing new makes no Mavera call
        before = len(mavera.state.requests)
        queue.enqueue("workers.jobs.sync", "default")
        run_worker(redis_url, mavera)
        assert len(mavera.state.requests) == before

        # one at-risk customer becomes high value: those two personas change, growth does not
        send(client, [identify("rk0", 2000, 0.01, "2026-03-05T00:00:00Z")])
        queue.enqueue("workers.jobs.refresh", "default")
        run_worker(redis_url, mavera)
        ids = {k.decode(): orjson.loads(v)["mavera_id"] for k, v in r.hgetall("sps:{default}:w:personas").items()}
        patched = sorted(c["path"] for c in mavera.calls("PATCH"))
        assert patched == sorted([f"/personas/{ids['high_value']}", f"/personas/{ids['at_risk']}"])
        assert len(mavera.calls("POST", "/personas")) == 3 and mavera.state.credits == 900


def worker_env(redis_url: str, server: MaveraServer | None, **extra: str) -> dict:
    env = dict(os.environ, REDIS_URL=redis_url, LOG_LEVEL="WARNING", MAVERA_TIMEOUT="1s", **extra)
    env.pop("QUEUE_REDIS_URL", None)
    env.pop("MAVERA_API_KEY", None)
    if server is not None:
        env.update(MAVERA_API_KEY=API_KEY, MAVERA_BASE_URL=server.url)
    return env


def burst(env: dict) -> None:
    out = subprocess.run([EXE, "worker", "--burst"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def personas(r: redis.Redis) -> dict:
    return {k.decode(): orjson.loads(v) for k, v in r.hgetall("sps:{default}:w:personas").items()}


def test_worker_rides_out_every_fault_and_still_creates_each_persona_once(client: TestClient, r: redis.Redis,
                                                                         redis_url: str) -> None:
    """429 with Retry-After, a lost create, a create that times out, 500s, then 402: the real worker, the real
    queue, and at the end exactly one persona per cluster. The lost create is found by name in the same job; the
    one still running at Mavera is adopted after the grace period; neither is PATCHed, both hold the payload."""
    queue = Queue("persona-sync", connection=r)
    with MaveraServer() as mavera:
        env = worker_env(redis_url, mavera)
        ts = "2026-03-01T00:00:00Z"
        send(client, [identify(f"hv{i}", 900, 0.05, ts) for i in range(4)]
             + [identify(f"gr{i}", 300, 0.2, ts) | {"traits": {"ltv": 300, "churn_risk": 0.2,
                                                               "purchase_count": 3}} for i in range(3)]
             + [identify(f"rk{i}", 20, 0.8, ts) for i in range(4)])
        mavera.fault("GET", "/personas", status=429, retry_after=1)  # the first listing: wait, then go on
        mavera.fault("POST", "/personas", lose=True)  # at_risk is created, its answer lost
        mavera.fault("POST", "/personas", sleep=2.5)  # growth times out on our side (MAVERA_TIMEOUT 1 s)
        queue.enqueue("workers.jobs.refresh", "default")
        burst(env)
        deadline = time.monotonic() + 5  # the timed-out create finishes at Mavera after we gave up on it
        while len(mavera.state.personas) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(mavera.state.personas) == 3  # all three exist at Mavera, growth's unknown to us
        states = {cluster: rec["state"] for cluster, rec in personas(r).items()}
        assert states == {"at_risk": "synced", "growth": "pending", "high_value": "synced"}  # lost, found at once
        failed = FailedJobRegistry(queue=queue)
        assert failed.count == 1  # the sync job says why: a create that may have succeeded

        time.sleep(2.2)  # the lost creates settle (2 x MAVERA_TIMEOUT); an operator requeues the failed job
        rq = str(Path(sys.executable).with_name("rq"))
        assert subprocess.run([rq, "requeue", "--all", "-u", redis_url, "--queue", "persona-sync"],
                              capture_output=True, timeout=60, env=env).returncode == 0
        burst(env)
        assert {rec["state"] for rec in personas(r).values()} == {"synced"}
        assert len(mavera.calls("POST", "/personas")) == 3 and mavera.state.credits == 900  # never a 4th
        assert mavera.calls("PATCH") == []  # the adopted personas already held their payloads

        # 500 then 402 on the next PATCH: retried, then paused for everyone until `persona-sync resume`
        mavera.fault("PATCH", None, status=500)
        mavera.fault("PATCH", None, status=402, message="Credits exhausted")
        send(client, [identify("rk0", 2000, 0.01, "2026-03-05T00:00:00Z")])
        queue.enqueue("workers.jobs.refresh", "default")
        burst(env)
        status = subprocess.run([EXE, "status"], capture_output=True, text=True, timeout=60, env=env)
        assert "PAUSED" in status.stdout and "Credits exhausted" in status.stdout
        assert "paused" in {rec["state"] for rec in personas(r).values()}
        resumed = subprocess.run([EXE, "resume"], capture_output=True, text=True, timeout=60, env=env)
        assert "sync queued for 1 space(s)" in resumed.stdout
        burst(env)
        assert {rec["state"] for rec in personas(r).values()} == {"synced"}
        assert len(mavera.state.personas) == 3 and mavera.state.credits == 900


def test_outbox_until_a_key_is_set_then_the_worker_pushes_personas_and_narrative(
        client: TestClient, r: redis.Redis, redis_url: str) -> None:
    queue = Queue("persona-sync", connection=r)
    recent = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 86_400))
    events = [identify(f"w{i}", 900, 0.05, recent) for i in range(4)]
    events += [{"type": "page", "userId": f"w{i}", "messageId": f"pg-{i}", "timestamp": recent, "name": "Home"}
               for i in range(4)]
    events += [identify(f"m{i}", 20, 0.8, recent) for i in range(3)]
    events += [{"type": "screen", "userId": f"m{i}", "messageId": f"sc-{i}", "timestamp": recent, "name": "Feed",
                "context": {"library": {"name": "analytics-ios"}}} for i in range(3)]
    send(client, events)
    queue.enqueue("workers.jobs.refresh", "default")
    burst(worker_env(redis_url, None))  # no key: computed and kept
    assert {rec["state"] for rec in personas(r).values()} == {"outbox"}
    assert r.hget("sps:{default}:w:narrative", "state") == b"outbox"
    with MaveraServer() as mavera:
        burst(worker_env(redis_url, mavera))  # the worker starts with a key: what waited goes out, once
        assert len(mavera.calls("POST", "/personas")) == 2 and mavera.state.credits == 600
        assert len(mavera.calls("POST", "/mave/chat")) == 1
        assert {rec["state"] for rec in personas(r).values()} == {"synced"}
        burst(worker_env(redis_url, mavera))  # a restart sends nothing more
        assert len(mavera.calls("POST", "/personas")) == 2 and len(mavera.calls("POST", "/mave/chat")) == 1
    from tests.conftest import ADMIN_TOKEN

    patterns = client.get("/api/patterns", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    assert set(patterns["patterns"]) == {"web_dominant", "mobile_dominant"}
    assert patterns["narrative"]["content"] and patterns["narrative"]["thread_id"]
