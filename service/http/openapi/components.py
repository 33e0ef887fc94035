"""The reusable parts of the OpenAPI document: security schemes, the error envelope, shared schemas and responses.

Plain data (OpenAPI 3.0.3, https://spec.openapis.org/oas/v3.0.3), so that the document is the same for every
deployment: nothing here is read from the settings, and so nothing configured (a token, a write key, a space) can
leak through it. Objects whose shape we own are closed (``additionalProperties: false``): the tests validate real
responses against them, so a field added to a response without being documented fails there.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def closed(properties: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    """An object with exactly these properties (``required``: all of them unless said otherwise)."""
    needed = list(properties) if required is None else required
    return {"type": "object", "properties": properties, **({"required": needed} if needed else {}),
            "additionalProperties": False, **extra}


def ok(description: str, schema: Schema, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": json_body(schema), **({"headers": headers} if headers else {})}


def errors(*statuses: int) -> dict[str, Any]:
    """The shared error responses for ``statuses`` (each a ``components/responses`` entry), plus the 500."""
    return {str(s): {"$ref": f"#/components/responses/E{s}"} for s in (*statuses, 500)}


def nullable(schema: Schema) -> Schema:
    return {**schema, "nullable": True} if "$ref" not in schema else {"allOf": [schema], "nullable": True}


STR, INT, BOOL, NUM = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "number"}
ANY: Schema = {"nullable": True, "description": "any JSON value"}
OBJECT: Schema = {"type": "object", "additionalProperties": True}
TIME = {"type": "string", "format": "date-time"}
MS = {"type": "integer", "description": "Unix time in milliseconds"}

SECURITY_SCHEMES = {
    "segmentSignature": {
        "type": "apiKey", "in": "header", "name": "X-Signature",
        "description": "Lower-case hex HMAC-SHA1 of the raw body (of a Webhooks (Actions) batch: of the raw text of "
                       "its first element, as Segment signs it) under a secret listed in SEGMENT_SHARED_SECRETS. Not "
                       "checked while SEGMENT_SHARED_SECRETS is empty.",
    },
    "writeKeyBasic": {
        "type": "http", "scheme": "basic",
        "description": "A write key from SEGMENT_WRITE_KEYS as the username, empty password (what Segment's "
                       "libraries send). The key may instead be the body's `writeKey`; while SEGMENT_WRITE_KEYS is "
                       "empty every key is accepted.",
    },
    "writeKeyBearer": {"type": "http", "scheme": "bearer", "description": "A write key as a Bearer token."},
    "profileToken": {
        "type": "http", "scheme": "basic",
        "description": "PROFILE_API_TOKEN as the username, empty password (as Segment's Profile API). Server-side "
                       "only: these routes send no CORS headers.",
    },
    "adminToken": {"type": "http", "scheme": "bearer", "description": "ADMIN_TOKEN. Empty: these routes answer 401."},
    "kpiApiId": {"type": "apiKey", "in": "header", "name": "X-Customer-Api-Id",
                 "description": "KPI_API_ID, sent together with X-Secret (only when both are configured)."},
    "kpiSecret": {"type": "apiKey", "in": "header", "name": "X-Secret", "description": "KPI_API_SECRET."},
}

ERROR_CODES = ("authentication_error (401), invalid_request_error and validation_error (400), invalid_event (400, "
               "one event sent alone was invalid), payload_too_large (413), not_found (404), method_not_allowed "
               "(405), cors_forbidden (403), rate_limit_error (429), unavailable (503: retry), internal_error (500)")
ERROR_BODY = closed({"code": {**STR, "description": f"What went wrong, for programs: {ERROR_CODES}."},
                     "message": {**STR, "description": "What went wrong and what to do about it, for people."}})
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": INT}}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return ok(description, ref("Error"), headers)


RESPONSES = {
    "E400": _error("The request is malformed or fails validation; sending it again cannot help."),
    "E401": _error("Missing or wrong credentials."),
    "E403": _error("A cross-origin request from an origin, with a method or header, that is not allowed."),
    "E404": _error("Nothing here by that name."),
    "E413": _error("The body is over this route's size limit."),
    "E429": _error("Over the rate limit for this token.", RETRY_AFTER),
    "E500": _error("An unexpected error: nothing was applied; retry later."),
    "E503": _error("Redis (or the job queue) is unavailable: nothing was applied; retry.", RETRY_AFTER),
}

SCHEMAS: dict[str, Schema] = {
    "Error": {**closed({"error": ref("ErrorBody")}), "description": "The one error envelope every route uses."},
    "ErrorBody": ERROR_BODY,
    "Cursor": closed({"url": {**STR, "description": "This request's path and query, with `next` when there is more"},
                      "has_more": BOOL, "next": {**STR, "description": "Pass as `?next=` for the next page; empty "
                                                                         "on the last one"}}),
}
