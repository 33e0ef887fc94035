"""The Mavera client against a real loopback Mavera-compatible server, with the real Redis limiter."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from service.config import Settings
from service.state.ops import paused, resume
from tests.mavera_server import API_KEY, MaveraServer
from workers.mavera.client import CreditsExhausted, MaveraClient, MaveraError, MaybeCreated, retry_after
from workers.mavera.ratelimit import ChatSlots, RateLimited, RateLimiter

PERSONA = {"name": "Test persona", "description": "d", "pipeline_type": "intermediate", "type": "B2C"}


@pytest.fixture
def mavera() -> Iterator[MaveraServer]:
    with MaveraServer() as server:
        yield server


def make(server: MaveraServer, r: redis.Redis, **kw) -> MaveraClient:
    settings = Settings(mavera_api_key=API_KEY, mavera_base_url=server.url, mavera_timeout=2.0,
                        mave_chat_timeout=120.0, mavera_rate_limit=600)
    return MaveraClient(settings, r, base_delay=0.05, **kw)


def test_auth_and_error_envelope(mavera: MaveraServer, r: redis.Redis) -> None:
    bad = MaveraClient(Settings(mavera_api_key="wrong", mavera_base_url=mavera.url), r, base_delay=0.01)
    with pytest.raises(MaveraError) as err:
        bad.list_personas()
    assert err.value.status == 401 and err.value.message == "Invalid API key"
    assert len(mavera.calls("GET")) == 1  # 401 is never retried


def test_cursor_paging_lists_every_persona(mavera: MaveraServer, r: redis.Redis) -> None:
    client = make(mavera, r)
    for i in range(130):
        client.create_persona(dict(PERSONA, name=f"Persona {i:03d}"))
    names = [p["name"] for p in client.list_personas()]
    assert len(names) == 130 and len(set(names)) == 130
    assert len(mavera.calls("GET", "/personas")) == 2


def test_429_retry_after_is_honoured(mavera: MaveraServer, r: redis.Redis) -> None:
    mavera.fault("GET", "/personas", status=429, retry_after=1)
    start = time.monotonic()
    assert make(mavera, r).list_personas() == []
    assert time.monotonic() - start >= 1.0
    assert len(mavera.calls("GET")) == 2


def test_retry_after_is_read_as_seconds_or_an_http_date_and_bounded() -> None:
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    in_90s = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    assert retry_after("2") == 2.0 and retry_after("0.5") == 0.5 and 85 <= retry_after(in_90s) <= 90
    assert 85 <= retry_after(in_90s.replace("GMT", "-0000")) <= 90  # UTC too, whatever the host's zone
    assert retry_after("-5") == 0.0 and retry_after("1e9") == 3600.0
    for unusable in (None, "", "nan", "inf", "-inf", "soon", "Wed, 99 Foo 2015"):
        assert retry_after(unusable) is None


@pytest.mark.parametrize("header", ["-5", "nan", "inf"])
def test_an_unusable_retry_after_is_retried_with_back_off(mavera: MaveraServer, r: redis.Redis,
                                                          header: str) -> None:
    """A negative, NaN or infinite Retry-After made ``time.sleep`` raise (the whole sync aborted) or blocked every
    worker for ever; it is now read as no header: back-off as usual."""
    mavera.fault("GET", "/personas", status=429, retry_after=float(header))
    assert make(mavera, r).list_personas() == []
    assert len(mavera.calls("GET")) == 2


def test_500_and_503_are_retried(mavera: MaveraServer, r: redis.Redis) -> None:
    mavera.fault("PATCH", None, status=500)
    mavera.fault("PATCH", None, status=503)
    client = make(mavera, r)
    pid = client.create_persona(PERSONA)["id"]
    assert client.update_persona(pid, {"description": "new"})["description"] == "new"
    assert len(mavera.calls("PATCH")) == 3


def test_400_and_404_are_not_retried_and_keep_the_message(mavera: MaveraServer, r: redis.Redis) -> None:
    client = make(mavera, r)
    with pytest.raises(MaveraError, match="name must be 2-100 characters"):
        client.create_persona(dict(PERSONA, name="x"))
    with pytest.raises(MaveraError) as err:
        client.update_persona("per_missing", {"description": "x"})
    assert err.value.status == 404 and "not found" in err.value.message
    assert len(mavera.calls("POST")) == 1 and len(mavera.calls("PATCH")) == 1


def test_402_pauses_every_worker_until_resume(mavera: MaveraServer, r: redis.Redis) -> None:
    mavera.fault("POST", "/personas", status=402, message="Credits exhausted")
    with pytest.raises(CreditsExhausted):
        make(mavera, r).create_persona(PERSONA)
    assert paused(r)["reason"].startswith("402")
    assert resume(r) and paused(r) is None


def test_lost_create_is_maybe_created_and_not_retried(mavera: MaveraServer, r: redis.Redis) -> None:
    mavera.fault("POST", "/personas", lose=True)
    with pytest.raises(MaybeCreated):
        make(mavera, r).create_persona(PERSONA)
    assert len(mavera.named("Test persona")) == 1 and len(mavera.calls("POST")) == 1


def test_create_timeout_is_maybe_created(mavera: MaveraServer, r: redis.Redis) -> None:
    mavera.fault("POST", "/personas", sleep=3)
    with pytest.raises(MaybeCreated):
        make(mavera, r).create_persona(PERSONA)
    assert len(mavera.calls("POST")) == 1


def test_a_503_with_retry_after_makes_every_worker_wait(mavera: MaveraServer, r: redis.Redis) -> None:
    mavera.fault("GET", "/personas", status=503, retry_after=1)
    worker = threading.Thread(target=make(mavera, r).list_personas)
    worker.start()
    time.sleep(0.4)
    other = RateLimiter(r, per_minute=100)
    assert other.acquire() >= 0.3  # another worker waits out the same Retry-After
    worker.join(10)
    assert len(mavera.calls("GET")) == 2


def test_gateway_5xx_after_a_create_is_maybe_created(mavera: MaveraServer, r: redis.Redis) -> None:
    mavera.fault("POST", "/personas", status=502, message="bad gateway")
    with pytest.raises(MaybeCreated, match="502"):  # a proxy's 502 says nothing about whether Mavera created it
        make(mavera, r).create_persona(PERSONA)
    assert len(mavera.calls("POST")) == 1


def test_a_long_retry_after_blocks_everyone_instead_of_holding_the_worker(mavera: MaveraServer,
                                                                          r: redis.Redis) -> None:
    mavera.fault("GET", "/personas", status=429, retry_after=600)
    start = time.monotonic()
    with pytest.raises(RateLimited, match="600"):
        make(mavera, r).list_personas()
    assert time.monotonic() - start < 5
    other = RateLimiter(r, per_minute=100, max_wait=1.0)  # another worker's limiter sees the block
    with pytest.raises(RateLimited):
        other.acquire()


def test_shared_limiter_caps_requests_across_clients(mavera: MaveraServer, r: redis.Redis) -> None:
    limiter_a = RateLimiter(r, per_minute=5, window_ms=1500)
    limiter_b = RateLimiter(r, per_minute=5, window_ms=1500)
    a, b = make(mavera, r, limiter=limiter_a), make(mavera, r, limiter=limiter_b)
    start = time.monotonic()
    for i in range(12):
        (a if i % 2 else b).list_personas()
    elapsed = time.monotonic() - start
    times = sorted(c["at"] for c in mavera.calls("GET"))
    # never more than 5 requests in any 1.5 s window, whichever client sent them
    assert all(times[i + 5] - times[i] >= 1.4 for i in range(len(times) - 5))
    assert elapsed >= 2.9


def test_remaining_zero_blocks_until_reset(r: redis.Redis) -> None:
    limiter = RateLimiter(r, per_minute=100)
    limiter.observe({"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(time.time() + 1)})
    waited = limiter.acquire()
    assert 0.3 <= waited <= 1.5


def test_a_chat_keeps_its_slot_through_its_retries(mavera: MaveraServer, r: redis.Redis) -> None:
    """A chat retried after 503s can outlast its slot's hold: the slot is renewed before each attempt, so other
    workers still count it while it runs."""
    mavera.fault("POST", "/mave/chat", status=503, retry_after=1, times=2)
    mavera.state.chat_delay = 1.5
    client = make(mavera, r)
    client.chat_slots = ChatSlots(r, limit=3, hold=1.0)
    chat = threading.Thread(target=client.chat, args=("q",))
    chat.start()
    deadline = time.monotonic() + 20
    while mavera.state.chats_in_flight == 0 and time.monotonic() < deadline:  # the third attempt is answering
        time.sleep(0.02)
    assert mavera.state.chats_in_flight == 1 and len(mavera.calls("POST", "/mave/chat")) == 3
    assert client.chat_slots.in_flight() == 1
    chat.join(30)
    assert client.chat_slots.in_flight() == 0


def test_a_lapsed_chat_slot_is_counted_again_when_renewed(r: redis.Redis) -> None:
    """A chat that waited longer than its slot's hold (rate limits, a long answer) is in flight again when its next
    attempt goes out: renewing adds the lapsed slot back."""
    slots = ChatSlots(r, limit=3, hold=0.2)
    with slots.slot() as renew:
        time.sleep(0.4)
        assert slots.in_flight() == 0  # lapsed, and pruned by the count
        renew()
        assert slots.in_flight() == 1
    assert slots.in_flight() == 0


def test_chat_concurrency_is_capped(mavera: MaveraServer, r: redis.Redis) -> None:
    mavera.state.chat_delay = 0.3
    client = make(mavera, r)
    client.chat_slots = ChatSlots(r, limit=3)
    threads = [threading.Thread(target=client.chat, args=(f"q{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(mavera.calls("POST", "/mave/chat")) == 8
    assert mavera.state.max_chats_seen == 3
    thread = client.chat("start")["thread_id"]
    answer = client.chat("again", thread_id=thread)
    assert answer["thread_id"] == thread and answer["content"]
