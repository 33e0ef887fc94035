"""Mavera HTTP client (httpx): auth, the shared rate limit, retries with back-off, and error mapping.

Mavera has no idempotency keys and charges 300 credits per persona create, so a create is never retried blindly:
a transport error or a 5xx after sending it raises ``MaybeCreated``, and the sync reconciles by listing personas
before it creates again. 429 / 500 / 503 are retried with exponential back-off and jitter (honouring
``Retry-After``); 400-404 are not retried; 402 pauses all syncing until ``persona-sync resume``. Mave chat is
charged per answer, so a chat whose connection broke after it was sent is not sent again at once either
(``MaybeAnswered``): the next sync asks again, a minute later, instead of up to five times in a row.
"""

from __future__ import annotations

import datetime
import email.utils
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

import httpx
import redis

from service.config import Settings
from service.logs import event as log_event
from service.state.ops import pause
from workers.mavera.ratelimit import ChatSlots, RateLimited, RateLimiter

log = logging.getLogger("mavera")
RETRYABLE = (429, 500, 503)
MAX_SLEEP = 60.0  # a longer Retry-After blocks every worker instead, and this call gives up (RateLimited)


MAX_RETRY_AFTER = 3600.0  # the longest wait a Retry-After can impose on every worker


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: seconds or an HTTP date (RFC 9110); None when absent or not
    usable (a negative, NaN or infinite number would make ``time.sleep`` raise or block every worker for ever),
    at most ``MAX_RETRY_AFTER``."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            if when.tzinfo is None:  # '-0000' (RFC 5322: UTC, zone unknown) parses without one
                when = when.replace(tzinfo=datetime.UTC)
            seconds = when.timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class MaveraError(RuntimeError):
    """A refusal that retrying cannot fix (or retries ran out); carries Mavera's own message."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"Mavera {status}: {message}" + (f" ({code})" if code else ""))
        self.status, self.message, self.code = status, message, code


class CreditsExhausted(MaveraError):
    """402: syncing is paused for every worker until an operator runs ``persona-sync resume``."""


class MaybeCreated(RuntimeError):
    """A create was sent but its answer was lost: the persona may exist. Reconcile before creating again."""


class MaybeAnswered(RuntimeError):
    """A charged call (Mave chat) was sent but its answer was lost, or came too late: Mavera may have answered and
    charged for it. Only time is needed; sent again at the next sync, not at once."""


# errors raised before a request left: it can be sent again without risk of its being done twice
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _error(resp: httpx.Response) -> tuple[str, str | None]:
    try:
        err = resp.json().get("error") or {}
        return str(err.get("message") or resp.reason_phrase), err.get("code")
    except (ValueError, AttributeError):
        return resp.text[:200] or resp.reason_phrase, None


def _answer(resp: httpx.Response, method: str, path: str, creates: bool, charged: bool) -> Any:
    """A 2xx answer's JSON. One that is not JSON (a gateway's or CDN's page) says nothing of what happened: for a
    create, it may have happened; for a charged call, Mave may have answered; else it is an error worth a retry."""
    if not resp.content:
        return None
    try:
        return resp.json()
    except ValueError:
        what = (f"{method} {path}: a {resp.status_code} answer that is not JSON "
                f"({resp.headers.get('content-type') or 'no content type'})")
        if creates:
            raise MaybeCreated(what) from None
        if charged:
            raise MaybeAnswered(f"{what}; not sent again now (the next sync asks again)") from None
        raise MaveraError(502, what) from None


class MaveraClient:
    def __init__(self, settings: Settings, state: redis.Redis, *, max_attempts: int = 5, base_delay: float = 1.0,
                 limiter: RateLimiter | None = None) -> None:
        self.state = state
        self.max_attempts, self.base_delay = max_attempts, base_delay
        self.limiter = limiter or RateLimiter(state, settings.mavera_rate_limit)
        self.chat_slots = ChatSlots(state, settings.mave_chat_concurrency, hold=settings.mave_chat_timeout + 30)
        self.chat_timeout = settings.mave_chat_timeout
        self.http = httpx.Client(
            base_url=settings.mavera_base_url,
            headers={"Authorization": f"Bearer {settings.mavera_api_key}", "User-Agent": "segment-persona-sync"},
            timeout=httpx.Timeout(settings.mavera_timeout, connect=10.0),
        )

    def close(self) -> None:
        self.http.close()

    def _delay(self, attempt: int, resp: httpx.Response | None) -> float:
        waited = retry_after(resp.headers.get("retry-after")) if resp is not None else None
        if waited is not None:
            return waited
        return self.base_delay * (2 ** attempt) * (0.5 + random.random())  # exponential, with jitter

    def request(self, method: str, path: str, body: Any = None, *, creates: bool = False, charged: bool = False,
                timeout: float | None = None, params: dict | None = None,
                on_send: Callable[[], None] | None = None) -> Any:
        """One API call under the shared limit; retried where that is safe. ``on_send`` runs right before each
        attempt goes out (after any rate-limit wait): the sync marks a create uncertain from that moment.
        ``charged``: a lost answer is not resent (``MaybeAnswered``)."""
        limit = httpx.Timeout(timeout, connect=10.0) if timeout else httpx.USE_CLIENT_DEFAULT
        for attempt in range(self.max_attempts):
            self.limiter.acquire()
            if on_send is not None:
                on_send()
            try:
                resp = self.http.request(method, path, json=body, params=params, timeout=limit)
            except httpx.TransportError as exc:
                if creates:
                    raise MaybeCreated(f"{method} {path}: {type(exc).__name__}") from exc
                if charged and not isinstance(exc, NOT_SENT):
                    raise MaybeAnswered(f"{method} {path}: {type(exc).__name__} after it was sent; not sent again "
                                        "now, so that Mavera does not charge twice (the next sync asks again)") from exc
                log_event(log, "mavera transport error", logging.WARNING, path=path, error=type(exc).__name__)
                time.sleep(self._delay(attempt, None))
                continue
            self.limiter.observe(resp.headers)
            if resp.status_code < 300:
                return _answer(resp, method, path, creates, charged)
            message, code = _error(resp)
            if resp.status_code == 402:
                pause(self.state, f"402 from Mavera: {message}")
                raise CreditsExhausted(402, message, code)
            if creates and resp.status_code >= 500:  # a 5xx (even a gateway's) may follow a create that happened
                raise MaybeCreated(f"{method} {path}: {resp.status_code} {message}")
            # likewise a chat Mave answered (and charged) behind a gateway that gave up; unless the answer asks to
            # retry later (Retry-After: overloaded, nothing done)
            if charged and resp.status_code >= 500 and not resp.headers.get("retry-after"):
                raise MaybeAnswered(f"{method} {path}: {resp.status_code} {message}; not sent again now, so that "
                                    "Mavera does not charge twice (the next sync asks again)")
            if resp.status_code in RETRYABLE:
                delay = self._delay(attempt, resp)
                if resp.status_code == 429 or resp.headers.get("retry-after"):
                    self.limiter.block_for(delay)  # Mavera asked every caller of this key to wait
                if delay > MAX_SLEEP:  # do not hold a worker for minutes: the next sync tries after the block
                    raise RateLimited(f"{method} {path}: Mavera asked to wait {delay:.0f}s ({resp.status_code})")
                if attempt + 1 == self.max_attempts:
                    if resp.status_code == 429:
                        raise RateLimited(f"{method} {path}: still rate limited after {self.max_attempts} attempts")
                    raise MaveraError(resp.status_code, f"{message} (gave up after {self.max_attempts} attempts)", code)
                log_event(log, "mavera retry", logging.WARNING, path=path, status=resp.status_code,
                          delay=round(delay, 2))
                time.sleep(delay)
                continue
            raise MaveraError(resp.status_code, message, code)
        raise MaveraError(503, f"{method} {path}: gave up after {self.max_attempts} attempts")

    def list_personas(self) -> list[dict]:
        """Every persona, following cursor pages (and offset pages, which older responses used)."""
        out: list[dict] = []
        params: dict[str, Any] = {"limit": 100}
        for _ in range(10_000):
            page = self.request("GET", "/personas", params=params)
            data = page.get("data") or []
            out += data
            if page.get("next_cursor"):
                params = {"limit": 100, "cursor": page["next_cursor"]}
            elif page.get("has_more") and data:
                params = {"limit": 100, "offset": len(out)}
            else:
                break
        return out

    def create_persona(self, payload: dict, on_send: Callable[[], None] | None = None) -> dict:
        return self.request("POST", "/personas", payload, creates=True, on_send=on_send)

    def update_persona(self, persona_id: str, payload: dict) -> dict:
        return self.request("PATCH", f"/personas/{persona_id}", payload)

    def chat(self, message: str, thread_id: str | None = None) -> dict:
        """Mave chat (5-90 s): holds one of the shared chat slots, read timeout ``MAVE_CHAT_TIMEOUT``."""
        body: dict[str, Any] = {"message": message}
        if thread_id:
            body["thread_id"] = thread_id
        with self.chat_slots.slot() as renew:
            return self.request("POST", "/mave/chat", body, charged=True, timeout=self.chat_timeout, on_send=renew)
