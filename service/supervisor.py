"""``persona-sync dev``: embedded Redis, web, worker and cron as one supervised process group.

A child that dies is restarted (with back-off); Ctrl-C or SIGTERM stops every child, Redis last, so that the
append-only file is flushed and a restart keeps the data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from service.config import Settings
from service.redis_server import EmbeddedRedis


def _children(with_worker: bool, with_cron: bool) -> dict[str, list[str]]:
    exe = str(Path(sys.executable).with_name("persona-sync"))
    kids = {"web": [exe, "web"]}
    if with_worker:
        kids["worker"] = [exe, "worker"]
    if with_cron:
        kids["cron"] = [exe, "cron"]
    return kids


def run_dev(settings: Settings, with_worker: bool = True, with_cron: bool = True) -> int:
    embedded = None
    env = dict(os.environ)
    if not settings.redis_url:
        embedded = EmbeddedRedis(settings.data_dir).start()
        env["REDIS_URL"] = embedded.url
        print(f"persona-sync dev: embedded Redis at {embedded.url} (data in {embedded.data_dir})", flush=True)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    specs = _children(with_worker, with_cron)
    procs: dict[str, subprocess.Popen] = {}
    restarts: dict[str, list[float]] = {name: [] for name in specs}
    try:
        for name, cmd in specs.items():
            procs[name] = subprocess.Popen(cmd, env=env)
        print(f"persona-sync dev: listening on http://{settings.host}:{settings.port} "
              f"({', '.join(specs)} running; Ctrl-C stops all)", flush=True)
        while not stopping:
            time.sleep(0.5)
            for name, proc in list(procs.items()):
                if proc.poll() is None or stopping:
                    continue
                recent = [t for t in restarts[name] if t > time.monotonic() - 60]
                restarts[name] = recent + [time.monotonic()]
                if len(recent) >= 5:
                    print(f"persona-sync dev: {name} keeps exiting (code {proc.returncode}); stopping", flush=True)
                    stopping = True
                    break
                print(f"persona-sync dev: {name} exited with {proc.returncode}; restarting", flush=True)
                time.sleep(min(5, 0.5 * 2 ** len(recent)))
                procs[name] = subprocess.Popen(specs[name], env=env)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if embedded:
            embedded.stop()
        print("persona-sync dev: stopped", flush=True)
    return 0
