"""``persona-sync dev``: embedded Redis, web, worker and cron under one supervisor.

One ``DATA_DIR`` holds one stack: the supervisor keeps an exclusive lock on it for its whole life, and a second
``dev`` on the same directory refuses to start and names the running one. Each child runs in a process group of
its own and is stopped and restarted with that whole group, so a web master's uvicorn workers (or a worker's
job process) never outlive it holding the port. A child that dies — the embedded redis-server included — is
restarted at once if it had run a minute, else with back-off (0.5 s doubling to 10 s), and the log says so. Ctrl-C or
SIGTERM (or SIGHUP) stops every child, Redis last, so that the append-only file is flushed and a restart keeps the
data; if the supervisor itself is killed, every child gets SIGTERM from the kernel.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.config import Settings, dev_stack_env
from service.devstack.redis_server import DataDirLock, EmbeddedRedis

BACKOFF_FIRST, BACKOFF_MAX = 0.5, 10.0  # seconds before a restart: doubling from the first to the most
STABLE_AFTER = 60.0  # a child that ran this long is healthy again: its next crash restarts it at once
STOP_GRACE = 15.0  # seconds a child gets to finish after SIGTERM before its group is killed
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


def say(message: str) -> None:
    print(f"persona-sync dev: {message}", flush=True)


def _children(with_worker: bool, with_cron: bool) -> dict[str, list[str]]:
    exe = str(Path(sys.executable).with_name("persona-sync"))
    kids = {"web": [exe, "web"]}
    if with_worker:
        kids["worker"] = [exe, "worker"]
    if with_cron:
        kids["cron"] = [exe, "cron"]
    return kids


def die_with_parent(parent: int) -> None:
    """In a child, before it runs its program: SIGTERM it when the supervisor dies, however it dies (SIGKILL
    included), so no program outlives its supervisor in a group of its own (Linux ``PR_SET_PDEATHSIG``).
    ``parent``: the parent's pid, taken before the fork; read in the child, it may already be the reaper's."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to the child's whole process group (it leads one: started with ``process_group=0``)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE) -> None:
    """SIGTERM the group, wait up to ``grace`` for the leader, then SIGKILL whatever of the group is left."""
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    signal_group(proc, signal.SIGKILL)  # orphans of a leader that died (uvicorn workers, an RQ job process)
    proc.wait()


@dataclass
class Child:
    """One supervised program: how to start it, and when it may next be restarted."""

    name: str
    start: Callable[[], subprocess.Popen]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None

    def launch(self) -> None:
        self.proc, self.started, self.restart_at = self.start(), time.monotonic(), None

    def exited(self) -> int | None:
        """The exit code if the program died (and has not been dealt with yet)."""
        if self.proc is None or self.restart_at is not None:
            return None
        return self.proc.poll()

    def schedule_restart(self) -> float:
        """Clean up the dead program's group; return the back-off before it starts again."""
        assert self.proc is not None
        stop_group(self.proc, grace=0)
        ran = time.monotonic() - self.started
        self.failures = 0 if ran >= STABLE_AFTER else self.failures + 1
        delay = 0.0 if self.failures == 0 else min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures - 1))
        self.restart_at = time.monotonic() + delay
        return delay


def console_line(settings: Settings) -> str:
    """Where the web console is (never the token itself: only whether one is set)."""
    url = f"http://{settings.host}:{settings.port}/console"
    if settings.admin_token:
        return f"console: {url} (log in with ADMIN_TOKEN)"
    return f"console: {url} is off; start with ADMIN_TOKEN=<a long random secret> to turn it on"


def cannot_listen(host: str, port: int) -> str | None:
    """Why the web could not listen on ``host:port``, and what to do (None: it can). Checked before anything
    starts: otherwise the stack says it listens while the web exits at once, again and again, and requests reach
    whatever holds the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (f"port {port} on {host} is taken ({exc.strerror}): stop what listens there, or run with "
                        f"another PORT (e.g. PORT={port + 1} make run).")
            return f"cannot listen on {host}:{port} ({exc.strerror or exc}): check HOST and PORT."
        except UnicodeError as exc:  # a HOST no resolver takes
            return f"cannot listen on {host}:{port} ({exc}): check HOST."
    return None


def run_dev(settings: Settings, with_worker: bool = True, with_cron: bool = True) -> int:
    env = dev_stack_env(os.environ, settings.data_dir)
    lock = embedded = None
    children: list[Child] = []
    if not settings.redis_url:
        lock = DataDirLock(settings.data_dir, f"http://{settings.host}:{settings.port}")
        holder = lock.acquire()
        if holder is not None:
            print(f"persona-sync dev: DATA_DIR {lock.data_dir} is in use by another stack ({holder}). Stop it, or "
                  "run this one with its own DATA_DIR and PORT (e.g. DATA_DIR=./var2 PORT=8001 make run).",
                  file=sys.stderr, flush=True)
            return 1
    unbindable = cannot_listen(settings.host, settings.port)  # after the lock: a second stack hears about the first
    if unbindable:
        if lock:
            lock.release()
        print(f"persona-sync dev: {unbindable}", file=sys.stderr, flush=True)
        return 1
    if not settings.redis_url:
        assert lock is not None
        embedded = EmbeddedRedis(settings.data_dir, preexec_fn=functools.partial(die_with_parent, os.getpid()))

        def start_redis() -> subprocess.Popen:
            assert embedded is not None
            embedded.start()
            assert embedded.proc is not None
            return embedded.proc

        redis_child = Child("redis", start_redis)
        try:
            redis_child.launch()
        except RuntimeError as exc:
            lock.release()
            print(f"persona-sync dev: {exc}", file=sys.stderr, flush=True)
            return 1
        children.append(redis_child)
        env["REDIS_URL"] = embedded.url
        say(f"embedded Redis at {embedded.url} (data in {embedded.data_dir})")
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: the terminal closed
        signal.signal(sig, stop)
    for name, cmd in _children(with_worker, with_cron).items():
        child = Child(name, functools.partial(subprocess.Popen, cmd, env=env, process_group=0,
                                              preexec_fn=functools.partial(die_with_parent, os.getpid())))
        child.launch()
        children.append(child)
    try:
        say(f"listening on http://{settings.host}:{settings.port} "
            f"({', '.join(c.name for c in children)} running; Ctrl-C stops all)")
        say(console_line(settings))
        while not stopping:
            time.sleep(0.2)
            for child in children:
                if stopping:
                    break
                code = child.exited()
                if code is not None:
                    delay = child.schedule_restart()
                    say(f"{child.name} exited with {code}; restarting in {delay:.1f} s")
                elif child.restart_at is not None and time.monotonic() >= child.restart_at:
                    try:
                        child.launch()
                    except (OSError, RuntimeError) as exc:  # e.g. Redis could not start yet: try again later
                        child.proc, child.restart_at = None, time.monotonic() + BACKOFF_MAX
                        say(f"{child.name} did not start ({exc}); trying again in {BACKOFF_MAX:.0f} s")
                        continue
                    say(f"{child.name} restarted (pid {child.proc.pid if child.proc else '?'})")
    finally:
        for child in children:  # ask every program to stop at once, then wait: Redis last
            if child.name != "redis" and child.proc and child.proc.poll() is None:
                signal_group(child.proc, signal.SIGTERM)
        for child in children:
            if child.name != "redis" and child.proc:
                stop_group(child.proc)
        if embedded:
            embedded.stop()
        if lock:
            lock.release()
        say("stopped")
    return 0
