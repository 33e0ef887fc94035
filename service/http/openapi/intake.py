"""What Segment and its libraries call: the webhook destination, the Tracking API, the SDK settings, and health.

Event bodies are documented loosely (Segment's spec: https://segment.com/docs/connections/spec/common/): the
receiver takes every event on its own and counts the ones it rejects instead of refusing the request, so a schema
stricter than that would describe a different service.
"""

from __future__ import annotations

from typing import Any

from service.http.openapi.components import BOOL, INT, OBJECT, STR, TIME, Schema, closed, errors, json_body, ok, ref
from service.http.receiver import SHORT_NAMES as SHORT
from service.http.receiver import TRACKING_TYPES as TYPES
from service.spec.bodies import MAX_ACTIONS_BATCH, MAX_BATCH_BYTES, MAX_BATCH_EVENTS, MAX_EVENT_BYTES

WEBHOOK_METHODS = ("post", "put", "patch")

_COMMON: dict[str, Schema] = {
    "type": {**STR, "description": "identify, track, page, screen, group, alias; delete from classic Webhooks"},
    "messageId": {**STR, "maxLength": 100, "description": "Deduplicates retries and replays"},
    "userId": {"type": "string", "nullable": True}, "anonymousId": {"type": "string", "nullable": True},
    "timestamp": TIME, "originalTimestamp": TIME, "sentAt": TIME, "receivedAt": TIME,
    "context": OBJECT, "integrations": OBJECT,
}
_BY_TYPE: dict[str, dict[str, Schema]] = {
    "identify": {"traits": OBJECT}, "track": {"event": STR, "properties": OBJECT},
    "page": {"name": STR, "properties": OBJECT}, "screen": {"name": STR, "properties": OBJECT},
    "group": {"groupId": STR, "traits": OBJECT}, "alias": {"previousId": STR},
}

SCHEMAS: dict[str, Schema] = {
    "Event": {"type": "object", "additionalProperties": True, "description": "A Segment event (any call type).",
              "properties": {**_COMMON, **{k: v for fields in _BY_TYPE.values() for k, v in fields.items()}}},
    **{f"{kind.capitalize()}Call": {"type": "object", "additionalProperties": True,
                                    "properties": {**_COMMON, **_BY_TYPE[kind], "writeKey": STR}}
       for kind in TYPES},
    "Batch": {"type": "object", "required": ["batch"], "additionalProperties": True, "properties": {
        "batch": {"type": "array", "items": ref("Event"), "maxItems": MAX_BATCH_EVENTS},
        "context": {**OBJECT, "description": "Merged into each event's context"}, "integrations": OBJECT,
        "sentAt": TIME, "writeKey": STR}},
    "IngestSummary": closed({
        "accepted": {**INT, "description": "Applied now (a delete counts here too)"},
        "duplicate": {**INT, "description": "Already applied (same messageId within the dedupe window)"},
        "suppressed": {**INT, "description": "Of a userId erased by a delete or `forget`, dropped"},
        "rejected": {**INT, "description": "Invalid: kept as dead letters for an operator"},
        "errors": {"type": "array", "maxItems": 100, "items": closed({"index": INT, "message": STR}),
                   "description": "Why events were rejected (the first 100), by position in the body: "
                                  "invalid, or not applied by the store (kept as dead letters to replay)"},
        "success": {**BOOL, "description": "Tracking API only, as Segment's answers"},
    }, required=["accepted", "duplicate", "suppressed", "rejected"]),
    "IngestError": closed({"error": ref("ErrorBody"), "accepted": INT, "duplicate": INT, "suppressed": INT,
                           "rejected": INT, "errors": {"type": "array", "items": closed({"index": INT,
                                                                                       "message": STR})}},
                          required=["error"], description="The error envelope; when one event sent alone was "
                                                          "invalid (code invalid_event), with the counts too."),
}


def _ingested(*statuses: int) -> dict[str, Any]:
    return {
        "200": ok("Every event was applied, a duplicate, suppressed or rejected (the counts say which). Rejected "
              "events are kept as dead letters: resending cannot fix them.", ref("IngestSummary")),
        "400": ok("The body is not JSON, empty, or (one event sent alone) not a valid event.", ref("IngestError")),
        **errors(*statuses),
    }


WEBHOOK_BODY = {"required": True, "content": json_body({"oneOf": [
    ref("Event"), {"type": "array", "items": ref("Event"), "maxItems": MAX_ACTIONS_BATCH,
                   "description": "A Webhooks (Actions) batch"}]})}


