"""A real Sentinel deployment (primary, one replica, three sentinels on loopback) shared by a module's tests and
emptied before each; tests that fail a primary over start their own (``tests/sentinels.py``)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.sentinels import SentinelGroup


@pytest.fixture(scope="module")
def sentinel_group() -> Iterator[SentinelGroup]:
    with SentinelGroup(replicas=1) as group:
        yield group


@pytest.fixture
def group(sentinel_group: SentinelGroup) -> SentinelGroup:
    """The module's group, emptied, with its replica caught up."""
    primary = sentinel_group.primary()
    with sentinel_group.data_client(primary) as c:
        c.flushall()
        c.execute_command("WAIT", 1, 5000)
    return sentinel_group


def wait_for(check, seconds: float = 20.0, what: str = "condition"):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + seconds
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds:.0f} s")
        time.sleep(0.05)
    return value
