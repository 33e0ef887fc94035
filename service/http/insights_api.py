"""Read APIs over what the workers computed (Bearer ``ADMIN_TOKEN``), and the KPI endpoint.

``POST /api/v1/segment_cluster_profiles`` runs the same KPI maths as the incremental path (``service/spec/kpis.py``)
for callers who bring their own customer → cluster labels. It needs a credential, checked before a byte of the
body is read: Bearer ``ADMIN_TOKEN``, or (when KPI_API_ID / KPI_API_SECRET are set) the KPI API's own headers
``X-Customer-Api-Id`` and ``X-Secret``. The body is read within MAX_KPI_BODY as it streams (gzip too).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.http import auth
from service.http.admin import admin_endpoint
from service.http.intake import read_body
from service.http.responses import JSON, error, refused
from service.spec import kpis
from service.spec.bodies import BodyError
from service.spec.keys import MAVERA_PAUSED_KEY, Keys

MAX_KPI_BODY = 8 * 1024 * 1024


def _json_hash(raw: dict) -> dict:
    return {k.decode(): orjson.loads(v) for k, v in sorted(raw.items())}


async def read_clusters(client: Any, space: str) -> list[dict[str, Any]]:
    """The cluster documents the last refresh wrote, by cluster id (``/api/clusters`` and the console)."""
    return list(_json_hash(await client.hgetall(Keys(space).clusters)).values())


async def read_personas(client: Any, space: str) -> tuple[Any, list[dict[str, Any]]]:
    """Why Mavera sync is paused (or None), and each cluster's persona with its sync state."""
    data = _json_hash(await client.hgetall(Keys(space).personas))
    paused = await client.get(MAVERA_PAUSED_KEY)
    rows = [{"cluster": cluster, "mavera_id": p.get("mavera_id"), "name": p.get("name"),
             "last_sync_ms": p.get("last_sync_ms"), "state": p.get("state"), "error": p.get("error")}
            for cluster, p in data.items()]
    return (orjson.loads(paused) if paused else None), rows


async def read_patterns(client: Any, space: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The channel patterns' summaries, and the Mave narrative about them (None before the first)."""
    data = _json_hash(await client.hgetall(Keys(space).patterns))
    raw = await client.hgetall(Keys(space).narrative)
    narrative: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
    if "patterns" in narrative:
        narrative["patterns"] = orjson.loads(narrative["patterns"])
    return data, narrative or None


@admin_endpoint
async def clusters(request: Request, space: str) -> Response:
    return JSON({"space": space, "clusters": await read_clusters(request.app.state.redis, space)})


@admin_endpoint
async def personas(request: Request, space: str) -> Response:
    paused, rows = await read_personas(request.app.state.redis, space)
    return JSON({"space": space, "paused": paused, "personas": rows})


@admin_endpoint
async def patterns(request: Request, space: str) -> Response:
    data, narrative = await read_patterns(request.app.state.redis, space)
    return JSON({"space": space, "patterns": data, "narrative": narrative})


def kpi_denied(request: Request) -> Response | None:
    """None for Bearer ADMIN_TOKEN or a configured X-Customer-Api-Id / X-Secret pair; else the 401 to send."""
    settings = request.app.state.settings
    headers = request.headers
    token = auth.token_ok(auth.bearer_token(headers.get("authorization")), settings.admin_token)
    pair = auth.pair_ok(headers.get("x-customer-api-id"), headers.get("x-secret"), settings.kpi_api_id,
                        settings.kpi_api_secret)
    if token | pair:  # both checks always run: the time taken does not tell which credential was close
        return None
    how = "send ADMIN_TOKEN as a Bearer token (Authorization: Bearer <token>)"
    if settings.kpi_api_id:
        how += ", or the headers X-Customer-Api-Id and X-Secret (KPI_API_ID / KPI_API_SECRET)"
    return error(401, "authentication_error", f"missing or wrong credentials: {how}",
                 {"WWW-Authenticate": 'Bearer realm="persona-sync"'})


async def segment_cluster_profiles(request: Request) -> Response:
    if denied := kpi_denied(request):
        return denied
    try:
        body = await read_body(request, MAX_KPI_BODY)
    except BodyError as exc:
        return refused(exc.status, exc.message)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return error(400, "invalid_request_error", f"malformed JSON: {exc}")
    try:
        customers, labels = kpis.validate_request(doc)
    except kpis.BadRequest as exc:
        return error(400, "validation_error", exc.message)
    settings = request.app.state.settings
    rule = kpis.InsightRule(min_share_pct=settings.insight_min_share_pct,
                            require_above_mean=settings.insight_require_above_mean)
    return JSON(kpis.cluster_kpis(customers, labels, rule))


routes = [
    Route("/api/clusters", clusters, methods=["GET"]),
    Route("/api/personas", personas, methods=["GET"]),
    Route("/api/patterns", patterns, methods=["GET"]),
    Route("/api/v1/segment_cluster_profiles", segment_cluster_profiles, methods=["POST"]),
]
