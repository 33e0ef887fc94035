"""The Starlette application: intake, Profile API, operator routes, the console, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings
from service.http import admin, console, insights_api, metrics, profiles_api, receiver, sdk, webui
from service.http.openapi import docs
from service.http.responses import JSON, error, unavailable
from service.logs import event as log_event
from service.spec.identity import IdentityRules
from service.state.connect import OnDemand, connect, connect_async
from service.state.rates import RateCounter
from service.state.reads import ProfileReader
from service.state.refresh import RefreshScheduler
from service.state.store import REDIS_DOWN, AsyncStore
from service.state.upgrade import rename_legacy_keys

log = logging.getLogger("app")


async def healthz(request: Request) -> Response:
    return JSON({"status": "ok"})


async def readyz(request: Request) -> Response:
    try:
        await request.app.state.redis.ping()
    except REDIS_DOWN:
        return error(503, "unavailable", "Redis is not reachable")
    return JSON({"status": "ready"})


async def metrics_endpoint(request: Request) -> Response:
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = request.url.path
    if path == webui.PREFIX or path.startswith(webui.PREFIX + "/"):  # a person with a browser: a page, not JSON
        title, message = {
            404: ("Page not found", "The console has no page at this address; start again from the overview."),
            405: ("Not allowed", "This console address does not take that kind of request."),
        }.get(exc.status_code, ("Bad request", str(exc.detail)))
        page = webui.error_page(exc.status_code, title, message)
        page.headers.update(exc.headers or {})
        return page
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
    return error(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {}))


def route_of(request: Request) -> str:
    """The route a request matched, as its template (``.../profiles/{id}/metadata``), for logs: a Profile API path
    holds an identifier (an email), which the logs must not. The prefix of a mounted app is the matched one."""
    route = request.scope.get("route")
    template = getattr(route, "path", None)
    if not isinstance(template, str):
        return "(no route)"
    return str(request.scope.get("root_path", "")) + template


async def unexpected(request: Request, exc: Exception) -> Response:
    if isinstance(exc, REDIS_DOWN):
        return unavailable(exc)
    log_event(log, "unhandled error", logging.ERROR, route=route_of(request), error=type(exc).__name__)
    return error(500, "internal_error", "internal error; the request was not applied, retry later")


class ContainErrors:
    """Answers an unhandled error itself (``unexpected``: its route and type logged, a JSON 500, or 503 for Redis)
    and ends there. Starlette's outermost middleware answers it too but then raises it again for the server, and
    uvicorn logs that with its traceback and message, which may hold what the request carried (an email, a trait)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            response = await unexpected(Request(scope), exc)
            if not started:  # else the server closes the connection of the answer cut short
                await response(scope, receive, send)


def create_app(settings: Settings, redis_url: str, queue_url: str | None = None) -> Starlette:
    """``redis_url`` is STATE; ``queue_url`` the RQ Redis (defaults to STATE)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        client = connect_async(redis_url, cluster=settings.redis_cluster, socket_timeout=4, socket_connect_timeout=2,
                               health_check_interval=30)
        app.state.settings = settings
        app.state.redis = client
        # blocking client for the operator actions shared with the CLI (run in a thread: forget, suppressions)
        app.state.sync_redis = OnDemand(lambda: connect(redis_url, cluster=settings.redis_cluster, socket_timeout=30,
                                                        socket_connect_timeout=2))
        with contextlib.suppress(*REDIS_DOWN):  # down at start: the worker or the next start renames them
            rename_legacy_keys(app.state.sync_redis())
        app.state.rules = IdentityRules.from_settings(settings)
        app.state.store = AsyncStore(client, settings)
        app.state.reader = ProfileReader(client)
        app.state.refresh = RefreshScheduler(client, queue_url if queue_url is not None else redis_url,
                                             settings.refresh_debounce)
        app.state.rates = RateCounter(client)  # per-minute outcome counts for the status, flushed every second
        flusher = asyncio.create_task(app.state.rates.run())
        if not settings.shared_secrets:
            log_event(log, "SEGMENT_SHARED_SECRETS is empty: webhook signatures are not checked", logging.WARNING)
        if not settings.write_keys:
            log_event(log, "SEGMENT_WRITE_KEYS is empty: the Tracking API accepts any write key", logging.WARNING)
        if not settings.profile_api_token:
            log_event(log, "PROFILE_API_TOKEN is empty: the Profile API is off", logging.WARNING)
        if not settings.admin_token:
            log_event(log, "ADMIN_TOKEN is empty: the admin API and the console are off", logging.WARNING)
        try:
            yield
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            with contextlib.suppress(redis.RedisError, OSError):  # the last second's counts, if Redis takes them
                await app.state.rates.flush()
            await client.aclose()
            app.state.sync_redis.close()

    routes = [
        Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics_endpoint),
        *receiver.routes, *sdk.routes(settings, receiver.tracking_routes), *profiles_api.routes, *admin.routes,
        *insights_api.routes, *docs.routes, *console.routes,
    ]
    return Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(ContainErrors)],
                     exception_handlers={HTTPException: http_error, Exception: unexpected})