def _webhook(method: str, spaced: bool) -> dict[str, Any]:
    where = "into the space in the path" if spaced else "into SPACE_ID"
    return {"tags": ["Intake"], "operationId": f"webhook{'Space' if spaced else ''}{method.capitalize()}",
            "summary": f"Receive Segment webhook deliveries {where}",
            "description": "Classic Webhooks (one event) and Webhooks (Actions) (one event, or an array of events; "
                           "only the first element is signed). 4xx only when a retry can never help; 503 when "
                           "Redis is unavailable, so that Segment retries.",
            "security": [{"segmentSignature": []}, {}], "requestBody": WEBHOOK_BODY,
            "responses": _ingested(401, 404, 413, 503) if spaced else _ingested(401, 413, 503),
            **({"parameters": [{"$ref": "#/components/parameters/spacePath"}]} if spaced else {})}


def _tracking(kind: str, path: str, summary: str) -> dict[str, Any]:
    schema = ref("Batch") if kind == "batch" else ref(f"{kind.capitalize()}Call")
    body = {"required": True, "content": {
        **json_body(schema),
        "text/plain": {"schema": {**STR, "description": "The same JSON (analytics.js sends text/plain)"}}}}
    return {"tags": ["Tracking API"], "operationId": f"tracking_{path.strip('/').replace('/', '_')}",
            "summary": summary, "security": [{"writeKeyBasic": []}, {"writeKeyBearer": []}, {}],
            "description": f"{MAX_EVENT_BYTES // 1024} KB per event, {MAX_BATCH_BYTES // 1024} KB and "
                           f"{MAX_BATCH_EVENTS:,} events per batch; gzip and deflate bodies accepted.",
            "requestBody": body, "responses": _ingested(401, 413, 503)}


def _preflight(op_id: str) -> dict[str, Any]:
    return {"tags": ["Tracking API"], "operationId": op_id, "summary": "CORS preflight (browsers send it)",
            "description": "Allowed for the origins in CORS_ALLOW_ORIGINS, with the headers Content-Type, "
                           "Authorization and X-Retry-Count; never with credentials.",
            "responses": {"204": {"description": "Allowed (Access-Control-Allow-* headers)"}, **errors(403)}}


def _health(op_id: str, summary: str, status: str, unavailable: bool) -> dict[str, Any]:
    responses = {"200": ok(summary, closed({"status": {**STR, "enum": [status]}})),
                 **(errors(503) if unavailable else {})}
    return {"get": {"tags": ["Operations"], "operationId": op_id, "summary": summary, "responses": responses}}


def paths() -> dict[str, Any]:
    out: dict[str, Any] = {
        "/segment": {m: _webhook(m, False) for m in WEBHOOK_METHODS},
        "/segment/{space}": {m: _webhook(m, True) for m in WEBHOOK_METHODS},
    }
    for kind in (*TYPES, "batch"):
        out[f"/v1/{kind}"] = {"post": _tracking(kind, f"/v1/{kind}", f"Tracking API: {kind}"),
                              "options": _preflight(f"preflight_v1_{kind}")}
    short = _tracking("batch", "/v1/short", "Tracking API, analytics.js's short paths")
    short["requestBody"]["content"]["application/json"]["schema"] = {"anyOf": [ref("Event"), ref("Batch")]}
    short["responses"] = _ingested(401, 404, 413, 503)
    letter = {"name": "short", "in": "path", "required": True, "schema": {**STR, "enum": list(SHORT)},
              "description": "The first letter of the call type; b is a batch: "
                             + ", ".join(f"{k} = {v}" for k, v in SHORT.items())}
    out["/v1/{short}"] = {"parameters": [letter], "post": short, "options": _preflight("preflight_v1_short")}
    out["/b"] = {"post": _tracking("batch", "/b", "Tracking API batch for mobile SDKs whose apiHost lacks /v1"),
                 "options": _preflight("preflight_b")}
    settings = ok("The source settings, pointing the library at this host (only `Segment.io`; remote metrics off).",
                  OBJECT, {"Cache-Control": {"schema": STR, "description": "private, max-age=60"}})
    out["/v1/projects/{write_key}/settings"] = {
        "parameters": [{"name": "write_key", "in": "path", "required": True, "schema": STR,
                        "description": "A key in SEGMENT_WRITE_KEYS (any key while it is empty)"}],
        "get": {"tags": ["Tracking API"], "operationId": "sdkSettings",
                "summary": "What analytics.js (cdnURL) and the mobile SDKs (cdnHost) load at start",
                "responses": {"200": settings, **errors(400, 404)}},
        "options": _preflight("preflight_sdkSettings"),
    }
    out["/healthz"] = _health("healthz", "The process is up", "ok", False)
    out["/readyz"] = _health("readyz", "Redis answers: ready for traffic", "ready", True)
    out["/metrics"] = {"get": {"tags": ["Operations"], "operationId": "metrics", "summary": "Prometheus metrics",
                               "responses": {"200": {"description": "Prometheus text exposition format",
                                                     "content": {"text/plain": {"schema": STR}}}}}}
    return out
