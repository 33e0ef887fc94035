"""Bytes per event of the event log in Redis and of the archive on disk (``python -m bench.archive_size``).

Applies a generated month of Segment events (the `replay_load` archive: identifies and orders, with Segment's
times and library context) with an archive configured, measures the log stream's memory in Redis (MEMORY USAGE,
every entry sampled), archives it, and measures the gzip files."""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
from pathlib import Path

import orjson
import redis

from bench.replay_load import archive
from service.config import Settings
from service.devstack.redis_server import EmbeddedRedis
from service.spec.keys import Keys
from service.state.archive import archive_files, archive_space
from service.state.replay import Options, file_records, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--events", type=int, default=100_000)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sps-size-") as d:
        source = archive(Path(d) / "source.gz", args.events)
        raw_bytes = sum(len(line) for line in gzip.open(source))
        settings = Settings(event_archive_dir=str(Path(d) / "archive"))
        server = EmbeddedRedis(d, persistent=False).start()
        try:
            client = redis.Redis.from_url(server.url)
            run(client, settings, "default", file_records([str(source)]), Options(), "import")
            log = Keys("default").log
            in_redis = client.memory_usage(log, samples=0) or 0
            entries = client.xlen(log)
            archive_space(client, settings, "default")
            on_disk = sum(f.stat().st_size for f in archive_files(settings.event_archive_dir, "default"))
        finally:
            server.stop()
    report = {"events": entries, "event_json_bytes": round(raw_bytes / args.events, 1),
              "redis_log_bytes_per_event": round(in_redis / entries, 1),
              "archive_bytes_per_event": round(on_disk / entries, 1)}
    print(orjson.dumps(report).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
