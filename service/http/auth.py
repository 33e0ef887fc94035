"""Signatures and tokens (pure). Every comparison is constant-time; no secret is ever logged or echoed."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping

from service.spec.bodies import MAX_EVENT_BYTES, skip_space, value_end

# How far the first element of an Actions batch is looked for: 8 times the largest event Segment takes. The scan
# runs before the signature is known to be good, so it must not walk megabytes of brackets for an attacker (a
# 16 KB gzip inflates to 16 MB of '[': seconds of a blocked event loop).
SIGNED_ELEMENT_MAX = 8 * MAX_EVENT_BYTES


def signed_part(body: bytes) -> bytes:
    """What Segment signs: the whole body, or for a Webhooks (Actions) batch the raw text of element 0.

    Actions computes ``HMAC(JSON.stringify(payload[0]))``; re-serialising in Python would not reproduce
    JavaScript's spacing and escaping, so the first element's exact bytes are cut out of the raw text. The cut is
    found by scanning tokens with a stack of open brackets, never by a recursive parser: a body nested thousands of
    levels deep costs one linear scan (a recursive decoder raised RecursionError: a 500), of at most
    ``SIGNED_ELEMENT_MAX`` bytes. Raises ``ValueError`` when the body has no complete first element within them;
    whether it is valid JSON is the parser's business, after the signature.
    """
    stripped = body.lstrip()
    if not stripped.startswith(b"["):
        return body
    start = skip_space(body, len(body) - len(stripped) + 1)
    if start >= len(body) or body[start] in b"],":
        raise ValueError("no first element")
    return body[start:value_end(body, start, SIGNED_ELEMENT_MAX)]


def signature_ok(body: bytes, header: str | None, secrets: Iterable[str]) -> bool:
    """True when ``X-Signature`` is the hex HMAC-SHA1 of the signed part under any configured secret."""
    if not header:
        return False
    try:
        part = signed_part(body)
    except (ValueError, UnicodeDecodeError):
        return False
    given = header.strip().lower().encode()
    ok = False
    for secret in secrets:
        expected = hmac.new(secret.encode(), part, hashlib.sha1).hexdigest().encode()
        ok |= hmac.compare_digest(expected, given)  # no early exit: time does not depend on which secret matched
    return ok


def basic_username(authorization: str | None) -> str | None:
    """The username of an HTTP Basic header (Segment puts write keys and Profile API tokens there)."""
    if not authorization or not authorization[:6].lower() == "basic ":
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded.partition(":")[0]


def bearer_token(authorization: str | None) -> str | None:
    if not authorization or not authorization[:7].lower() == "bearer ":
        return None
    return authorization[7:].strip() or None


def token_ok(given: str | None, expected: str) -> bool:
    """An empty expected token means the feature is off: nothing matches it."""
    if not expected or given is None:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def pair_ok(given_id: str | None, given_secret: str | None, api_id: str, api_secret: str) -> bool:
    """An id and secret pair (the KPI API's X-Customer-Api-Id / X-Secret): both compared in constant time, with no
    early exit on the first; an unconfigured pair (either part empty) matches nothing."""
    if not api_id or not api_secret:
        return False
    id_ok = hmac.compare_digest((given_id or "").encode(), api_id.encode())
    secret_ok = hmac.compare_digest((given_secret or "").encode(), api_secret.encode())
    return id_ok & secret_ok


def write_key_space(candidates: Iterable[str | None], keys: Mapping[str, str]) -> str | None:
    """The space of the first candidate that is a configured write key, compared in constant time."""
    found = None
    for cand in candidates:
        if not cand:
            continue
        for key, space in keys.items():
            if hmac.compare_digest(cand.encode(), key.encode()) and found is None:
                found = space
    return found
