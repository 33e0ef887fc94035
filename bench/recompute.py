"""Recompute at scale: full recompute of N synthetic profiles, then refreshes with 1 % and 10 % of them dirty.

Profiles are written straight in the stored layout (service/spec/keys.py) with pipelined HSETs — the apply path has its
own benchmark — so that a million of them load in seconds. Reports time, the worker's peak RSS and Redis bytes per
profile (profile hash + identifier index + contribution).

    python -m bench.recompute --profiles 100000 1000000

``--workers 1 2 4`` compares instead the two ways a full recompute runs, side by side on the same loaded profiles:
``local`` (this process forks a pool of N processes) and ``jobs`` (RECOMPUTE_MODE=jobs: N real ``persona-sync
worker`` processes, one owning the run, all computing chunk jobs). ``--runs`` repetitions, alternating which mode
goes first; one JSON line per measurement, then the medians.

    python -m bench.recompute --profiles 1000000 --workers 1 2 4 --runs 3
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import redis

from service.config import Settings
from service.devstack.redis_server import EmbeddedRedis
from service.spec.keys import DAY_MS, Keys
from service.state.queue import FULL_RECOMPUTE_JOB, QUEUE_NAME
from workers.recompute import full_recompute, refresh

PLANS, INDUSTRIES, CATS = ["free", "pro", "enterprise"], ["SaaS", "Retail", "Media", "Health"], ["books", "toys",
                                                                                                  "tech", "garden"]


def profile_fields(rnd: random.Random, i: int, now_ms: int) -> dict:
    ts = now_ms - rnd.randint(0, 200) * DAY_MS
    f = {"m:fs": ts, "m:ls": ts, "m:fm": f"m{i}", "m:lm": f"m{i}", "m:ca": ts, "m:ua": ts, "m:merges": 0,
         "m:n": '{"user_id":1,"email":1}', f"x:user_id:user-{i}": f"{ts}|m{i}",
         f"x:email:user{i}@example.com": f"{ts}|m{i}",
         "t:plan": orjson.dumps(rnd.choice(PLANS)), "T:plan": ts,
         "t:industry": orjson.dumps(rnd.choice(INDUSTRIES)), "T:industry": ts}
    if rnd.random() < 0.7:
        f["t:ltv"], f["T:ltv"] = rnd.randint(0, 3000), ts
        f["t:churn_risk"], f["T:churn_risk"] = round(rnd.random() * 0.6, 3), ts
    for k in range(rnd.randint(0, 4)):
        f[f"o:o{i}-{k}"] = f"{ts - k * DAY_MS}|{rnd.randint(5, 400)}.{rnd.randint(0, 99):02d}|{rnd.choice(CATS)}"
    for ch in ("web", "mobile", "email"):
        if rnd.random() < 0.5:
            f[f"a:{ch}:{now_ms // DAY_MS - rnd.randint(0, 20)}"] = rnd.randint(1, 2**20)
    return f


def load(client: redis.Redis, keys: Keys, n: int, now_ms: int) -> None:
    rnd = random.Random(1)
    for start in range(0, n, 5000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(n, start + 5000)):
            pid = f"use_{i + 1}"
            pipe.hset(keys.profile(pid), mapping=profile_fields(rnd, i, now_ms))
            pipe.set(keys.ident("user_id", f"user-{i}"), pid)
            pipe.set(keys.ident("email", f"user{i}@example.com"), pid)
        pipe.execute()


def touch(client: redis.Redis, keys: Keys, n: int, fraction: float, now_ms: int) -> int:
    """Change ``fraction`` of the profiles (new ltv) and mark them dirty, as the receiver would."""
    rnd = random.Random(int(fraction * 1000))
    chosen = rnd.sample(range(n), int(n * fraction))
    for start in range(0, len(chosen), 5000):
        pipe = client.pipeline(transaction=False)
        for i in chosen[start:start + 5000]:
            pid = f"use_{i + 1}"
            pipe.hset(keys.profile(pid), mapping={"t:ltv": rnd.randint(0, 3000), "T:ltv": now_ms})
            pipe.sadd(keys.dirty, pid)
        pipe.execute()
    return len(chosen)


def run(n: int, processes: int | None = None) -> dict:
    settings = Settings()
    keys = Keys("bench")
    now_ms = int(time.time() * 1000)
    with tempfile.TemporaryDirectory(prefix="sps-rc-") as d, EmbeddedRedis(d, persistent=False) as server:
        client = redis.Redis.from_url(server.url)
        base = client.info("memory")["used_memory"]
        t = time.perf_counter()
        load(client, keys, n, now_ms)
        loaded = time.perf_counter() - t
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        full = full_recompute(client, settings, "bench", now_ms=now_ms, processes=processes)
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the forked recompute processes
        used = client.info("memory")["used_memory"] - base
        out = {"profiles": n, "load_s": round(loaded, 1), "full_recompute_s": full["seconds"],
               "processes": full["processes"], "peak_rss_mb": round(rss_after / 1024),
               "peak_child_rss_mb": round(child_rss / 1024), "rss_growth_mb": round((rss_after - rss_before) / 1024),
               "redis_bytes_per_profile": round(used / n)}
        for fraction in (0.01, 0.10):
            dirty = touch(client, keys, n, fraction, now_ms)
            report = refresh(client, settings, "bench", now_ms=now_ms)
            assert report["profiles"] == dirty
            out[f"refresh_{int(fraction * 100)}pct_s"] = report["seconds"]
            out[f"refresh_{int(fraction * 100)}pct_profiles"] = dirty
        return out


def start_workers(url: str, n: int) -> list[subprocess.Popen]:
    """N real workers in jobs mode, registered with RQ before this returns (their start is not timed)."""
    from rq import Queue, Worker

    exe = str(Path(sys.executable).with_name("persona-sync"))
    env = {k: v for k, v in os.environ.items() if k not in ("QUEUE_REDIS_URL", "MAVERA_API_KEY")}
    env.update(REDIS_URL=url, RECOMPUTE_MODE="jobs", LOG_LEVEL="WARNING")
    procs = [subprocess.Popen([exe, "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(n)]
    queue = Queue(QUEUE_NAME, connection=redis.Redis.from_url(url))
    while Worker.count(queue=queue) < n:
        time.sleep(0.1)
    return procs


def redis_cpu(client: redis.Redis) -> float:
    """CPU seconds redis-server has used: one shard serves a whole space, whatever the number of workers."""
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def cpu_seconds() -> float:
    """CPU this process and its finished descendants used (the fork pool, the workers and their job processes):
    what the recompute costs whatever else the shared host is running."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def jobs_run(url: str, n: int) -> dict:
    """One full recompute queued like the scheduled one, run by ``n`` workers; wall time from queueing to done."""
    from rq import Queue
    from rq.job import JobStatus

    before = cpu_seconds()  # the workers' start-up is counted too: it is small, and they cannot be split apart
    procs = start_workers(url, n)
    try:
        queue = Queue(QUEUE_NAME, connection=redis.Redis.from_url(url))
        cpu, t = redis_cpu(queue.connection), time.perf_counter()
        job = queue.enqueue(FULL_RECOMPUTE_JOB, "bench", job_timeout=3600)
        while (status := job.get_status(refresh=True)) not in (JobStatus.FINISHED, JobStatus.FAILED):
            time.sleep(0.05)
        wall, cpu = time.perf_counter() - t, redis_cpu(queue.connection) - cpu
        assert status == JobStatus.FINISHED, job.latest_result()
        [report] = job.return_value()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(60)
    return {"mode": "jobs", "processes": n, "seconds": report["seconds"], "wall_s": round(wall, 2),
            "cpu_s": round(cpu_seconds() - before, 1), "redis_cpu_s": round(cpu, 1),
            "profiles": report["profiles"], "chunks": report["chunks"], "chunks_by_owner": report["chunks_here"],
            "workers_computing": report["workers"], "plan_s": report["plan_seconds"],
            "reduce_s": report["reduce_seconds"]}


