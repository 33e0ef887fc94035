"""Intake with the embedded redis-server under ``appendfsync everysec`` (the default) vs ``appendfsync always``.

    python -m bench.drill_fsync [--runs 3] [--seconds 10] [--web-workers 2] [--dir /path/on/the/data/disk]

One stack (redis-server from EmbeddedRedis with AOF on, `persona-sync web` with SEGMENT_SHARED_SECRETS set);
before each phase ``CONFIG SET appendfsync`` switches the policy and the data is flushed. Load from wrk (as in
`make bench`): signed single events (classic Webhooks, X-Signature of the body, unique messageIds, 20,000 users)
over 32 connections, then signed 100-event Webhooks (Actions) batches over 4 connections. Every request is signed
beforehand in Python and replayed by wrk. Reports events/s and p50/p99 request latency, median of ``--runs``
runs; the two policies alternate which goes first. wrk shares the two cores with the server and Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import orjson

from bench.run import need_wrk
from tests.drills.stack import Redis, Web, short_tmpdir, signed_headers

USERS = 20_000
BATCH = 100

# wrk script: replays pre-signed requests ("<X-Signature> <body>" per line of the file named by the first argument)
LUA = r"""
local reqs, n, i = {}, 0, 0
function init(args)
  for line in io.lines(args[1]) do
    local sig, body = line:match("^(%x+) (.*)$")
    n = n + 1
    reqs[n] = wrk.format("POST", "/segment", {["Content-Type"] = "application/json", ["X-Signature"] = sig}, body)
  end
end
request = function()
  i = i + 1
  if i > n then i = 1 end
  return reqs[i]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests":%d,"duration_us":%d,"status_errors":%d,"socket_errors":%d,' ..
    '"p50_us":%d,"p99_us":%d}\n', summary.requests, summary.duration, e.status,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def _event(i: int) -> dict:
    return {"type": "track", "event": "Order Completed", "userId": f"fs-user-{i * 7919 % USERS}",
            "messageId": f"fs-{i}", "timestamp": "2026-03-04T12:00:00Z",
            "properties": {"order_id": f"fs-o-{i}", "revenue": 25.5, "products": [{"category": "books"}]},
            "context": {"library": {"name": "analytics.js"}}}


def write_requests(path: Path, kind: str, count: int) -> None:
    """``count`` signed requests; every event has its own messageId (the data is flushed before each phase)."""
    with path.open("wb") as f:
        for r in range(count):
            if kind == "single":
                body = orjson.dumps(_event(r))
                sig = signed_headers(body)["x-signature"]
            else:
                events = [_event(r * BATCH + j) for j in range(BATCH)]
                body = orjson.dumps(events)
                sig = signed_headers(body, signed_part=orjson.dumps(events[0]))["x-signature"]
            f.write(sig.encode() + b" " + body + b"\n")


def fsync_latency(directory: Path, n: int = 300) -> tuple[float, float]:
    """p50 and p99 (ms) of fsync after a 4 KB append in ``directory``: what one `always` flush costs on that disk."""
    path = directory / "fsync-probe.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    lat = []
    try:
        for _ in range(n):
            os.write(fd, b"x" * 4096)
            start = time.perf_counter()
            os.fsync(fd)
            lat.append((time.perf_counter() - start) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    lat.sort()
    return statistics.median(lat), lat[int(0.99 * len(lat))]


def prepare_loads(seconds: float) -> tuple[Path, Path, dict[str, tuple[int, int, int]]]:
    """A fresh directory with the wrk script and the recorded requests of both loads (enough for ``seconds``);
    the loads by name: (connections, requests recorded, events per request)."""
    work = short_tmpdir("sps-bench-wrk-")
    script = work / "replay.lua"
    script.write_text(LUA)
    loads = {"single": (32, int(9000 * seconds), 1), "batch": (4, int(400 * seconds), BATCH)}
    for kind, (_, count, _) in loads.items():
        write_requests(work / f"{kind}.txt", kind, count)
    return work, script, loads


def wrk(script: Path, data: Path, url: str, conns: int, seconds: float, available: int) -> dict[str, float]:
    cmd = [need_wrk(), "-t", "1", "-c", str(conns), "-d", f"{seconds:.0f}s", "--timeout", "10s", "-s", str(script),
           url, "--", str(data)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    res = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    if res["requests"] > available:
        print(f"  (warning: {res['requests']} requests but only {available} prepared: the rest were duplicates)")
    if res["status_errors"] or res["socket_errors"]:
        print(f"  ({res['status_errors']} non-200 answers, {res['socket_errors']} socket errors)")
    return {"rps": res["requests"] / (res["duration_us"] / 1e6), "p50 ms": res["p50_us"] / 1000,
            "p99 ms": res["p99_us"] / 1000}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    p.add_argument("--web-workers", type=int, default=2, help="WEB_CONCURRENCY (default 2, the product default)")
    p.add_argument("--dir", help="parent directory of the Redis data dir (default: the temp dir); its disk matters")
    args = p.parse_args()
    d = short_tmpdir("sps-bench-fsync-") if not args.dir else Path(args.dir) / f"sps-fsync-{time.time_ns()}"
    work, script, loads = prepare_loads(args.seconds)
    redis_server = Redis(d, persistent=True).start()
    web = Web(redis_server.url, concurrency=args.web_workers)
    admin = redis_server.client()
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        web.start()
        wrk(script, work / "single.txt", web.url, 32, 2, loads["single"][1])  # warm-up
        for run in range(args.runs):
            policies = ("everysec", "always") if run % 2 == 0 else ("always", "everysec")
            for policy in policies:
                for kind, (conns, count, per_request) in loads.items():
                    admin.flushall()
                    admin.config_set("appendfsync", policy)
                    assert admin.config_get("appendfsync")["appendfsync"] == policy
                    time.sleep(1)
                    r = wrk(script, work / f"{kind}.txt", web.url, conns, args.seconds, count)
                    r["events/s"] = r["rps"] * per_request
                    results.setdefault((policy, kind), []).append(r)
                    print(f"  run {run + 1} {policy:8} {kind:6}: {r['events/s']:8.0f} events/s  "
                          f"p50 {r['p50 ms']:6.1f} ms  p99 {r['p99 ms']:6.1f} ms", flush=True)
        info = admin.info("persistence")
        f50, f99 = fsync_latency(d)
        print(f"  aof_delayed_fsync={info.get('aof_delayed_fsync')}; fsync of a 4 KB append in the data dir: "
              f"p50 {f50:.2f} ms, p99 {f99:.2f} ms (`always` pays about one per event-loop turn of redis-server)")
    finally:
        admin.close()
        web.stop()
        redis_server.stop()
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nappendfsync, WEB_CONCURRENCY={args.web_workers}, {args.seconds:.0f} s phases, "
          f"median of {args.runs} runs\n")
    print("| load | appendfsync | events/s | p50 | p99 | events/s per run |\n|---|---|---|---|---|---|")
    for kind, label in (("single", "signed single events, wrk 32 connections"),
                        ("batch", f"signed {BATCH}-event batches, wrk 4 connections")):
        for policy in ("everysec", "always"):
            rs = results[(policy, kind)]
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            each = " / ".join(f"{r['events/s']:.0f}" for r in rs)
            print(f"| {label} | {policy} | {med['events/s']:,.0f} | {med['p50 ms']:.1f} ms | {med['p99 ms']:.1f} ms "
                  f"| {each} |")


if __name__ == "__main__":
    main()
