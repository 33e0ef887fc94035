"""Both roles under a real Sentinel deployment (primary, replica, three sentinels on loopback): the clients every
part builds through ``service/state/connect.py``, the receiver with ``STATE_WAIT_REPLICAS``, and the whole stack —
web, ``persona-sync worker``, ``persona-sync cron`` and the operator commands — on ``redis+sentinel://`` URLs."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson
import pytest
import redis
from rq import Queue
from starlette.testclient import TestClient

from service.config import Settings
from service.devstack.redis_server import EmbeddedRedis
from service.http.app import create_app
from service.spec.keys import SPACES_KEY, Keys
from service.state.connect import connect, connect_async
from service.state.queue import QUEUE_NAME
from service.state.store import StoreUnavailable
from tests.conftest import SECRET
from tests.helpers import apply
from tests.mavera_server import API_KEY, MaveraServer
from tests.sentinel.conftest import wait_for
from tests.sentinels import SentinelGroup

EXE = str(Path(sys.executable).with_name("persona-sync"))


def identify(i: int, prefix: str = "u") -> dict:
    return {"type": "identify", "userId": f"{prefix}{i}", "messageId": f"{prefix}-msg-{i}",
            "timestamp": "2026-03-01T00:00:00Z", "traits": {"email": f"{prefix}{i}@example.com", "ltv": 900,
                                                           "churn_risk": 0.05}}


def post(client: TestClient, events: list[dict] | dict):  # noqa: ANN201
    body = orjson.dumps(events)
    first = orjson.dumps(events[0]) if isinstance(events, list) else body
    return client.post("/segment", content=body,
                       headers={"X-Signature": hmac.new(SECRET.encode(), first, hashlib.sha1).hexdigest()})


def env_for(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("QUEUE_REDIS_URL", "PROMETHEUS_MULTIPROC_DIR",
                                                              "MAVERA_API_KEY", "EVENT_ARCHIVE_DIR")}
    env.update(REDIS_URL=url, LOG_LEVEL="WARNING", **extra)
    return env


# --- the clients -------------------------------------------------------------------------------------------------


def test_blocking_and_asyncio_clients_write_to_the_primary_the_sentinels_name(group: SentinelGroup) -> None:
    client = connect(group.url, socket_timeout=5)
    client.set("k", "sync")
    assert client.get("k") == b"sync"

    async def asynchronous() -> bytes | None:
        c = connect_async(group.url, socket_timeout=5)
        await c.set("a", "async")
        value = await c.get("a")
        await c.aclose()
        return value

    assert asyncio.run(asynchronous()) == b"async"
    replica = group.data_client(group.data[1] if group.primary() is group.data[0] else group.data[0])
    wait_for(lambda: replica.get("k") == b"sync" and replica.get("a") == b"async", 10, "the replica has both")
    client.close()


def _rebuilt_set(args: tuple) -> bytes | None:
    """In a forked process: a client from the connection class and plain keyword arguments alone."""
    connection_class, kwargs = args
    client = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=connection_class, **kwargs))
    client.set("from-child", os.getpid())
    return client.get("from-child")


def test_a_client_rebuilt_from_plain_arguments_in_a_forked_process_finds_the_primary(group: SentinelGroup) -> None:
    """What the recompute's process pool (and RQ's scheduler) do: a connection of their own, built from the
    connection class and the pool's plain keyword arguments, the Sentinel pool object itself not being at hand."""
    client = connect(group.url, socket_timeout=5)
    kwargs = {k: v for k, v in client.connection_pool.connection_kwargs.items()
              if isinstance(v, str | int | float | bool) or v is None}
    assert "sentinel_url" in kwargs and "@" not in kwargs["sentinel_url"]
    args = (client.connection_pool.connection_class, kwargs)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        value = pool.apply(_rebuilt_set, (args,))
    assert value is not None and int(value) != os.getpid()
    assert _rebuilt_set(args) == str(os.getpid()).encode()  # and in this process, from the same arguments
    client.close()


