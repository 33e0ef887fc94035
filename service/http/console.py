"""The web console (``/console``): overview, clusters, profiles and operations as server-rendered pages.

Log in with ADMIN_TOKEN; the session is a signed, HttpOnly, SameSite=Strict cookie (``service/http/session.py``)
and every action is a POST carrying the session's CSRF token (``webui.console``). The pages read what the JSON
APIs read, through the same functions: the status collection, the Profile API's lookup and event pages, the
read APIs' cluster, persona and pattern documents, the operator routes' dead-letter and replay helpers.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from service.http import auth, console_ops, insights_api, profiles_api
from service.http.profiles_api import CALL_TYPES, ApiError, lookup
from service.http.session import COOKIE, TTL_SECONDS, csrf_ok, issue, session_key
from service.http.webui import (
    HEADERS,
    HERE,
    PREFIX,
    Ctx,
    PageError,
    console,
    current_session,
    disabled,
    error_page,
    known_spaces,
    read_form,
    render,
    safe_next,
    same_origin,
)
from service.spec import charts, markdown
from service.spec.clock import now_ms
from service.spec.keys import CHANNELS, DAY_MS
from service.spec.rates import OUTCOMES, series
from service.state.rates import buckets, queue_buckets
from service.state.status import collect_async

RECENT_EVENTS = 20
ACTIVITY_DAYS = 30


async def login_page(request: Request) -> Response:
    if not request.app.state.settings.admin_token:
        return disabled()
    next_url = safe_next(request.query_params.get("next"))
    if current_session(request)[1] is not None:
        return RedirectResponse(next_url, 303, headers=HEADERS)
    return render("login.html", next=next_url, failed=False)


async def login(request: Request) -> Response:
    """Exchange ADMIN_TOKEN for a session cookie; the token itself is never stored or sent back."""
    settings = request.app.state.settings
    if not settings.admin_token:
        return disabled()
    try:
        form = await read_form(request)
    except PageError as exc:
        return error_page(exc.status, exc.title, exc.message)
    next_url = safe_next(form.get("next"))
    if not same_origin(request) or not auth.token_ok(form.get("token"), settings.admin_token):
        return render("login.html", 401, next=next_url, failed=True)
    response = RedirectResponse(next_url, 303, headers=HEADERS)
    response.set_cookie(COOKIE, issue(session_key(settings.admin_token), int(time.time())), max_age=TTL_SECONDS,
                        path=PREFIX, secure=request.url.scheme == "https", httponly=True, samesite="strict")
    return response


async def logout(request: Request) -> Response:
    """End the session in this browser (POST with the CSRF token: a link elsewhere cannot log anyone out)."""
    if not request.app.state.settings.admin_token:
        return disabled()
    key, session = current_session(request)
    try:
        form = await read_form(request)
    except PageError as exc:
        return error_page(exc.status, exc.title, exc.message)
    if session is not None and not (same_origin(request) and csrf_ok(key, session, form.get("csrf"))):
        return error_page(403, "Request refused", "This form is not from this session: reload the page.")
    response = RedirectResponse(PREFIX + "/login", 303, headers=HEADERS)
    response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict")
    return response


@functools.cache
def stylesheet() -> bytes:
    return (HERE / "static" / "console.css").read_bytes()


async def css(request: Request) -> Response:
    """The one style sheet, served from the package (no CDN; public: it holds nothing but styles)."""
    return Response(stylesheet(), media_type="text/css", headers={"Cache-Control": "public, max-age=300",
                                                                  "X-Content-Type-Options": "nosniff"})


async def _minutes(ctx: Ctx, now: int) -> list[dict[str, int]]:
    """Events per minute by outcome over the last hour, from the per-minute counters every web process adds to."""
    pipe = ctx.state.redis.pipeline(transaction=False)
    queue_buckets(pipe, ctx.space, now)
    return series(buckets(await pipe.execute(), now), now)


def events_chart(rows: list[dict[str, int]]) -> charts.StackedBars:
    labels = [time.strftime("%H:%M UTC", time.gmtime(r["minute_ms"] / 1000)) for r in rows]
    marks = {0: "−60 min", len(rows) // 2: "−30 min", len(rows) - 1: "now"} if rows else {}
    return charts.stacked_bars(rows, OUTCOMES, labels, scale=60, unit="/s", x_labels=marks)


@console
async def overview(ctx: Ctx) -> Response:
    """Reads counters, lengths and a few small hashes only (``collect_async``): never a scan."""
    state, now = ctx.state, now_ms()
    queue = state.refresh.queue().connection if state.refresh.queue_url else None
    report = await collect_async(state.redis, queue, state.settings, ctx.space, now)
    rows = await _minutes(ctx, now)
    return ctx.render("overview.html", report=report, row=report["spaces"][0], chart=events_chart(rows),
                      minutes=rows, outcomes=OUTCOMES, spaces=await known_spaces(ctx), page="overview")


def channel_mix(pattern: dict[str, Any]) -> tuple[charts.Segment, ...]:
    return charts.shares({c: pattern.get(f"avg_{c}_sessions") or 0 for c in CHANNELS}, CHANNELS)


@console
async def clusters(ctx: Ctx) -> Response:
    client = ctx.state.redis
    docs = await insights_api.read_clusters(client, ctx.space)
    paused, personas = await insights_api.read_personas(client, ctx.space)
    patterns, narrative = await insights_api.read_patterns(client, ctx.space)
    story = Markup(markdown.to_html(narrative.get("content") or "")) if narrative else None  # noqa: S704 (sanitised)
    return ctx.render("clusters.html", clusters=docs, personas={p["cluster"]: p for p in personas}, paused=paused,
                      patterns=[(name, p, channel_mix(p)) for name, p in sorted(patterns.items())],
                      narrative=narrative, story=story, channels=CHANNELS, spaces=await known_spaces(ctx),
                      page="clusters")


def activity(profile: Any, today: int) -> tuple[list[dict[str, int]], charts.StackedBars, dict[str, int]]:
    """Sessions (30-minute slots) per day and channel over the last ACTIVITY_DAYS days, oldest first."""
    days = list(range(today - ACTIVITY_DAYS + 1, today + 1))
    rows = [{"day": d, **{c: profile.sessions(c, d, d) for c in CHANNELS}} for d in days]
    labels = [time.strftime("%Y-%m-%d", time.gmtime(d * 86400)) for d in days]
    chart = charts.stacked_bars(rows, CHANNELS, labels, height=160, unit=" sessions",
                                x_labels={0: labels[0][5:], len(days) - 1: labels[-1][5:]})
    return rows, chart, {c: profile.sessions(c, days[0], days[-1]) for c in CHANNELS}


@console
async def profiles(ctx: Ctx) -> Response:
    """Look a profile up by any identifier: what the Profile API serves, on one page."""
    ident = (ctx.request.query_params.get("id") or "").strip()
    spaces = await known_spaces(ctx)
    if not ident:
        return ctx.render("profiles.html", ident="", profile=None, problem=None, spaces=spaces, page="profiles")
    if len(ident) > 1000:
        raise PageError(400, "Identifier too long", "An identifier is at most 1,000 characters.")
    try:
        profile = await lookup(ctx.state, ctx.space, ident)
    except ApiError as exc:
        return ctx.render("profiles.html", exc.status, ident=ident, profile=None, problem=exc.message,
                          spaces=spaces, page="profiles")
    now = now_ms()
    page, more, _ = await profiles_api.logged_events(
        ctx.state, ctx.space, profile, limit=RECENT_EVENTS, lo=now - ACTIVITY_DAYS * DAY_MS, hi=now, desc=True,
        types=set(CALL_TYPES), names=set(), exclude=set())
    events = profiles_api.event_views(ctx.state, profile, [obj for _, _, obj in page], now)
    rows, chart, totals = activity(profile, now // DAY_MS)
    traits = sorted(profile.traits.items())
    return ctx.render("profiles.html", ident=ident, profile=profile, problem=None, spaces=spaces, page="profiles",
                      traits=[(n, t) for n, t in traits if t.kind != "audience"],
                      audiences=[(n, t) for n, t in traits if t.kind == "audience"],
                      events=events, more_events=more, activity_rows=rows, activity_chart=chart,
                      activity_totals=totals, channels=CHANNELS,
                      meta=(await profiles_api.metadata_body(ctx.request, profile))["metadata"])


async def root(request: Request) -> Response:
    return RedirectResponse(PREFIX, 307)


routes = [
    Route(PREFIX, overview, methods=["GET"]),
    Route(PREFIX + "/", root, methods=["GET"]),
    Route(PREFIX + "/login", login_page, methods=["GET"]),
    Route(PREFIX + "/login", login, methods=["POST"]),
    Route(PREFIX + "/logout", logout, methods=["POST"]),
    Route(PREFIX + "/clusters", clusters, methods=["GET"]),
    Route(PREFIX + "/profiles", profiles, methods=["GET"]),
    Route(PREFIX + "/static/console.css", css, methods=["GET"]),
    *console_ops.routes,
]
