"""Drill: Redis is stopped while a sender keeps posting. The receiver answers 503 to everything, the sender keeps
what was refused in a file (as a forwarding proxy or Segment's own retries would hold it), Redis comes back, and
`persona-sync import` of that file loads it: every event is then on its profile exactly once, as if the outage had
never happened."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson

from service.spec.keys import Keys
from tests.drills.stack import EXE, SPACE, Redis, Web, signed_headers
from tests.helpers import snapshot


def events(n: int) -> list[dict]:
    return [{"type": "identify", "userId": f"out-{i % 40}", "messageId": f"outage-{i}",
             "timestamp": f"2026-03-02T10:{i // 60 % 60:02d}:{i % 60:02d}Z", "receivedAt": "2026-03-02T11:00:00Z",
             "traits": {"seq": i, "email": f"out{i % 40}@example.com"}} for i in range(n)]


def test_events_refused_during_an_outage_are_replayed_from_a_file(start_redis: Callable[..., Redis],
                                                                  start_web: Callable[..., Web],
                                                                  tmp_path: Path) -> None:
    redis_server = start_redis()
    web = start_web(redis_server.url)
    before, during, after = events(300)[:100], events(300)[100:200], events(300)[200:]
    refused_file = tmp_path / "refused.ndjson"
    with httpx.Client(base_url=web.url, timeout=10) as http:
        def post(e: dict) -> int:
            body = orjson.dumps(e)
            return http.post(f"/segment/{SPACE}", content=body, headers=signed_headers(body)).status_code

        assert {post(e) for e in before} == {200}
        redis_server.stop()
        with refused_file.open("wb") as f:
            for e in during:
                status = post(e)
                assert status == 503  # never a 500, never a dropped connection: Segment would retry it
                f.write(orjson.dumps(e) + b"\n")
        redis_server.start()
        client = redis_server.client()
        assert {post(e) for e in after} == {200}
    out = subprocess.run([EXE, "import", str(refused_file), "--space", SPACE], capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin", "REDIS_URL": redis_server.url})
    assert out.returncode == 0, out.stderr
    assert "100 events were: 100 applied" in out.stdout
    logged = [orjson.loads(f[b"e"])["messageId"] for _, f in client.xrange(Keys(SPACE).log)]
    assert sorted(logged) == sorted(e["messageId"] for e in events(300))  # every event once, none twice
    # the profiles are those of an uninterrupted delivery
    outage_state = snapshot(client, SPACE)
    client.flushall()
    with httpx.Client(base_url=web.url, timeout=10) as http:
        for e in events(300):
            body = orjson.dumps(e)
            assert http.post(f"/segment/{SPACE}", content=body, headers=signed_headers(body)).status_code == 200
    assert snapshot(client, SPACE) == outage_state
