"""Freshness: from an event that changes a cluster's summary to the PATCH reaching Mavera, under steady ingest.

The stack is the production one on this machine: embedded redis-server, `persona-sync web`, one
`persona-sync worker` (with its scheduler, default REFRESH_DEBOUNCE 5 s) and the loopback Mavera-compatible
server from the tests. A background thread keeps ~50 events/s flowing; every few seconds a probe event adds one
high-value customer, and we time until Mavera receives the PATCH whose description carries the new count.

    python -m bench.freshness --probes 12
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

from bench.run import Stack
from tests.mavera_server import API_KEY, MaveraServer


def post(client: httpx.Client, url: str, event: dict) -> None:
    client.post(url + "/segment", content=orjson.dumps(event), headers={"Content-Type": "application/json"})


def identify(uid: str, ltv: float, churn: float, n: int) -> dict:
    return {"type": "identify", "userId": uid, "messageId": f"{uid}-{n}-{time.time_ns()}",
            "timestamp": "2026-03-01T00:00:00Z", "traits": {"ltv": ltv, "churn_risk": churn}}


def run(probes: int, spacing: float) -> dict:
    with MaveraServer() as mavera, Stack(web_workers=1) as stack:
        url = f"http://127.0.0.1:{stack.port}"
        env = dict(os.environ, REDIS_URL=stack.redis.url, MAVERA_API_KEY=API_KEY, MAVERA_BASE_URL=mavera.url,
                   MAVERA_RATE_LIMIT="600", LOG_LEVEL="WARNING")
        worker = subprocess.Popen([str(Path(sys.executable).with_name("persona-sync")), "worker"], env=env,
                                  stderr=subprocess.DEVNULL)
        stop = threading.Event()

        def background() -> None:
            with httpx.Client() as c:
                i = 0
                while not stop.is_set():
                    post(c, url, identify(f"bg-{i % 500}", 20 + i % 50, 0.2, i))
                    i += 1
                    time.sleep(0.02)

        try:
            with httpx.Client() as c:
                for i in range(3):  # seed the high-value cluster so its persona exists
                    post(c, url, identify(f"hv-seed-{i}", 900, 0.05, 0))
                deadline = time.monotonic() + 60
                while not any("High-value" in p["json"]["name"] for p in mavera.calls("POST", "/personas")):
                    if time.monotonic() > deadline:
                        raise SystemExit("no persona was created within 60 s: is the worker running?")
                    time.sleep(0.2)
                thread = threading.Thread(target=background, daemon=True)
                thread.start()
                latencies = []
                for k in range(probes):
                    n = 3 + k + 1
                    t0 = time.time()
                    post(c, url, identify(f"hv-probe-{k}", 1000 + k, 0.02, k))
                    deadline = time.monotonic() + 60
                    while True:
                        hits = [p for p in mavera.calls("PATCH") if p["at"] >= t0
                                and p["json"]["description"].startswith(f"{n} customers")]
                        if hits:
                            latencies.append(hits[0]["at"] - t0)
                            break
                        if time.monotonic() > deadline:
                            latencies.append(float("inf"))
                            break
                        time.sleep(0.05)
                    time.sleep(max(0.0, spacing - (time.time() - t0)))
        finally:
            stop.set()
            worker.terminate()
            worker.wait(30)
    finite = sorted(latencies)
    return {"probes": probes, "debounce_s": 5, "p50_s": round(statistics.median(finite), 2),
            "p95_s": round(finite[max(0, int(len(finite) * 0.95 + 0.5) - 1)], 2), "max_s": round(finite[-1], 2),
            "all_s": [round(x, 2) for x in latencies]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.freshness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probes", type=int, default=12)
    p.add_argument("--spacing", type=float, default=8.0, help="seconds between probe events")
    args = p.parse_args(argv)
    print(orjson.dumps(run(args.probes, args.spacing)).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
