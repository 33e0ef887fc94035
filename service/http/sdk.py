"""What Segment's browser and mobile SDKs need besides the Tracking API: CORS, and the settings they load at start.

analytics.js (@segment/analytics-next) runs on the customer's pages, so every call it makes to us is cross-origin:
``fetch`` with ``Content-Type: text/plain`` and an ``Authorization: Basic <writeKey:>`` header (plus
``X-Retry-Count`` on retries), which makes the browser send a preflight first. CORS is scoped to the routes browsers
call — the Tracking API and the settings endpoint — and never allows credentials; the Profile API, /segment, /admin
and the rest answer without any CORS header, so no page can read them from a browser.

At start analytics.js fetches ``{cdnURL}/v1/projects/{writeKey}/settings`` (``loadCDNSettings`` in
src/browser/index.ts) and the mobile SDKs ``https://{cdnHost}/projects/{writeKey}/settings`` (cdnHost defaults to
``cdn-settings.segment.com/v1``). Their ``integrations["Segment.io"]`` decides where events go: ``apiKey`` becomes
the body's ``writeKey``, ``apiHost`` (with ``/v1``) and ``protocol`` the URL. Pointing ``cdnURL`` (or the snippet's
``analytics._cdn``, or the mobile ``cdnHost``) at us is therefore enough for every event to come here.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from service.config import Settings
from service.http import auth
from service.http.responses import JSON, error

# analytics.js sends Authorization (Basic write key) and, when it retries, X-Retry-Count; Content-Type text/plain is
# safelisted, but an application/json one set through the library's ``headers`` option is not.
ALLOWED_HEADERS = ("Content-Type", "Authorization", "X-Retry-Count")
PREFLIGHT_MAX_AGE = 86400  # browsers cap it (Chromium at 2 h); one preflight per page load at most
# A Host header we are willing to write into apiHost: a name or an IP literal, and a port.
_HOST = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")


class _CORS(CORSMiddleware):
    """Starlette's CORSMiddleware, answering preflights with 204 (no body) and refusals with 403 in our error
    envelope instead of 200 "OK" and 400 text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        if response.status_code == 200:
            return Response(status_code=204, headers=headers)
        headers = {k: v for k, v in headers.items() if not k.startswith("access-control-")}  # nothing allowed
        what = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        return error(403, "cors_forbidden", f"cross-origin request refused ({what} not allowed): only origins in "
                     f"CORS_ALLOW_ORIGINS may call this route from a browser, with {', '.join(self.allow_methods)} "
                     f"and the headers {', '.join(ALLOWED_HEADERS)}", headers)


def with_cors(route: Route, origins: Collection[str]) -> Route:
    """``route`` behind CORS for ``origins``: the same path, also answering the preflight (OPTIONS).

    The original route sits inside the middleware as its app, so it still matches the path and refuses other
    methods (405) itself; only the wrapped routes ever carry CORS headers."""
    methods = sorted(route.methods or ())
    cors: ASGIApp = _CORS(route, allow_origins=tuple(origins), allow_methods=(*methods, "OPTIONS"),
                          allow_headers=ALLOWED_HEADERS, allow_credentials=False, max_age=PREFLIGHT_MAX_AGE)
    return Route(route.path, cors, methods=[*methods, "OPTIONS"], name=route.name)


def api_host(request: Request) -> str | None:
    """Our host as this request reached it (Host header, and the prefix we are mounted under) plus ``/v1``: what
    the SDKs put before ``/t`` or ``/b``. None when the Host header is not a plain host[:port]."""
    host = request.headers.get("host", "")
    if not _HOST.match(host):
        return None
    return f"{host}{request.scope.get('root_path', '').rstrip('/')}/v1"


async def project_settings(request: Request) -> Response:
    """The source settings the SDKs load at start, for a known write key (any key in open mode)."""
    state = request.app.state
    write_key = request.path_params["write_key"]
    keys = state.settings.write_keys
    if not write_key or (keys and auth.write_key_space([write_key], keys) is None):
        return error(404, "not_found", "unknown write key: list it in SEGMENT_WRITE_KEYS")
    host = api_host(request)
    if host is None:
        return error(400, "invalid_request_error", "the Host header is not a host name or address with a port")
    return JSON(sdk_settings(write_key, host, request.url.scheme),
                headers={"Cache-Control": "private, max-age=60"})  # built from Host: never from a shared cache


def sdk_settings(write_key: str, host: str, scheme: str) -> dict[str, object]:
    """Only what the libraries read, in the shapes they expect (objects where analytics-kotlin decodes JsonObject).

    One integration only: with more, analytics.js loads its classic device-mode destinations from Segment's CDN.
    Remote metrics are off (sampleRate 0): analytics.js would otherwise post them to api.segment.io."""
    return {
        "integrations": {
            "Segment.io": {
                "apiKey": write_key,
                "apiHost": host,
                "protocol": "https" if scheme == "https" else "http",
                "unbundledIntegrations": [],
                "addBundledMetadata": True,
                "maybeBundledConfigIds": {},
            },
        },
        "plan": {"track": {"__default": {"enabled": True, "integrations": {}}},
                 "identify": {"__default": {"enabled": True}}, "group": {"__default": {"enabled": True}}},
        "edgeFunction": {},
        "analyticsNextEnabled": True,
        "middlewareSettings": {},
        "enabledMiddleware": {},
        "metrics": {"sampleRate": 0},
        "legacyVideoPluginsEnabled": False,
        "remotePlugins": [],
    }


def routes(settings: Settings, tracking: list[Route]) -> list[Route]:
    """The Tracking API routes and the settings endpoint, each behind CORS for CORS_ALLOW_ORIGINS."""
    settings_route = Route("/v1/projects/{write_key}/settings", project_settings, methods=["GET"])
    return [with_cors(r, settings.cors_allow_origins) for r in (*tracking, settings_route)]
