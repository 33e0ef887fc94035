"""How long ``persona-sync move-space`` stalls a Cluster primary: a space of N profiles (written straight in the
stored layout, as ``bench.recompute`` does, plus logged events) moved to another primary of a local 3-primary
cluster, with the time to move and the keys and bytes per second.

    python -m bench.move_space --profiles 10000 100000 --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from typing import Any, cast

import orjson

from bench.recompute import load
from service.devstack.cluster import LocalCluster
from service.spec.keys import Keys
from service.state.connect import connect
from service.state.reshard import move_space, owner


def run(n: int, events_per_profile: int) -> dict:
    keys = Keys("bench")
    now_ms = int(time.time() * 1000)
    with tempfile.TemporaryDirectory(prefix="sps-mv-") as d:
        cluster = LocalCluster(d).start()
        try:
            client = connect(cluster.url, cluster=True)
            load(client, keys, n, now_ms)
            raw = orjson.dumps({"type": "track", "event": "Order Completed", "userId": "u", "messageId": "m" * 36,
                                "properties": {"order_id": "o-1", "revenue": 42.5, "products": [{"sku": "s"}]}})
            for start in range(0, n * events_per_profile, 5000):
                pipe = client.pipeline(transaction=False)
                for i in range(start, min(n * events_per_profile, start + 5000)):
                    pipe.xadd(keys.log, {"p": f"use_{i % n + 1}", "e": raw})
                pipe.execute()
            source = owner(client, "bench")
            node = cast(Any, client).get_node(node_name=source).redis_connection
            used = node.info("memory")["used_memory"]
            target = next(x.name for x in cast(Any, client).get_primaries() if x.name != source)
            moved = move_space(client, "bench", target)
            return {"profiles": n, "events": n * events_per_profile, "keys": moved.keys, "seconds": moved.seconds,
                    "keys_per_s": round(moved.keys / moved.seconds), "source_mb": round(used / 2**20),
                    "mb_per_s": round(used / 2**20 / moved.seconds, 1)}
        finally:
            cluster.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.move_space", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--events-per-profile", type=int, default=5, help="logged events per profile (default 5)")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    for n in args.profiles:
        runs = [run(n, args.events_per_profile) for _ in range(args.runs)]
        best = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        print(orjson.dumps({**best, "runs_s": [r["seconds"] for r in runs],
                            "median_s": statistics.median(r["seconds"] for r in runs)}).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
