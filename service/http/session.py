"""The console's session cookie and CSRF tokens (pure: the standard library's hmac, no server-side state).

A session is ``<expiry s>.<nonce>.<signature>``: HMAC-SHA256 under a key derived from ADMIN_TOKEN, so every web
process checks it without Redis, and rotating ADMIN_TOKEN ends every session at once. The cookie never holds the
token itself. The CSRF token of a form is an HMAC of the session's nonce under the same key: bound to one session,
useless with another, and never stored. Every comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

COOKIE = "sps_console"
TTL_SECONDS = 12 * 3600  # a working day; then log in again
_CONTEXT = b"persona-sync console session v1"


@dataclass(frozen=True)
class Session:
    expires: int  # epoch seconds
    nonce: str


def session_key(admin_token: str) -> bytes:
    """The signing key: never the token itself, so a leaked signature says nothing about it."""
    return hmac.new(admin_token.encode(), _CONTEXT, hashlib.sha256).digest()


def _mac(key: bytes, message: str) -> str:
    digest = hmac.new(key, message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def issue(key: bytes, now_s: int, ttl: int = TTL_SECONDS) -> str:
    """A new session cookie value, valid for ``ttl`` seconds."""
    payload = f"{now_s + ttl}.{secrets.token_urlsafe(16)}"
    return f"{payload}.{_mac(key, payload)}"


def verify(key: bytes, value: str | None, now_s: int) -> Session | None:
    """The session a cookie value carries, or None if it is missing, forged, altered or expired."""
    if not value or len(value) > 200:
        return None
    payload, _, signature = value.rpartition(".")
    expires, _, nonce = payload.partition(".")
    if not hmac.compare_digest(_mac(key, payload).encode(), signature.encode()):
        return None
    if not expires.isdigit() or int(expires) <= now_s or not nonce:
        return None
    return Session(int(expires), nonce)


def csrf_token(key: bytes, session: Session) -> str:
    """The token every form of this session posts back."""
    return _mac(key, f"csrf.{session.nonce}")


def csrf_ok(key: bytes, session: Session, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(csrf_token(key, session).encode(), given.encode())
