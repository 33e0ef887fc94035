"""Intake routes: ``/segment`` (classic Webhooks and Webhooks (Actions)) and the Tracking API ``/v1/*`` and ``/b``.

Auth, signatures and limits only; what an event means is ``service/spec/events.py``'s job and applying it is the
store's. Status codes follow Segment's retry rules: 4xx only when a retry can never help, 503 when Redis is
unavailable so that Segment sends again.

What is kept of a refusal depends on whether the request was authenticated. Nothing of a body that was not:
a request refused before its signature or write key was verified (401, and 400/413 for a body that could not be
read or, on /v1 without a valid key in the Authorization header, not parsed) leaves only metadata in the refusal
log (``_unauthenticated``). A body that was authenticated but is invalid is kept as a dead letter, the only thing
``persona-sync replay-dead-letters`` applies (capped per space by DEAD_LETTER_MAX and DEAD_LETTER_MAX_BYTES).
Open mode (no SEGMENT_SHARED_SECRETS on /segment, no SEGMENT_WRITE_KEYS on /v1) trusts every sender, as it does
for the events it applies: its invalid bodies are dead letters too, within the same caps; a body that could not
even be read (size, encoding) keeps metadata only in every mode.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.config import SPACE_ID_RULE, valid_space
from service.http import auth, metrics
from service.http.intake import read_body
from service.http.responses import JSON, error, refused, unavailable
from service.spec.bodies import (
    MAX_BATCH_BYTES,
    MAX_EVENT_BYTES,
    TRACKING_TYPES,
    BodyError,
    Item,
    named_write_keys,
    parse_json,
    tracking_items,
    webhook_items,
    without_write_key,
)
from service.spec.clock import now_ms
from service.spec.events import TYPES, Event, InvalidEvent, normalise
from service.state.store import NotReplicated, Outcome, StoreUnavailable

Endpoint = Callable[[Request], Awaitable[Response]]
# analytics.js (@segment/analytics-next) posts each call to ``{apiHost}/`` + the first letter of its type
# (src/plugins/segmentio/index.ts, with apiHost "api.segment.io/v1") and its batching plugin to ``{apiHost}/b``
# (batched-dispatcher.ts); analytics-swift and analytics-kotlin upload batches to ``https://{apiHost}/b`` too.
SHORT_NAMES = {"t": "track", "p": "page", "i": "identify", "g": "group", "a": "alias", "s": "screen", "b": "batch"}
UNKEPT = "nothing of this request was kept"


async def _unauthenticated(request: Request, space: str, status: int, reason: str, size: int) -> None:
    """Log a refusal that came before authentication succeeded, or of a body too large to apply however it is
    replayed (413): metadata only (see ``REFUSALS_KEY``).

    The body is never stored: what failed authentication must never become replayable, nor fill Redis. The
    address is the peer as the ASGI server reports it (uvicorn applies X-Forwarded-For only from
    FORWARDED_ALLOW_IPS)."""
    metrics.REFUSED.labels(str(status)).inc()
    request.app.state.rates.refused(status, now_ms())
    peer = request.client.host if request.client else ""
    try:
        await request.app.state.store.refusal(space, request.url.path, status, reason, size, peer)
    except StoreUnavailable:
        pass  # the refusal stands either way; nothing was accepted


async def _refuse_unread(request: Request, space: str, exc: BodyError) -> JSON:
    """A body refused before it could be authenticated: metadata only."""
    await _unauthenticated(request, space, exc.status, exc.message, exc.size)
    return refused(exc.status, f"{exc.message}; {UNKEPT}")


async def _refuse(request: Request, space: str, exc: BodyError, body: bytes, source: str) -> JSON:
    """An authenticated (or open-mode) body refused as a whole: kept as a dead letter for the operator. With
    nowhere to keep it, 503: Segment sends it again, where a 4xx would be final and the body lost. A 413 keeps
    only its metadata: a replay would refuse it again (the sender splits it and sends it again)."""
    if exc.status == 413:
        await _unauthenticated(request, space, 413, exc.message, len(body))
        return refused(413, f"{exc.message}; {UNKEPT} (only its time, size and source address)")
    try:
        kept = without_write_key(body) if source == "tracking" else body
        await request.app.state.store.dead_letter(space, exc.message, kept, source)
    except StoreUnavailable as unkept:
        return unavailable(unkept, f"{exc.message}; the body could not be kept as a dead letter (the profile store "
                                   "is unavailable): Segment will retry")
    metrics.REFUSED.labels(str(exc.status)).inc()
    request.app.state.rates.add(space, now_ms(), {"rejected": 1})  # a body refused whole counts as one
    return refused(exc.status, exc.message)


async def _schedule(request: Request, space: str, outcomes: list[Outcome]) -> None:
    """What was applied is scheduled before anything else can fail: a retry would find these events duplicates."""
    if any(o.status in ("ok", "deleted") or o.erased for o in outcomes):
        await request.app.state.refresh.touch(space)
    if any(o.status == "deleted" or o.erased for o in outcomes):
        await request.app.state.refresh.purge(space)


async def ingest(request: Request, space: str, items: list[Item], source: str, single: bool,
                 received: int) -> Response:
    """Normalise, apply and count a list of events; invalid ones become dead letters, the rest are applied."""
    state = request.app.state
    good: list[tuple[Event, bytes]] = []
    at: list[int] = []  # each good event's index in the body
    rejected: list[tuple[int, str, bytes]] = []
    counts: Counter[tuple[str, str]] = Counter()
    for i, item in enumerate(items):
        kind = item.obj.get("type") if isinstance(item.obj, dict) else None
        kind = kind.lower() if isinstance(kind, str) and kind.lower() in TYPES else "unknown"  # bounded: a label
        try:
            if item.error:
                raise InvalidEvent(item.error)
            good.append((normalise(item.obj, received, state.rules), item.raw))
            at.append(i)
        except InvalidEvent as exc:
            rejected.append((i, str(exc), item.raw))
            counts[(kind, "rejected")] += 1
    try:
        outcomes = await state.store.apply(space, good, received)
    except NotReplicated as exc:  # applied on the primary, not yet on enough replicas: Segment retries
        await _schedule(request, space, exc.outcomes)
        return unavailable(exc, f"{exc}; Segment will retry (the events are not applied twice)")
    except StoreUnavailable as exc:
        return unavailable(exc)
    await _schedule(request, space, outcomes)
    try:
        failed = [(o.profile_id, raw) for o, (_, raw) in zip(outcomes, good, strict=True) if o.status == "error"]
        await state.store.dead_letters(space, [(r, raw) for _, r, raw in rejected] + failed, source)
    except StoreUnavailable as exc:
        return unavailable(exc)
    for (event, _), outcome in zip(good, outcomes, strict=True):
        counts[(event.type, "rejected" if outcome.status == "error" else outcome.status)] += 1
    metrics.count_events(counts)
    summary: dict[str, Any] = {
        "accepted": sum(n for (_, o), n in counts.items() if o in ("ok", "deleted")),
        "duplicate": sum(n for (_, o), n in counts.items() if o == "duplicate"),
        "suppressed": sum(n for (_, o), n in counts.items() if o == "suppressed"),
        "rejected": sum(n for (_, o), n in counts.items() if o == "rejected"),
    }
    state.rates.add(space, received, summary)  # in process; flushed to Redis about once a second
    # an event the store failed on (not the sender's fault) is kept as a dead letter to replay: say which
    unapplied = [(i, f"not applied ({o.profile_id}); kept as a dead letter, to replay once the cause is fixed")
                 for i, o in zip(at, outcomes, strict=True) if o.status == "error"]
    if rejected or unapplied:
        errors = sorted([(i, reason) for i, reason, _ in rejected] + unapplied)
        summary["errors"] = [{"index": i, "message": reason} for i, reason in errors[:100]]
    if single and rejected:
        return JSON({"error": {"code": "invalid_event", "message": rejected[0][1]}, **summary}, 400)
    if source == "tracking":
        summary["success"] = True
    return JSON(summary)


async def segment_webhook(request: Request) -> Response:
    state = request.app.state
    space = request.path_params.get("space", state.settings.space_id)
    if not valid_space(space):
        return error(404, "not_found", f"unknown space id: use {SPACE_ID_RULE}")
    received = now_ms()
    try:  # a body that cannot be read whole (size, encoding) cannot be verified either
        body = await read_body(request, state.settings.max_body_bytes)
    except BodyError as exc:
        return await _refuse_unread(request, space, exc)
    secrets = state.settings.shared_secrets
    if secrets and not auth.signature_ok(body, request.headers.get("x-signature"), secrets):
        reason = "X-Signature missing" if not request.headers.get("x-signature") else "X-Signature does not match"
        await _unauthenticated(request, space, 401, reason, len(body))
        return error(401, "authentication_error",
                     f"{reason}: sign the body with a secret in SEGMENT_SHARED_SECRETS; {UNKEPT} (its time, size "
                     "and source address are in GET /admin/refusals). If Segment signs with a secret not configured "
                     "here yet, add it to SEGMENT_SHARED_SECRETS: deliveries from then on are accepted.")
    try:
        doc = parse_json(body)
        items = webhook_items(doc, body, received)
    except BodyError as exc:
        return await _refuse(request, space, exc, body, "webhook")
    return await ingest(request, space, items, "webhook", isinstance(doc, dict), received)


async def tracking(request: Request) -> Response:
    state = request.app.state
    called = request.path_params.get("kind", "b")  # /b (mobile SDKs with an apiHost without /v1) is a batch
    kind = SHORT_NAMES.get(called, called)
    if kind != "batch" and kind not in TRACKING_TYPES:
        return error(404, "not_found", f"unknown Tracking API call /v1/{called}")
    limit = MAX_BATCH_BYTES if kind == "batch" else MAX_EVENT_BYTES
    space = state.settings.space_id
    keys = state.settings.write_keys
    header = request.headers.get("authorization")
    received = now_ms()
    try:
        body = await read_body(request, limit)
    except BodyError as exc:
        return await _refuse_unread(request, space, exc)
    try:
        doc = parse_json(body, split=False)
    except BodyError as exc:  # the write key may be in the body: kept only if the header's key is valid (or open)
        header_space = auth.write_key_space([auth.basic_username(header), auth.bearer_token(header)], keys)
        claimed = header_space is not None or not keys or auth.write_key_space(named_write_keys(body), keys)
        try:  # an event too deep in a batch sinks alone: split only for a body with a key of ours in it
            if not (claimed and "depth limit" in exc.message):
                raise
            doc = parse_json(body, arrays=False)
        except BodyError as refused_whole:
            if keys and header_space is None:
                return await _refuse_unread(request, space, refused_whole)
            return await _refuse(request, header_space or space, refused_whole, body, "tracking")
    body_key = doc.get("writeKey") if isinstance(doc, dict) and isinstance(doc.get("writeKey"), str) else None
    if keys:
        space = auth.write_key_space([auth.basic_username(header), body_key, auth.bearer_token(header)], keys)
        if space is None:
            reason = "write key missing" if not (header or body_key) else "write key unknown"
            await _unauthenticated(request, state.settings.space_id, 401, reason, len(body))
            return error(401, "authentication_error",
                         f"missing or unknown write key: send one of SEGMENT_WRITE_KEYS as the Basic username or as "
                         f"writeKey in the body; {UNKEPT} (only its time, size and source address)")
    try:
        items = tracking_items(doc, body, None if kind == "batch" else kind, received)
    except BodyError as exc:
        return await _refuse(request, space, exc, body, "tracking")
    return await ingest(request, space, items, "tracking", kind != "batch", received)


def timed(endpoint: Endpoint, route: str) -> Endpoint:
    """``endpoint``, timed into the request-duration histogram under its route template."""
    async def wrapper(request: Request) -> Response:
        start = time.perf_counter()
        response = await endpoint(request)
        metrics.observe_request(route, response.status_code, time.perf_counter() - start)
        return response

    return wrapper


routes = [
    Route("/segment", timed(segment_webhook, "/segment"), methods=["POST", "PUT", "PATCH"]),
    Route("/segment/{space}", timed(segment_webhook, "/segment/{space}"), methods=["POST", "PUT", "PATCH"]),
]
# The Tracking API: what browsers call cross-origin, so the app serves these behind CORS (service/http/sdk.py).
tracking_routes = [
    Route("/v1/{kind}", timed(tracking, "/v1/{kind}"), methods=["POST"]),
    Route("/b", timed(tracking, "/b"), methods=["POST"]),
]