def compare(n: int, workers: list[int], runs: int) -> list[dict]:
    """``local`` with a pool of N processes against ``jobs`` with N workers, for each N, ``runs`` times."""
    settings = Settings()
    now_ms = int(time.time() * 1000)
    out = []
    with tempfile.TemporaryDirectory(prefix="sps-rc-") as d, EmbeddedRedis(d, persistent=False) as server:
        client = redis.Redis.from_url(server.url)
        t = time.perf_counter()
        load(client, Keys("bench"), n, now_ms)
        print(orjson.dumps({"profiles": n, "load_s": round(time.perf_counter() - t, 1)}).decode(), flush=True)
        for rep in range(runs):
            for procs in workers:
                for mode in (("local", "jobs") if rep % 2 == 0 else ("jobs", "local")):
                    if mode == "local":
                        cpu, before = redis_cpu(client), cpu_seconds()
                        report = full_recompute(client, settings, "bench", processes=procs)
                        row = {"mode": "local", "processes": procs, "seconds": report["seconds"],
                               "cpu_s": round(cpu_seconds() - before, 1),
                               "redis_cpu_s": round(redis_cpu(client) - cpu, 1), "profiles": report["profiles"]}
                    else:
                        row = jobs_run(server.url, procs)
                    out.append(row | {"run": rep + 1})
                    print(orjson.dumps(out[-1]).decode(), flush=True)
    for procs in workers:
        for mode in ("local", "jobs"):
            rows = [row for row in out if row["mode"] == mode and row["processes"] == procs]
            print(orjson.dumps({"median": mode, "processes": procs, **{
                k: statistics.median(row[k] for row in rows) for k in ("seconds", "cpu_s", "redis_cpu_s")},
                "runs": [row["seconds"] for row in rows]}).decode(), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.recompute", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", type=int, nargs="+", default=[100_000], help="profile counts to measure")
    p.add_argument("--processes", type=int, help="processes of the full recompute (default: one per core, up to 4)")
    p.add_argument("--workers", type=int, nargs="+", help="compare local and jobs mode with these process counts")
    p.add_argument("--runs", type=int, default=3, help="repetitions of the --workers comparison")
    args = p.parse_args(argv)
    if args.workers:
        for n in args.profiles:
            compare(n, args.workers, args.runs)
        return 0
    for n in args.profiles:
        print(orjson.dumps(run(n, args.processes)).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
