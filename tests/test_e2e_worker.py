"""Events in over HTTP → the real RQ worker → personas created once in a Mavera-compatible server → an event that
moves profiles between clusters → only the affected personas PATCHed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import redis
from rq import Queue
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
