"""The OpenAPI document of the whole app, assembled once from its parts (one module per group of routes)."""

from __future__ import annotations

import functools
from importlib import metadata
from typing import Any

from service.config import SPACE_ID_RULE
from service.http.openapi import components, console, intake, operator, profiles
from service.http.openapi.components import OBJECT, STR, ok

DESCRIPTION = """\
A Segment destination that keeps live customer profiles in Redis and turns them into Mavera personas.

* **Intake**: Segment's Webhooks destinations post here (`X-Signature`); the **Tracking API** takes Segment's
  libraries directly (write key).
* **Profile API**: Segment's Profile API, self-hosted: same paths, parameters and shapes (`PROFILE_API_TOKEN`).
* **Admin** and **Read API**: operators and dashboards (`ADMIN_TOKEN`; the KPI endpoint also takes
  `X-Customer-Api-Id` / `X-Secret`).

Every error has one shape: `{"error": {"code": "...", "message": "..."}}`.
"""

TAGS = [
    {"name": "Intake", "description": "Segment Webhooks and Webhooks (Actions) deliveries"},
    {"name": "Tracking API", "description": "Segment's HTTP Tracking API, for its libraries (CORS for browsers)"},
    {"name": "Profile API", "description": "Segment's Profile API (https://segment.com/docs/unify/profile-api/)"},
    {"name": "Admin", "description": "Operator actions: dead letters, refusals, replays, jobs, privacy, status"},
    {"name": "Read API", "description": "What the workers computed: clusters, personas, channel patterns, KPI cards"},
    {"name": "Operations", "description": "Health and metrics"},
    {"name": "Documentation", "description": "This document and the page that renders it"},
    {"name": "Console", "description": "The web console's HTML pages (a session cookie from /console/login)"},
]


def _get(op_id: str, summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"get": {"tags": ["Documentation"], "operationId": op_id, "summary": summary, "responses": responses,
                    **extra}}


HTML = {"text/html": {"schema": STR}}
DOCUMENTATION = {
    "/openapi.json": _get("openapi", "This document (OpenAPI 3.0.3)", {"200": ok("The document", OBJECT)}),
    "/docs": _get("docsRedirect", "Redirects to /docs/", {"307": {"description": "To /docs/"}}),
    "/docs/": _get("docs", "This document, rendered by Swagger UI (served from here: nothing is loaded from "
                           "elsewhere)", {"200": {"description": "The page", "content": HTML}}),
    "/docs/{asset}": _get("docsAsset", "The page's scripts, style sheet and icons", {
        "200": {"description": "The file", "content": {"*/*": {"schema": {**STR, "format": "binary"}}}},
        "404": {"$ref": "#/components/responses/E404"}},
        parameters=[{"name": "asset", "in": "path", "required": True, "schema": STR,
                     "description": "A file the page loads, e.g. swagger-ui-bundle.js"}]),
}

PARAMETERS = {
    "spacePath": {"name": "space", "in": "path", "required": True, "schema": STR, "example": "default",
                  "description": f"The space: {SPACE_ID_RULE}"},
    **operator.PARAMETERS,
}


def _version() -> str:
    try:
        return metadata.version("segment-persona-sync")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


@functools.cache
def document() -> dict[str, Any]:
    """Built once per process: it depends on nothing configured, so it is the same for every deployment."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "segment-persona-sync", "version": _version(), "description": DESCRIPTION},
        "tags": TAGS,
        "paths": {**intake.paths(), **profiles.paths(), **operator.paths(), **DOCUMENTATION, **console.paths()},
        "components": {
            "securitySchemes": {**components.SECURITY_SCHEMES, "consoleSession": console.SECURITY_SCHEME},
            "parameters": PARAMETERS,
            "responses": components.RESPONSES,
            "schemas": {**components.SCHEMAS, **intake.SCHEMAS, **profiles.SCHEMAS, **operator.SCHEMAS},
        },
    }
