"""Supervision drill: ``persona-sync dev`` keeps its stack alive. A crashed web (its master SIGKILLed alone, leaving
uvicorn workers that hold the port), worker, cron or embedded redis-server is restarted with back-off, the log says
so, and the data survives; a second ``dev`` on the same DATA_DIR refuses and names the running one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.devstack.test_dev_stack import ADMIN_TOKEN, PROFILE_TOKEN, free_port, ready, wait_for
from tests.drills.stack import short_tmpdir

EXE = str(Path(sys.executable).with_name("persona-sync"))


def dev_env(data_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "QUEUE_REDIS_URL", "MAVERA_API_KEY")}
    env.update(DATA_DIR=str(data_dir), PORT=str(port), ADMIN_TOKEN=ADMIN_TOKEN, PROFILE_API_TOKEN=PROFILE_TOKEN,
               REFRESH_DEBOUNCE="1s", WEB_CONCURRENCY="2", LOG_LEVEL="WARNING")
    return env


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process on the machine."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError, ValueError):
            continue
        out[int(entry.name)] = (ppid, cmd)
    return out


def child(parent: int, word: str) -> int:
    """The pid of ``parent``'s child whose command line has the word ``word`` (``web``, ``worker``, ``cron``: the
    cron process has become ``rq cron``) or names ``redis-server``."""
    for pid, (ppid, cmd) in processes().items():
        if ppid == parent and (f" {word} " in f" {cmd} " or (word == "redis" and "redis-server" in cmd)):
            return pid
    raise AssertionError(f"no {word} child of {parent}")


def descendants(pid: int) -> set[int]:
    table = processes()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, (pp, _) in table.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


@pytest.fixture
def stack() -> Iterator[tuple[subprocess.Popen, Path, int, Path]]:
    data, port = short_tmpdir(), free_port()
    log = data / "dev.log"
    proc = subprocess.Popen([EXE, "dev"], env=dev_env(data / "var", port), stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: ready(port), 60)
        yield proc, data, port, log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def post(port: int, uid: str) -> None:
    body = {"type": "identify", "userId": uid, "messageId": f"m-{uid}", "timestamp": "2026-03-01T00:00:00Z",
            "traits": {"ltv": 800}}
    assert httpx.post(f"http://127.0.0.1:{port}/segment", content=orjson.dumps(body)).status_code == 200


def traits(port: int, uid: str) -> int:
    return httpx.get(f"http://127.0.0.1:{port}/v1/spaces/default/collections/users/profiles/user_id:{uid}/traits",
                     auth=(PROFILE_TOKEN, ""), timeout=5).status_code


def test_a_second_stack_on_the_same_data_dir_refuses_and_the_first_keeps_serving(stack) -> None:
    proc, data, port, _ = stack
    post(port, "first")
    second = subprocess.run([EXE, "dev"], env=dev_env(data / "var", free_port()), capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 1
    assert "is in use by another stack" in second.stderr and f"pid {proc.pid}" in second.stderr
    assert f"127.0.0.1:{port}" in second.stderr  # names the running stack
    assert traits(port, "first") == 200 and ready(port)  # its socket was not touched
    same_port = subprocess.run([EXE, "dev"], env=dev_env(data / "var", port), capture_output=True, text=True,
                               timeout=60)  # `make run` twice, as is: told of the stack, not only of its port
    assert same_port.returncode == 1 and "is in use by another stack" in same_port.stderr, same_port.stderr


def test_every_crashed_child_is_restarted_and_the_log_says_so(stack) -> None:
    proc, _, port, log = stack
    post(port, "before")
    web = child(proc.pid, "web")
    workers = descendants(web)
    assert workers  # uvicorn's worker processes
    os.kill(web, signal.SIGKILL)  # the master alone: its workers would keep the port
    wait_for(lambda: _restarted(proc.pid, "web", web), 30)
    wait_for(lambda: ready(port), 60)
    assert not any(alive(p) for p in workers)  # the orphans went with their group
    post(port, "after-web")
    for name in ("worker", "cron"):
        pid = child(proc.pid, name)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda pid=pid, name=name: _restarted(proc.pid, name, pid), 30)
    text = log.read_text()
    for name in ("web", "worker", "cron"):
        assert f"{name} exited with -9; restarting in" in text and f"{name} restarted (pid" in text


def _restarted(parent: int, name: str, old: int) -> bool:
    try:
        return child(parent, name) != old
    except AssertionError:
        return False


def test_a_crashed_embedded_redis_is_restarted_on_the_same_data(stack) -> None:
    proc, _, port, log = stack
    post(port, "kept")
    time.sleep(1.5)  # appendfsync everysec: what the kernel has is kept by a SIGKILL anyway; this is belt and braces
    os.kill(child(proc.pid, "redis"), signal.SIGKILL)
    wait_for(lambda: "redis exited with -9" in log.read_text(), 30)
    wait_for(lambda: ready(port), 60)
    assert traits(port, "kept") == 200
    post(port, "after-redis")
    assert traits(port, "after-redis") == 200


def test_nothing_outlives_a_killed_supervisor(stack) -> None:
    proc, _, port, _ = stack
    family = descendants(proc.pid)
    assert len(family) >= 5  # redis, web (and its workers), worker, cron
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not any(alive(p) for p in family), 40)
    assert not ready(port)
