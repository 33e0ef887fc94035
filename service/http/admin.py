"""Operator routes (Bearer ``ADMIN_TOKEN``): what was refused, and the state of a space.

``/admin/dead-letters`` holds what passed authentication but could not be applied (replayable);
``/admin/refusals`` what was refused before authentication: metadata only, never a body, never replayable."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.config import valid_space
from service.http import auth
from service.http.responses import JSON, error, unavailable
from service.spec.keys import REFUSALS_KEY, Keys
from service.state.status import queue_status, status_row
from service.state.store import REDIS_DOWN


def admin_denied(request: Request) -> Response | None:
    """None when the request carries the admin token; else the 401 to send."""
    token = auth.bearer_token(request.headers.get("authorization"))
    if auth.token_ok(token, request.app.state.settings.admin_token):
        return None
    return error(401, "authentication_error", "send ADMIN_TOKEN as a Bearer token")


def _space(request: Request) -> str:
    return request.query_params.get("space") or request.app.state.settings.space_id


def space_param(request: Request) -> str | Response:
    """``?space=`` (default SPACE_ID), or the 400 to send for a malformed one."""
    space = _space(request)
    if not valid_space(space):
        return error(400, "validation_error", "space must be 1-64 letters, digits, '_', '-' or '.'")
    return space


def admin_endpoint(handler: Callable[[Request, str], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Admin token, ``?space=`` and the 503 for an unreachable Redis, once for every operator route."""

    async def endpoint(request: Request) -> Response:
        if denied := admin_denied(request):
            return denied
        space = space_param(request)
        if isinstance(space, Response):
            return space
        try:
            return await handler(request, space)
        except REDIS_DOWN as exc:
            return unavailable(exc)

    return endpoint


def _page(request: Request) -> tuple[int, str] | Response:
    """``?limit=`` (1-1000, default 50) and ``?before=<entry id>``, or the 400 to send. ASCII digits only: ``'²'``
    passes ``str.isdigit`` but not ``int``, and Redis refuses an entry id in other scripts' digits."""
    raw_limit = request.query_params.get("limit", "50")
    before = request.query_params.get("before") or "+"
    if not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 4) or not 1 <= int(raw_limit) <= 1000:
        return error(400, "validation_error", "limit must be a number from 1 to 1000")
    if before != "+" and not _ENTRY_ID.match(before):
        return error(400, "validation_error", "before must be an entry id such as 1700000000000-0")
    return int(raw_limit), before


_ENTRY_ID = re.compile(r"^\(?[0-9]{1,20}(-[0-9]{1,20})?$")


async def _stream_page(request: Request, key: str, item: Callable[[str, dict[str, bytes]], dict],
                       extra: dict | None = None) -> Response:
    """One page of a stream, newest first (``?limit=``, ``?before=``), each entry shaped by ``item``."""
    page = _page(request)
    if isinstance(page, Response):
        return page
    limit, before = page
    try:
        client = request.app.state.redis
        rows = await client.xrevrange(key, max=before, min="-", count=limit + 1)
        total = await client.xlen(key)
    except REDIS_DOWN as exc:
        return unavailable(exc)
    more = len(rows) > limit
    return JSON({**(extra or {}), "total": total,
                 "data": [item(entry_id.decode(), {k.decode(): v for k, v in fields.items()})
                          for entry_id, fields in rows[:limit]],
                 "has_more": more, "next_before": rows[limit][0].decode() if more else None})


def _text(f: dict[str, bytes], name: str) -> str:
    return f.get(name, b"").decode(errors="replace")


def _number(f: dict[str, bytes], name: str) -> int:
    value = f.get(name, b"0")
    return int(value) if value.isdigit() else 0


async def dead_letters(request: Request) -> Response:
    """Newest first; ``?space=``, ``?limit=`` (1-1000), ``?before=<entry id>`` to page back."""
    if denied := admin_denied(request):
        return denied
    space = _space(request)
    if not valid_space(space):
        return error(400, "validation_error", "space must be a valid space id")
    return await _stream_page(request, Keys(space).dead_letters, lambda entry_id, f: {
        "id": entry_id, "reason": _text(f, "reason"), "source": _text(f, "source"), "at": _number(f, "at"),
        "raw": _text(f, "raw")}, {"space": space})


async def refusals(request: Request) -> Response:
    """Requests refused before authentication, newest first, every space: time, space claimed, route, status,
    reason, size and peer address. Never a body; nothing here can be replayed. ``?limit=``, ``?before=``."""
    if denied := admin_denied(request):
        return denied
    return await _stream_page(request, REFUSALS_KEY, lambda entry_id, f: {
        "id": entry_id, "at": _number(f, "at"), "space": _text(f, "space"), "route": _text(f, "route"),
        "status": _number(f, "status"), "reason": _text(f, "reason"), "bytes": _number(f, "bytes"),
        "addr": _text(f, "addr")})


@admin_endpoint
async def status(request: Request, space: str) -> Response:
    pipe = request.app.state.redis.pipeline(transaction=False)
    queue_status(pipe, Keys(space))
    return JSON(status_row(space, await pipe.execute()))


routes = [
    Route("/admin/dead-letters", dead_letters, methods=["GET"]),
    Route("/admin/refusals", refusals, methods=["GET"]),
    Route("/admin/status", status, methods=["GET"]),
]
