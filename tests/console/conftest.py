"""Fixtures of the console tests: the app with its job queue, logged in or not, and events sent as Segment does."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient

from service.config import Settings
from service.http.app import create_app
from tests.browser import chromium
from tests.conftest import ADMIN_TOKEN, SECRET


def signed(body: bytes) -> dict[str, str]:
    return {"X-Signature": hmac.new(SECRET.encode(), body, hashlib.sha1).hexdigest(),
            "Content-Type": "application/json"}


def send(client: TestClient, *events: dict) -> None:
    """Through the receiver, signed: what Segment's webhook delivers (and what the rate counters count)."""
    for event in events:
        body = orjson.dumps(event)
        resp = client.post("/segment", content=body, headers=signed(body))
        assert resp.status_code in (200, 400), resp.text


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, "no form with a CSRF token on this page"
    return found.group(1)


def login(client: TestClient, token: str = ADMIN_TOKEN) -> str:
    """Log in; the CSRF token of the session."""
    resp = client.post("/console/login", data={"token": token, "next": "/console/profiles"})
    assert resp.status_code == 200 and resp.url.path == "/console/profiles", resp.text
    return csrf_of(resp.text)


@pytest.fixture
def app_client(settings: Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The app with its job queue on the test Redis (as `make run` has it); not logged in."""
    monkeypatch.setenv("REDIS_URL", redis_url)  # what a worker's jobs read
    with TestClient(create_app(settings, redis_url, redis_url), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver
