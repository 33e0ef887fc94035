"""``make bench``: drive the embedded stack (real redis-server + `persona-sync web`) with wrk from another process.

Scenarios (each run several times; medians reported):
  single  single-event webhook requests at full speed: requests/s, p50 / p95 / p99 latency
  paced   single events at a fixed ~2,000 requests/s (wrk's per-connection delay): p95 latency
  batch   Webhooks (Actions) batches of 1000 events: events/s
          (single and batch also report Redis and web CPU µs per event: INFO cpu and /proc, over each run;
          Redis starts each run with the dedupe records a space holds after a day at 1,000 events/s: --dedupe-fill)
  memory     Redis bytes per remembered messageId and per profile (see bench/memory.py)
  recompute  full recompute of N synthetic profiles, refresh with 1 % and 10 % dirty (bench/recompute.py)
  profile_cost  CPU per profile of the recompute's pure stages, without Redis (bench/profile_cost.py)
  freshness  event → PATCH at Mavera under steady ingest, and with every create answer lost (bench/freshness.py)
  slow_clients  p50 / p99 of normal requests alone and beside idle, half-sent and trickling clients
                (bench/drill_slow_clients.py)
  fsync      intake under appendfsync everysec vs always (bench/drill_fsync.py)
  wait       intake with a replica under Sentinel, STATE_WAIT_REPLICAS 0 vs 1 (bench/drill_wait.py)
  console    the console's overview page with a million profiles: median and p95 (bench/console.py)
Results go to bench/results/latest.json and are printed as a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

from bench.apply_cost import DAY_OF_IDS, FILL_SHARDS, fill_dedupe
from service.config import Settings
from service.devstack.redis_server import EmbeddedRedis

HERE = Path(__file__).resolve().parent
SCENARIOS = ["single", "paced", "batch", "memory", "recompute", "profile_cost", "freshness", "slow_clients", "fsync",
             "wait", "console"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk not found: installing the Debian package (needs root)...", flush=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, capture_output=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is required for `make bench`: apt-get install wrk")
    return found


def start_web(port: int, workers: int, **env: str) -> subprocess.Popen:
    """`persona-sync web` on ``port`` with ``env`` on top of ours, once it answers /readyz."""
    exe = str(Path(sys.executable).with_name("persona-sync"))
    web = subprocess.Popen([exe, "web", "--workers", str(workers), "--port", str(port)],
                           env=dict(os.environ, PORT=str(port), LOG_LEVEL="WARNING", **env), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return web
        except httpx.HTTPError:
            time.sleep(0.2)
    web.terminate()
    raise SystemExit("the web app did not become ready")


class Stack:
    """Embedded Redis (AOF on, as in production) and the web app under uvicorn, as `make run` starts them."""

    def __init__(self, web_workers: int, env: dict[str, str] | None = None) -> None:
        self.extra_env = env or {}
        self.tmp = tempfile.mkdtemp(prefix="sps-bench-")
        self.redis = EmbeddedRedis(self.tmp, persistent=True)
        self.port = free_port()
        self.web_workers = web_workers
        self.web: subprocess.Popen | None = None

    def __enter__(self) -> Stack:
        self.redis.start()
        self.web = start_web(self.port, self.web_workers, REDIS_URL=self.redis.url, SEGMENT_SHARED_SECRETS="",
                             SEGMENT_WRITE_KEYS="", REFRESH_DEBOUNCE="5s", **self.extra_env)
        return self

    def flush(self) -> None:
        redis.Redis.from_url(self.redis.url).flushall()

    def cpu(self) -> tuple[float, float]:
        """CPU seconds used so far by Redis (``INFO cpu``) and by the web (its process and every descendant, from
        /proc): their deltas over a run, per event, are what a capacity plan needs."""
        info = redis.Redis.from_url(self.redis.url).info("cpu")
        redis_s = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        return redis_s, sum(_proc_cpu(pid) for pid in _family(self.web.pid)) if self.web else 0.0

    def __exit__(self, *exc: object) -> None:
        if self.web:
            self.web.terminate()
            self.web.wait(20)
        self.redis.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _family(root: int) -> list[int]:
    """``root`` and every process descended from it (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    family, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        family += frontier
    return family


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(stack: Stack, script: str, threads: int, conns: int, seconds: int, run_id: str,
        env: dict[str, str] | None = None, port: int | None = None) -> dict:
    """One wrk run of ``script`` against the stack's web (or the web on ``port``); its RESULT line, parsed."""
    cmd = [need_wrk(), "-t", str(threads), "-c", str(conns), "-d", f"{seconds}s", "--timeout", "10s",
           "-s", str(HERE / script), f"http://127.0.0.1:{port or stack.port}", "--", run_id]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, BENCH_DIR=str(HERE), **(env or {})),
                         check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    return res


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def scenario(stack: Stack, name: str, runs: int, seconds: int, fill: int = 0, **kw) -> dict:
    """``fill``: ids per dedupe set remembered before each run (``bench.apply_cost.fill_dedupe``)."""
    results = []
    for i in range(runs):
        stack.flush()
        if fill:
            fill_dedupe(redis.Redis.from_url(stack.redis.url), Settings(dedupe_shards=FILL_SHARDS), "default", fill,
                        int(time.time() * 1000))
        before = stack.cpu()
        res = wrk(stack, run_id=f"{name}{i}{time.time_ns()}", seconds=seconds, **kw)
        after = stack.cpu()
        events = res["requests"] * res.get("batch", 1)
        res["redis_us_per_event"] = (after[0] - before[0]) * 1e6 / max(events, 1)
        res["web_us_per_event"] = (after[1] - before[1]) * 1e6 / max(events, 1)
        results.append(res)
        time.sleep(1)
    summary = {k: median_of(results, k)
               for k in ("rps", "p50_us", "p95_us", "p99_us", "redis_us_per_event", "web_us_per_event")}
    summary["errors"] = sum(r["status_errors"] + r["socket_errors"] for r in results)
    summary["runs"] = [round(r["rps"]) for r in results]
    if "batch" in results[0]:
        summary["events_per_s"] = summary["rps"] * results[0]["batch"]
        summary["runs_events"] = [round(r["rps"] * r["batch"]) for r in results]
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="persona-sync bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="runs per scenario (median reported)")
    p.add_argument("--seconds", type=int, default=10, help="length of one run")
    p.add_argument("--web-workers", type=int, default=2, help="uvicorn processes (one per core)")
    p.add_argument("--batch-conns", type=int, default=4, help="concurrent batch requests")
    p.add_argument("--only", choices=SCENARIOS, action="append", help="run only these scenarios (repeatable)")
    p.add_argument("--profiles", type=int, nargs="+", default=[100_000], help="profile counts for `recompute`")
    p.add_argument("--dedupe-fill", type=int, default=DAY_OF_IDS, metavar="IDS",
                   help="ids per dedupe set remembered before each intake run (default: a day at 1,000 events/s, "
                        "as a space in production holds; 0: none)")
    args = p.parse_args(argv)
    only = set(args.only or SCENARIOS)
    report: dict = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "web_workers": args.web_workers,
                    "runs": args.runs, "seconds": args.seconds, "dedupe_fill": args.dedupe_fill}
    if only & {"single", "paced", "batch"}:
        with Stack(args.web_workers, {"DEDUPE_SHARDS": str(FILL_SHARDS)} if args.dedupe_fill else None) as stack:
            if "single" in only:
                report["single"] = scenario(stack, "s", args.runs, args.seconds, args.dedupe_fill, script="single.lua",
                                            threads=1, conns=32)
                print("single", report["single"], flush=True)
            if "paced" in only:
                report["paced"] = scenario(stack, "p", args.runs, args.seconds, args.dedupe_fill, script="single.lua",
                                           threads=1, conns=24, env={"BENCH_DELAY_MS": "10"})
                print("paced", report["paced"], flush=True)
            if "batch" in only:
                report["batch"] = scenario(stack, "b", args.runs, args.seconds, args.dedupe_fill, script="batch.lua",
                                           threads=1, conns=args.batch_conns)
                print("batch", report["batch"], flush=True)
    if "memory" in only:
        from bench.memory import measure

        report["memory"] = measure()
        print("memory", report["memory"], flush=True)
    if "recompute" in only:
        from bench.recompute import run as recompute_run

        report["recompute"] = [recompute_run(n) for n in args.profiles]
        print("recompute", report["recompute"], flush=True)
    if "profile_cost" in only:
        from bench.profile_cost import run as profile_cost_run

        report["profile_cost"] = profile_cost_run(20_000, 5)
        print("profile_cost", report["profile_cost"], flush=True)
    if "freshness" in only:
        from bench.freshness import run as freshness_run

        report["freshness"] = freshness_run(12, 8.0)
        print("freshness", report["freshness"], flush=True)
        report["freshness_lost_creates"] = freshness_run(12, 8.0, lose_creates=True)
        print("freshness with every create answer lost", report["freshness_lost_creates"], flush=True)
    for name in ("slow_clients", "fsync", "wait"):  # each prints its own table; kept verbatim in the report
        if name in only:
            out = subprocess.run([sys.executable, "-m", f"bench.drill_{name}", "--runs", str(args.runs)],
                                 capture_output=True, text=True, check=True).stdout
            print(out, flush=True)
            report[name] = out
    if "console" in only:
        from bench.console import run as console_run

        report["console"] = console_run(1_000_000, 200)
        print("console", report["console"], flush=True)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
