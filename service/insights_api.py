"""Read APIs over what the workers computed (Bearer ``ADMIN_TOKEN``), and seed 004's KPI endpoint.

``POST /api/v1/segment_cluster_profiles`` runs the same KPI maths as the incremental path (``service/kpis.py``)
for callers who bring their own customer → cluster labels.
"""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service import kpis
from service.admin import admin_endpoint
from service.keys import MAVERA_PAUSED_KEY, Keys
from service.responses import JSON, error

MAX_KPI_BODY = 8 * 1024 * 1024


def _json_hash(raw: dict) -> dict:
    return {k.decode(): orjson.loads(v) for k, v in sorted(raw.items())}


@admin_endpoint
async def clusters(request: Request, space: str) -> Response:
    data = _json_hash(await request.app.state.redis.hgetall(Keys(space).clusters))
    return JSON({"space": space, "clusters": list(data.values())})


@admin_endpoint
async def personas(request: Request, space: str) -> Response:
    client = request.app.state.redis
    data = _json_hash(await client.hgetall(Keys(space).personas))
    paused = await client.get(MAVERA_PAUSED_KEY)
    rows = [{"cluster": cluster, "mavera_id": p.get("mavera_id"), "name": p.get("name"),
             "last_sync_ms": p.get("last_sync_ms"), "state": p.get("state"), "error": p.get("error")}
            for cluster, p in data.items()]
    return JSON({"space": space, "paused": orjson.loads(paused) if paused else None, "personas": rows})


@admin_endpoint
async def patterns(request: Request, space: str) -> Response:
    client = request.app.state.redis
    data = _json_hash(await client.hgetall(Keys(space).patterns))
    narrative = {k.decode(): v.decode() for k, v in (await client.hgetall(Keys(space).narrative)).items()}
    if "patterns" in narrative:
        narrative["patterns"] = orjson.loads(narrative["patterns"])
    return JSON({"space": space, "patterns": data, "narrative": narrative or None})


async def segment_cluster_profiles(request: Request) -> Response:
    body = await request.body()
    if len(body) > MAX_KPI_BODY:
        return error(413, "payload_too_large", f"body exceeds {MAX_KPI_BODY} bytes")
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
