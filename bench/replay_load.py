"""Replay and import: how fast a history file loads, and what a replay running at a given rate does to live intake.

For each rate: live single-event webhooks paced as `make bench`'s `paced` scenario (~1,800 requests/s: wrk, 24
connections, 10 ms apart), p95 alone and while `persona-sync import` loads a generated Segment S3 archive at that
rate; the ratio is what the default `--rate` is chosen by (live p95 within 2x). Unthrottled, the import's own
speed (events/s).

    python -m bench.replay_load [--events 100000] [--rates 1000 2000 4000 0] [--runs 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from bench.run import Stack, scenario, wrk


def archive(path: Path, n: int, seed: int = 1) -> Path:
    """A month of Segment history as the S3 destination writes it: gzip, one event per line, Segment's times."""
    rnd = random.Random(seed)
    start = int(time.time() * 1000) - 30 * 86_400_000
    with gzip.open(path, "wb") as f:
        for i in range(n):
            user = rnd.randrange(n // 10 or 1)
            ts = start + rnd.randrange(30 * 86_400_000)
            iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts / 1000)) + f".{ts % 1000:03d}Z"
            if i % 5 == 0:
                e = {"type": "identify", "userId": f"h{user}", "anonymousId": f"ha{user}", "traits": {
                    "plan": rnd.choice(["free", "pro"]), "email": f"h{user}@example.com"}}
            else:
                e = {"type": "track", "userId": f"h{user}", "event": "Order Completed", "properties": {
                    "order_id": f"ho{i}", "revenue": rnd.randint(5, 300), "products": [{"category": "books"}]}}
            e.update(messageId=f"hist-{i}", timestamp=iso, receivedAt=iso,
                     context={"library": {"name": "analytics.js"}})
            f.write(orjson.dumps(e) + b"\n")
    return path


def split_by_day(path: Path, into: Path, compress: bool = True) -> list[Path]:
    """The archive as Segment's S3 destination lays it out: one gzip file per received day (or plain NDJSON)."""
    into.mkdir()
    days: dict[str, list[bytes]] = {}
    with gzip.open(path) as f:
        for line in f:
            days.setdefault(orjson.loads(line)["receivedAt"][:10], []).append(line)
    out = []
    for day, lines in sorted(days.items()):
        out.append(into / (f"{day}.gz" if compress else f"{day}.ndjson"))
        with (gzip.open(out[-1], "wb") if compress else open(out[-1], "wb")) as g:
            g.writelines(lines)
    return out


def batch_bodies(path: Path, into: Path, size: int = 1000) -> Path:
    """The archive's events as Webhooks (Actions) batch bodies of ``size``, one per line (bench/batch_file.lua)."""
    with gzip.open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    with open(into, "wb") as out:
        for i in range(0, len(lines), size):
            out.write(b"[" + b",".join(lines[i:i + size]) + b"]\n")
    return into


def import_run(stack: Stack, path: Path | list[Path], rate: float,
               workers: int = 1) -> tuple[subprocess.Popen, float]:
    exe = str(Path(sys.executable).with_name("persona-sync"))
    env = dict(os.environ, REDIS_URL=stack.redis.url)
    files = [str(p) for p in (path if isinstance(path, list) else [path])]
    return subprocess.Popen([exe, "import", *files, "--rate", str(rate), "--workers", str(workers)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True), time.monotonic()


def paced(stack: Stack, seconds: int, tag: str) -> dict:
    return wrk(stack, "single.lua", threads=1, conns=24, seconds=seconds, run_id=tag, env={"BENCH_DELAY_MS": "10"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=100_000, help="events in the archive")
    p.add_argument("--rates", type=float, nargs="+", default=[1000, 2000, 4000, 0], help="import rates (0: none)")
    p.add_argument("--runs", type=int, default=3, help="runs per figure (median reported)")
    p.add_argument("--seconds", type=int, default=10, help="length of one live-load run")
    p.add_argument("--import-workers", type=int, nargs="+", default=[1, 2], help="processes of the lone import")
    p.add_argument("--only-import", action="store_true", help="measure the import alone, not the live load")
    args = p.parse_args(argv)
    report: dict = {"events": args.events, "rates": {}}
    with tempfile.TemporaryDirectory(prefix="sps-replay-") as d, Stack(web_workers=2) as stack:
        path = archive(Path(d) / "archive.gz", args.events)
        daily = split_by_day(path, Path(d) / "daily")
        plain = split_by_day(path, Path(d) / "plain", compress=False)
        for workers in args.import_workers:  # the import alone, unthrottled
            speeds = []
            for label, files in (("one file", [path]), ("daily files", daily), ("daily NDJSON, not gzip", plain)):
                speeds = []
                for _ in range(args.runs):
                    stack.flush()
                    proc, t0 = import_run(stack, files, 0, workers)
                    proc.wait()
                    speeds.append(args.events / (time.monotonic() - t0))
                report[f"import_events_per_s_{workers}_{label.replace(' ', '_')}"] = round(statistics.median(speeds))
                print(f"import alone, {workers} process(es), {label}", round(statistics.median(speeds)), "events/s",
                      [round(s) for s in speeds], flush=True)
        batch = scenario(stack, "b", args.runs, args.seconds, script="batch.lua", threads=1, conns=4)
        report["batch_intake_events_per_s"] = round(batch["events_per_s"])
        print("batch intake (Actions batches of 1,000, 2 web workers), same stack", report["batch_intake_events_per_s"],
              "events/s", batch["runs_events"], flush=True)
        # the same events as the import (a fifth identifies, the rest orders), so that the two compare like for like;
        # each run is shorter than the archive lasts at this speed, so no batch is sent twice in a run
        bodies = batch_bodies(path, Path(d) / "batches.ndjson")
        same = scenario(stack, "f", args.runs, min(args.seconds, 8), script="batch_file.lua", threads=1, conns=4,
                        env={"BENCH_BODIES": str(bodies)})
        report["batch_intake_same_events_per_s"] = round(same["events_per_s"])
        if same["errors"] or max(same["runs_events"]) * min(args.seconds, 8) > args.events:
            print("warning: errors, or the runs sent some batches twice (more --events)", flush=True)
        print("batch intake of the archive's own events, same stack", report["batch_intake_same_events_per_s"],
              "events/s", same["runs_events"], flush=True)
        if args.only_import:
            print(json.dumps(report, indent=2))
            return 0
        alone = []
        for i in range(args.runs):
            stack.flush()
            alone.append(paced(stack, args.seconds, f"alone{i}{time.time_ns()}")["p95_us"])
        report["live_p95_us_alone"] = statistics.median(alone)
        for rate in args.rates:
            loaded = []
            for i in range(args.runs):
                stack.flush()
                proc, _ = import_run(stack, path, rate)
                time.sleep(1)  # the import is under way
                result = paced(stack, args.seconds, f"r{rate}{i}{time.time_ns()}")  # the import runs beside it
                still_running = proc.poll() is None
                proc.terminate()
                proc.wait()
                loaded.append((result["p95_us"], still_running))
            p95 = statistics.median(x for x, _ in loaded)
            report["rates"][str(int(rate))] = {"live_p95_us": p95, "ratio": round(p95 / report["live_p95_us_alone"], 2),
                                               "import_ran_throughout": all(r for _, r in loaded)}
            print("rate", rate, report["rates"][str(int(rate))], flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