def test_passwords_of_the_data_nodes_and_of_the_sentinels() -> None:
    with SentinelGroup(replicas=0, password="data-pw", sentinel_password="sentinel-pw") as g:
        assert "data-pw" in g.url and "sentinel_password=sentinel-pw" in g.url
        client = connect(g.url, socket_timeout=5)
        client.set("k", 1)
        assert client.get("k") == b"1"
        wrong_data = g.url.replace(":data-pw@", ":nope@")
        with pytest.raises(redis.AuthenticationError):
            connect(wrong_data, socket_timeout=5).ping()
        wrong_sentinel = g.url.replace("sentinel-pw", "nope")
        with pytest.raises(redis.ConnectionError):  # no sentinel answers: no primary to name
            connect(wrong_sentinel, socket_timeout=5).ping()
        # the operator's one-line error names the URL without either password
        out = subprocess.run([EXE, "status"], env=env_for(wrong_data), capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "cannot reach Redis at redis+sentinel://:***@" in out.stderr, out.stderr
        assert "data-pw" not in out.stderr and "nope" not in out.stderr and "sentinel-pw" not in out.stderr
        client.close()


# --- STATE_WAIT_REPLICAS -------------------------------------------------------------------------------------------


def receiver(url: str, **changes: object) -> TestClient:
    settings = Settings(shared_secrets=(SECRET,), admin_token="admin").replace(**changes)
    return TestClient(create_app(settings, url, settings.queue_redis_url or url), raise_server_exceptions=False)


def test_wait_replicas_200_once_the_replica_has_the_events(group: SentinelGroup) -> None:
    with receiver(group.url, state_wait_replicas=1) as client:
        assert post(client, [identify(i) for i in range(3)]).json()["accepted"] == 3
        assert post(client, identify(3)).json()["accepted"] == 1  # a single event goes through the pipeline too
    replica = next(n for n in group.data if n is not group.primary())
    # WAIT returned after the replica acknowledged: it has the events, and the space's registration, already
    with group.data_client(replica) as c:
        assert c.xlen(Keys("default").log) == 4 and c.sismember(SPACES_KEY, "default")


def test_too_few_replicas_answer_503_and_the_retry_is_a_duplicate(group: SentinelGroup) -> None:
    """Two replicas asked for, one exists: 503 within the timeout, the events are on the primary (and their
    refresh is scheduled); Segment's retry, once enough replicas acknowledge, is a 200 that applies nothing twice."""
    with receiver(group.url, state_wait_replicas=2, state_wait_timeout=0.2) as client:
        resp = post(client, [identify(i) for i in range(3)])
        assert resp.status_code == 503 and resp.headers["retry-after"] == "5"
        assert "1 of 2 replica(s) acknowledged" in resp.json()["error"]["message"]
    primary = connect(group.url)
    assert primary.xlen(Keys("default").log) == 3
    assert primary.exists(Keys("default").refresh_pending)  # applied, so their refresh is due regardless
    with receiver(group.url, state_wait_replicas=1) as client:
        again = post(client, [identify(i) for i in range(3)]).json()
    assert (again["accepted"], again["duplicate"]) == (0, 3)
    assert primary.xlen(Keys("default").log) == 3
    primary.close()


def test_status_shows_the_replica_and_says_when_fewer_are_online_than_wait_replicas(group: SentinelGroup) -> None:
    """``GET /admin/status`` and ``persona-sync status`` read the primary's replicas: the one replica online and in
    step, and, with STATE_WAIT_REPLICAS above that, the problem that every request is answered 503."""
    admin = {"Authorization": "Bearer admin"}
    with receiver(group.url) as client:
        assert post(client, identify(1)).status_code == 200
        repl = client.get("/admin/status", headers=admin).json()["redis"]["replication"]
    assert (repl["role"], repl["replicas"], repl["online"]) == ("primary", 1, 1)
    assert repl["lag_s"] is not None and repl["lag_s"] < 5
    with receiver(group.url, state_wait_replicas=2) as client:
        status = client.get("/admin/status", headers=admin).json()
    assert any(p["problem"].startswith("STATE_WAIT_REPLICAS is 2 but the STATE primary has 1 replica(s) online")
               for p in status["problems"])
    out = subprocess.run([EXE, "status"], capture_output=True, text=True, timeout=60,
                         env=env_for(group.url, STATE_WAIT_REPLICAS="2", COLUMNS="200"))
    assert out.returncode == 0, out.stderr
    assert "1 of 1 online" in out.stdout and "STATE_WAIT_REPLICAS is 2" in out.stdout, out.stdout


def test_wait_replicas_on_a_redis_without_replicas_is_503_never_200() -> None:
    with tempfile.TemporaryDirectory(prefix="sps-") as d, EmbeddedRedis(d, persistent=False) as server:
        with receiver(server.url, state_wait_replicas=1, state_wait_timeout=0.05) as client:
            assert post(client, identify(1)).status_code == 503
            assert post(client, identify(2)).status_code == 503
        with receiver(server.url) as client:  # the default: the primary's word
            assert post(client, identify(1)).json()["duplicate"] == 1


# --- the stack on Sentinel URLs ------------------------------------------------------------------------------------


def test_web_worker_cron_and_commands_on_sentinel_urls(group: SentinelGroup, tmp_path: Path) -> None:
    """Events in through the web → ``persona-sync worker`` refreshes the profiles and creates the persona in
    Mavera → ``persona-sync status`` and ``jobs`` read both roles → ``persona-sync cron`` schedules its jobs on the
    Sentinel queue and ends on SIGTERM. STATE and QUEUE are two databases of the same Sentinel deployment."""
    state_url, queue_url = group.url, group.url + "/1"
    with receiver(state_url, queue_redis_url=queue_url) as client:
        assert post(client, [identify(i) for i in range(5)]).json()["accepted"] == 5
    queue = Queue(QUEUE_NAME, connection=connect(queue_url))
    assert [j.func_name for j in queue.get_jobs()] == ["workers.jobs.refresh"]
    assert connect(state_url).llen(f"rq:queue:{QUEUE_NAME}") == 0  # the job went to the queue's database

    env = env_for(state_url, QUEUE_REDIS_URL=queue_url, REFRESH_DEBOUNCE="1s")
    with MaveraServer() as mavera:
        worker_env = {**env, "MAVERA_API_KEY": API_KEY, "MAVERA_BASE_URL": mavera.url}
        for _ in range(2):  # the refresh, then the sync it queues
            out = subprocess.run([EXE, "worker", "--burst"], env=worker_env, capture_output=True, text=True,
                                 timeout=120)
            assert out.returncode == 0, out.stderr[-2000:]
        assert len(mavera.state.personas) == 1
    state = connect(state_url)
    assert state.hlen(Keys("default").contributions) == 5

    status = subprocess.run([EXE, "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr[-2000:]
    assert orjson.loads(status.stdout)["spaces"][0]["space"] == "default"
    jobs = subprocess.run([EXE, "jobs"], env=env, capture_output=True, text=True, timeout=60)
    assert jobs.returncode == 0, jobs.stderr[-2000:]

    archive = tmp_path / "archive"
    cron = subprocess.Popen([EXE, "cron"], env={**env, "EVENT_ARCHIVE_DIR": str(archive), "LOG_LEVEL": "INFO"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # the archive job runs every minute, the first one at once
        wait_for(lambda: "service.state.archive.archive_job" in [j.func_name for j in queue.get_jobs()], 30,
                 "cron queued the archive job")
    finally:
        cron.send_signal(signal.SIGTERM)
        output = cron.communicate(timeout=30)[0]
    assert cron.returncode == 0, output[-2000:]
    state.close()


def test_a_primary_demoted_under_the_web_is_503_never_a_dead_letter(group: SentinelGroup) -> None:
    """After a failover the old primary is made a replica while clients may still hold connections to it; its
    script writes then fail with READONLY inside the apply script. That is Redis refusing writes for now (503,
    Segment retries), not events to keep as dead letters beside a 200."""
    replica = next(n for n in group.data if n is not group.primary())
    with receiver(f"redis://127.0.0.1:{replica.port}/0") as client:
        single, batch = post(client, identify(1)), post(client, [identify(i) for i in range(2, 5)])
    assert (single.status_code, batch.status_code) == (503, 503), (single.text, batch.text)
    with group.data_client(replica) as c:
        assert c.xlen(Keys("default").dead_letters) == 0
        with pytest.raises(StoreUnavailable):  # the workers' and operators' path (replay, import) stops too
            apply(c, [identify(5)])
    with group.data_client(group.primary()) as c:
        assert c.xlen(Keys("default").dead_letters) == 0 and c.xlen(Keys("default").log) == 0


def test_min_replicas_to_write_unmet_is_503_never_a_dead_letter() -> None:
    """Redis's own guard (``min-replicas-to-write``) refuses the script's writes with NOREPLICAS: 503, kept nowhere."""
    with tempfile.TemporaryDirectory(prefix="sps-") as d, EmbeddedRedis(d, persistent=False) as server:
        admin = redis.Redis.from_url(server.url)
        admin.config_set("min-replicas-to-write", 1)
        with receiver(server.url) as client:
            assert post(client, identify(1)).status_code == 503
            assert post(client, [identify(i) for i in range(2, 5)]).status_code == 503
        assert admin.xlen(Keys("default").dead_letters) == 0 and admin.xlen(Keys("default").log) == 0
        admin.config_set("min-replicas-to-write", 0)
        with receiver(server.url) as client:
            assert post(client, identify(1)).json()["accepted"] == 1
        admin.close()


def test_an_import_waits_for_the_replicas_and_stops_resumable_when_too_few_acknowledge(group: SentinelGroup,
                                                                                      tmp_path: Path) -> None:
    """With STATE_WAIT_REPLICAS an import is done only once the replicas have its events: the replica holds every
    one when the command returns. Asked for more replicas than exist, it stops at the first chunk, in one process
    or several, says why and how to resume (exit 1, no traceback), and the resume applies nothing twice."""
    from tests.state.test_replay import archived, write_archive

    path = write_archive(tmp_path / "archive.gz", archived([identify(i, "imp") for i in range(300)]))
    replica = next(n for n in group.data if n is not group.primary())
    short = subprocess.run([EXE, "import", str(path), "--rate", "0"], capture_output=True, text=True, timeout=120,
                           env=env_for(group.url, STATE_WAIT_REPLICAS="2", STATE_WAIT_TIMEOUT="0.1"))
    assert short.returncode == 1, short.stderr
    assert "1 of 2 replica(s) acknowledged" in short.stderr and "Traceback" not in short.stderr
    assert f"continue with: persona-sync import {path} --rate 0 --resume" in short.stderr
    shared = subprocess.run([EXE, "import", str(path), "--rate", "0", "--workers", "2"], capture_output=True,
                            text=True, timeout=120,
                            env=env_for(group.url, STATE_WAIT_REPLICAS="2", STATE_WAIT_TIMEOUT="0.1"))
    assert shared.returncode == 1, shared.stderr
    assert "persona-sync import: Redis refused a chunk" in shared.stderr and "Traceback" not in shared.stderr
    assert f"continue with: persona-sync import {path} --rate 0 --workers 2 --resume" in shared.stderr
    done = subprocess.run([EXE, "import", str(path), "--rate", "0", "--workers", "2", "--resume"],
                          capture_output=True, text=True, timeout=120, env=env_for(group.url, STATE_WAIT_REPLICAS="1"))
    assert done.returncode == 0, done.stderr
    with group.data_client(replica) as c:  # WAIT returned after the replica acknowledged: it has them all already
        assert c.xlen(Keys("default").log) == 300
