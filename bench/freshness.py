"""Freshness: from an event that changes a cluster's summary to the PATCH reaching Mavera, under steady ingest.

The stack is the production one on this machine: embedded redis-server, `persona-sync web`, one
`persona-sync worker` (with its scheduler, default REFRESH_DEBOUNCE 5 s) and the loopback Mavera-compatible
server from the tests. A background thread keeps ~50 events/s flowing; every few seconds a probe event adds one
high-value customer, and we time until Mavera receives the persona (PATCH) whose description carries the new
count. Probes go out every ``--spacing`` seconds whatever happened to the previous one, so a stalled sync shows
in every probe it holds up.

With ``--lose-creates`` Mavera performs every persona create but the answer never reaches the worker (the
connection drops), so every persona is one the sync has to find by name and adopt. ``first_sync_s`` is from the
first seed event until the high-value persona is recorded as synced; ``creates`` and ``duplicates`` check that
no persona was created twice.

    python -m bench.freshness --probes 12
    python -m bench.freshness --probes 12 --lose-creates
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import orjson
import redis

from bench.run import Stack
from service.spec.keys import Keys
from tests.mavera_server import API_KEY, MaveraServer


def post(client: httpx.Client, url: str, event: dict) -> None:
    client.post(url + "/segment", content=orjson.dumps(event), headers={"Content-Type": "application/json"})


def identify(uid: str, ltv: float, churn: float, n: int) -> dict:
    return {"type": "identify", "userId": uid, "messageId": f"{uid}-{n}-{time.time_ns()}",
            "timestamp": "2026-03-01T00:00:00Z", "traits": {"ltv": ltv, "churn_risk": churn}}


def customers(call: dict) -> int:
    """The high-value customer count a persona request carries ("5 customers. …"), or -1."""
    doc = call["json"] or {}
    if not str(doc.get("name", "")).startswith("High-value"):
        return -1
    head = str(doc.get("description", "")).split(" ", 1)[0].replace(",", "")
    return int(head) if head.isdigit() else -1


def arrival(mavera: MaveraServer, t0: float, n: int) -> float:
    """When Mavera first received the high-value persona with at least ``n`` customers (a PATCH, or a create)
    after ``t0``: a later request carries every earlier probe's customer too."""
    hits = [c["at"] for c in mavera.calls("PATCH") + mavera.calls("POST", "/personas")
            if c["at"] >= t0 and customers(c) >= n]
    return min(hits, default=float("inf"))


def run(probes: int, spacing: float, lose_creates: bool = False) -> dict:
    with MaveraServer() as mavera, Stack(web_workers=1) as stack:
        if lose_creates:
            mavera.fault("POST", "/personas", lose=True, times=None)
        url = f"http://127.0.0.1:{stack.port}"
        env = dict(os.environ, REDIS_URL=stack.redis.url, MAVERA_API_KEY=API_KEY, MAVERA_BASE_URL=mavera.url,
                   MAVERA_RATE_LIMIT="600", LOG_LEVEL="WARNING")
        worker = subprocess.Popen([str(Path(sys.executable).with_name("persona-sync")), "worker"], env=env,
                                  stderr=subprocess.DEVNULL)
        stop = threading.Event()
        first_sync: list[float] = []

        def watch_first_sync(t0: float) -> None:
            """When the high-value persona is first recorded as synced (created, or found and adopted)."""
            state = redis.Redis.from_url(stack.redis.url)
            while not stop.is_set():
                raw = state.hget(Keys("default").personas, "high_value")
                if raw and orjson.loads(raw).get("state") == "synced":
                    first_sync.append(time.time() - t0)
                    return
                time.sleep(0.1)

        def background() -> None:
            with httpx.Client() as c:
                i = 0
                while not stop.is_set():
                    post(c, url, identify(f"bg-{i % 500}", 20 + i % 50, 0.2, i))
                    i += 1
                    time.sleep(0.02)

        try:
            with httpx.Client() as c:
                threading.Thread(target=watch_first_sync, args=(time.time(),), daemon=True).start()
                for i in range(3):  # seed the high-value cluster so its persona exists
                    post(c, url, identify(f"hv-seed-{i}", 900, 0.05, 0))
                deadline = time.monotonic() + 60
                while not any("High-value" in p["json"]["name"] for p in mavera.calls("POST", "/personas")):
                    if time.monotonic() > deadline:
                        raise SystemExit("no persona was created within 60 s: is the worker running?")
                    time.sleep(0.2)
                thread = threading.Thread(target=background, daemon=True)
                thread.start()
                sent = []  # probes go out on schedule, whether or not the previous one has arrived
                for k in range(probes):
                    t0 = time.time()
                    post(c, url, identify(f"hv-probe-{k}", 1000 + k, 0.02, k))
                    sent.append((t0, 3 + k + 1))
                    time.sleep(max(0.0, spacing - (time.time() - t0)))
                deadline = time.monotonic() + 90
                while True:
                    latencies = [arrival(mavera, t0, n) - t0 for t0, n in sent]
                    if max(latencies) < float("inf") or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
        finally:
            stop.set()
            worker.terminate()
            worker.wait(30)
        names = [p["name"] for p in mavera.state.personas.values()]
        creates, duplicates = len(mavera.calls("POST", "/personas")), len(names) - len(set(names))
    ordered = sorted(latencies)  # a probe that never arrived is inf (null in the JSON)
    return {"probes": probes, "debounce_s": 5, "lose_creates": lose_creates,
            "p50_s": round(statistics.median(ordered), 2),
            "p95_s": round(ordered[max(0, int(len(ordered) * 0.95 + 0.5) - 1)], 2), "max_s": round(ordered[-1], 2),
            "first_sync_s": round(first_sync[0], 2) if first_sync else None,
            "creates": creates, "personas": len(names), "duplicates": duplicates,
            "all_s": [round(x, 2) for x in latencies]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.freshness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probes", type=int, default=12)
    p.add_argument("--spacing", type=float, default=8.0, help="seconds between probe events")
    p.add_argument("--lose-creates", action="store_true",
                   help="Mavera performs every persona create but the answer is lost")
    args = p.parse_args(argv)
    print(orjson.dumps(run(args.probes, args.spacing, args.lose_creates)).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
