"""Fixtures of the drills: real redis-server and ``persona-sync web`` processes, always stopped afterwards."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest

from tests.drills.stack import Redis, Web, short_tmpdir


@pytest.fixture
def start_redis() -> Iterator[Callable[..., Redis]]:
    """Start a redis-server in a fresh short directory (``persistent``: AOF, fsynced ``appendfsync``: everysec as in
    production unless told otherwise)."""
    started: list[tuple[Redis, object]] = []

    def start(persistent: bool = True, appendfsync: str = "everysec") -> Redis:
        d = short_tmpdir()
        server = Redis(d, persistent=persistent, appendfsync=appendfsync).start()
        started.append((server, d))
        return server

    yield start
    for server, d in started:
        server.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_web() -> Iterator[Callable[..., Web]]:
    """Start ``persona-sync web`` against a Redis URL; every process group started is killed at the end."""
    started: list[Web] = []

    def start(redis_url: str, concurrency: int = 1, **kwargs: object) -> Web:
        web = Web(redis_url, concurrency=concurrency, **kwargs)  # type: ignore[arg-type]
        started.append(web)
        return web.start()

    yield start
    for web in started:
        web.stop()
