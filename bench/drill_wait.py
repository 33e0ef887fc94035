"""What ``STATE_WAIT_REPLICAS=1`` costs: intake with a primary and one replica under Sentinel, with and without the
receiver's ``WAIT 1`` after each request's apply script, side by side in one run with the standalone baseline.

    python -m bench.drill_wait [--runs 3] [--seconds 10] [--web-workers 2]

One Sentinel deployment from ``tests/sentinels.py`` (primary and replica with AOF everysec, three sentinels, all on
loopback TCP) and two ``persona-sync web`` processes on its ``redis+sentinel://`` URL, one with
STATE_WAIT_REPLICAS=0 and one with STATE_WAIT_REPLICAS=1; a third web on a standalone redis-server (AOF everysec,
unix socket: what ``make bench`` measures) is the baseline. Only one web is loaded at a time, and the order of the
three rotates from run to run. Load from wrk as in ``bench/drill_fsync.py``: signed single events over 32 connections,
then signed 100-event batches over 4 connections, the data flushed before each phase. Reports events/s and p50/p99
request latency, median of ``--runs`` runs. wrk, the webs, both Redis servers and the sentinels share the machine's
cores; on loopback the replica acknowledges within microseconds, so this measures the round trip and the extra
work, not a network's latency (add your primary-to-replica RTT to every request for that).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import time

from bench.drill_fsync import BATCH, prepare_loads, wrk
from tests.drills.stack import Redis, Web, short_tmpdir
from tests.sentinels import SentinelGroup

VARIANTS = ("standalone", "0", "1")  # the baseline, then STATE_WAIT_REPLICAS under Sentinel
LABELS = {"standalone": "standalone, no replica", "0": "Sentinel + replica, 0", "1": "Sentinel + replica, 1"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    p.add_argument("--web-workers", type=int, default=2, help="WEB_CONCURRENCY (default 2, the product default)")
    args = p.parse_args()
    work, script, loads = prepare_loads(args.seconds)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers on the way out
    group = SentinelGroup(replicas=1, persistent=True).start()
    data = short_tmpdir("sps-bench-wait-")
    standalone = Redis(data, persistent=True).start()
    webs = {w: Web(group.url, concurrency=args.web_workers, env={"STATE_WAIT_REPLICAS": w}) for w in ("0", "1")}
    webs["standalone"] = Web(standalone.url, concurrency=args.web_workers)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for web in webs.values():
            web.start()
            wrk(script, work / "single.txt", web.url, 32, 2, loads["single"][1])  # warm-up
        for run in range(args.runs):
            order = VARIANTS[run % 3:] + VARIANTS[:run % 3]
            for wait in order:
                for kind, (conns, count, per_request) in loads.items():
                    with group.data_client(group.primary()) as admin:
                        admin.flushall()
                        admin.execute_command("WAIT", 1, 5000)
                    with standalone.client() as admin:
                        admin.flushall()
                    time.sleep(1)
                    r = wrk(script, work / f"{kind}.txt", webs[wait].url, conns, args.seconds, count)
                    r["events/s"] = r["rps"] * per_request
                    results.setdefault((wait, kind), []).append(r)
                    print(f"  run {run + 1} {LABELS[wait]:24} {kind:6}: {r['events/s']:8.0f} events/s  "
                          f"p50 {r['p50 ms']:6.1f} ms  p99 {r['p99 ms']:6.1f} ms", flush=True)
    finally:
        for web in webs.values():
            web.stop()
        group.stop()
        standalone.stop()
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nAOF everysec, WEB_CONCURRENCY={args.web_workers}, {args.seconds:.0f} s phases, median of {args.runs} "
          "runs; change against Sentinel + replica without WAIT\n")
    print("| load | Redis, STATE_WAIT_REPLICAS | events/s | p50 | p99 | events/s per run |\n|---|---|---|---|---|---|")
    for kind, label in (("single", "signed single events, wrk 32 connections"),
                        ("batch", f"signed {BATCH}-event batches, wrk 4 connections")):
        base = statistics.median(r["events/s"] for r in results[("0", kind)])
        for wait in VARIANTS:
            rs = results[(wait, kind)]
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            each = " / ".join(f"{r['events/s']:.0f}" for r in rs)
            change = "" if wait == "0" else f" ({(med['events/s'] / base - 1) * 100:+.0f} %)"
            print(f"| {label} | {LABELS[wait]} | {med['events/s']:,.0f}{change} | {med['p50 ms']:.1f} ms | "
                  f"{med['p99 ms']:.1f} ms | {each} |")


if __name__ == "__main__":
    main()
