"""`persona-sync dev` (what `make run` starts): embedded Redis, web, worker and cron in one process group.

Events go in over HTTP, the debounced refresh runs in the real RQ worker, SIGTERM stops every child, and a restart
keeps the data (AOF under DATA_DIR).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson

from tests.conftest import ADMIN_TOKEN, PROFILE_TOKEN, free_port

EXE = str(Path(sys.executable).with_name("persona-sync"))


def start(data_dir: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "QUEUE_REDIS_URL", "MAVERA_API_KEY")}
    env.update(DATA_DIR=str(data_dir), PORT=str(port), ADMIN_TOKEN=ADMIN_TOKEN, PROFILE_API_TOKEN=PROFILE_TOKEN,
               REFRESH_DEBOUNCE="1s", WEB_CONCURRENCY="1", LOG_LEVEL="WARNING")
    proc = subprocess.Popen([EXE, "dev"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for(lambda: ready(port), 60)
    except AssertionError:
        proc.kill()
        raise AssertionError("dev stack did not become ready: " + proc.stdout.read().decode()[-2000:]) from None
    return proc


def ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(check, seconds: float = 30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("condition not met in time")


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_dev_stack_end_to_end_and_restart(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(tmp_path / "var", port)
    try:
        kids = children(proc.pid)
        assert len(kids) == 4  # redis-server, web, worker, cron
        events = [{"type": "identify", "userId": f"dev-{i}", "messageId": f"dev-{i}",
                   "timestamp": "2026-03-01T00:00:00Z", "traits": {"ltv": 800, "churn_risk": 0.05}}
                  for i in range(3)]
        assert httpx.post(f"{base}/segment", content=orjson.dumps(events)).json()["accepted"] == 3
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        clusters = wait_for(lambda: httpx.get(f"{base}/api/clusters", headers=auth).json()["clusters"])
        assert clusters[0]["cluster"] == "high_value" and clusters[0]["n"] == 3
        # a command from another terminal, told only the stack's DATA_DIR, finds its Redis and its archive
        cli_env = {"PATH": "/usr/bin:/bin", "DATA_DIR": str(tmp_path / "var")}
        archive = subprocess.run([EXE, "replay", "--from-archive", "--since", "90d", "--dry-run"],
                                 capture_output=True, text=True, timeout=60, env=cli_env)
        assert "EVENT_ARCHIVE_DIR is not set" not in archive.stderr, archive.stderr  # nothing archived yet: said
        assert str(tmp_path / "var" / "archive") in archive.stderr, archive.stderr  # where it looked
        elsewhere = subprocess.run([EXE, "status"], capture_output=True, text=True, timeout=60,
                                   env={**cli_env, "DATA_DIR": str(tmp_path / "other")})
        assert elsewhere.returncode == 1 and f"({tmp_path / 'other'})" in elsewhere.stderr
        assert "give this command the DATA_DIR you gave `make run`" in elsewhere.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    said = proc.stdout.read().decode() if proc.stdout else ""
    assert f"console: {base}/console (log in with ADMIN_TOKEN)" in said and ADMIN_TOKEN not in said, said
    for pid in kids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    proc = start(tmp_path / "var", port)
    try:
        resp = httpx.get(f"{base}/v1/spaces/default/collections/users/profiles/user_id:dev-1/traits",
                         auth=(PROFILE_TOKEN, ""))
        assert resp.status_code == 200 and resp.json()["traits"]["ltv"] == 800
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_the_console_line_says_how_to_turn_it_on_and_never_shows_the_token() -> None:
    from service.config import Settings
    from service.devstack.supervisor import console_line

    assert console_line(Settings(port=8001)) == ("console: http://127.0.0.1:8001/console is off; start with "
                                                 "ADMIN_TOKEN=<a long random secret> to turn it on")
    assert console_line(Settings(admin_token="s3cret")) == \
        "console: http://127.0.0.1:8000/console (log in with ADMIN_TOKEN)"


def test_a_child_whose_parent_died_before_it_asked_to_die_with_it_dies_at_once() -> None:
    """``die_with_parent`` takes the parent's pid from before the fork: a parent gone by the time the child asks
    (the child then already belongs to the reaper) is noticed, and the child ends rather than lives on."""
    code = ("import time; from service.devstack.supervisor import die_with_parent; "
            "die_with_parent(2 ** 22 + 1); time.sleep(30)")  # a pid that is not its parent's: as if that one died
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=20)
    assert proc.returncode == -signal.SIGTERM, proc.stderr


def test_a_taken_port_is_said_at_once_not_retried_for_ever(tmp_path: Path) -> None:
    """Another program on PORT: the stack says which port and what to do, and starts nothing (it used to say it was
    listening while its web exited and restarted, again and again)."""
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "QUEUE_REDIS_URL", "MAVERA_API_KEY")}
        env.update(DATA_DIR=str(tmp_path / "data"), PORT=str(port), HOST="127.0.0.1")
        out = subprocess.run([EXE, "dev"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"port {port} on 127.0.0.1 is taken" in out.stderr and f"PORT={port + 1}" in out.stderr
    assert "listening" not in out.stdout + out.stderr
    bad_host = subprocess.run([EXE, "dev"], env={**env, "HOST": "no-such-host.invalid", "PORT": "8000"},
                              capture_output=True, text=True, timeout=60)
    assert bad_host.returncode == 1 and "cannot listen on no-such-host.invalid:8000" in bad_host.stderr
    assert "check HOST" in bad_host.stderr
