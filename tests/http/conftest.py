"""Fixtures for the HTTP tests that drive a real browser."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser import chromium


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver
