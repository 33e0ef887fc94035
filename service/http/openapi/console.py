"""The web console's pages (``/console``): HTML for people, listed here so that the document covers every route.

They take a session cookie, not a token: log in with ADMIN_TOKEN on ``/console/login``. Actions are HTML form
posts carrying the session's CSRF token; each answers with a redirect back to its page.
"""

from __future__ import annotations

from typing import Any

from service.http.openapi.components import STR

TAG = "Console"
HTML = {"text/html": {"schema": STR}}
SECURITY: list[dict[str, list[str]]] = [{"consoleSession": []}]
SPACE = {"$ref": "#/components/parameters/spaceQuery"}
SECURITY_SCHEME = {"type": "apiKey", "in": "cookie", "name": "sps_console",
                   "description": "The console's session, set by POST /console/login (signed, HttpOnly, "
                                  "SameSite=Strict, 12 hours). Console routes only."}
FORM = {"application/x-www-form-urlencoded": {"schema": {
    "type": "object", "properties": {"csrf": {**STR, "description": "The CSRF token of the page's forms"},
                                     "space": STR}, "required": ["csrf"]}}}


def _page(op_id: str, summary: str, *statuses: int, parameters: list[Any] | None = None,
          security: list[dict[str, list[str]]] | None = None) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": "The page", "content": HTML},
                                 "303": {"description": "Not logged in: to the login page"}}
    for status in statuses:
        responses[str(status)] = {"description": "A page that says what is wrong", "content": HTML}
    return {"get": {"tags": [TAG], "operationId": op_id, "summary": summary, "responses": responses,
                    "security": SECURITY if security is None else security,
                    **({"parameters": parameters} if parameters else {})}}


def _action(op_id: str, summary: str, parameters: list[Any] | None = None) -> dict[str, Any]:
    return {"post": {"tags": [TAG], "operationId": op_id, "summary": summary, "security": SECURITY,
                     "requestBody": {"required": True, "content": FORM},
                     "responses": {"303": {"description": "Done: back to the page, which says so"},
                                   **{str(s): {"description": "A page that says what is wrong", "content": HTML}
                                      for s in (400, 403, 404, 413, 503)}},
                     **({"parameters": parameters} if parameters else {})}}


def _path(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": STR, "description": description,
            "example": "1700000000000-0" if name == "entry_id" else "job-1"}


ENTRY = _path("entry_id", "A dead letter's id")
JOB = _path("job_id", "A failed job's id")


def paths() -> dict[str, Any]:
    q = [SPACE]
    return {
        "/console": _page("consoleOverview", "Overview: events/s by outcome over the last hour, dead letters, "
                          "failed jobs, recomputes, Mavera, Redis memory", 400, 403, 503, parameters=q),
        "/console/": {"get": {"tags": [TAG], "operationId": "consoleSlash", "summary": "Redirects to /console",
                              "security": [], "responses": {"307": {"description": "To /console"}}}},
        "/console/login": {
            **_page("consoleLoginPage", "The login form", 403, security=[]),
            "post": {"tags": [TAG], "operationId": "consoleLogin", "summary": "Log in with ADMIN_TOKEN",
                     "security": [], "requestBody": {"required": True, "content": {
                         "application/x-www-form-urlencoded": {"schema": {"type": "object", "properties": {
                             "token": STR, "next": STR}, "required": ["token"]}}}},
                     "responses": {"303": {"description": "Logged in: the session cookie, and to the page asked"},
                                   "401": {"description": "Not the admin token: the form again", "content": HTML},
                                   "403": {"description": "The console is disabled (no ADMIN_TOKEN)",
                                           "content": HTML}}},
        },
        "/console/logout": _action("consoleLogout", "Log out: the session cookie is deleted"),
        "/console/clusters": _page("consoleClusters", "Cluster KPI cards, personas, channel patterns and the "
                                   "Mave narrative", 400, 403, 503, parameters=q),
        "/console/profiles": _page("consoleProfiles", "Look a profile up by any identifier", 400, 403, 404, 503,
                                   parameters=[SPACE, {"name": "id", "in": "query", "required": False,
                                                       "schema": STR, "example": "email:ada@example.com"}]),
        "/console/static/console.css": {"get": {"tags": [TAG], "operationId": "consoleCss",
                                                "summary": "The console's style sheet", "security": [],
                                                "responses": {"200": {"description": "CSS", "content": {
                                                    "text/css": {"schema": {**STR, "format": "binary"}}}}}}},
        "/console/operations": _page("consoleOperations", "Dead letters, failed jobs, replays and recomputes",
                                     400, 403, 503, parameters=[SPACE, *[
                                         {"name": n, "in": "query", "required": False, "schema": STR}
                                         for n in ("reason", "source", "since", "until", "before")]]),
        "/console/operations/dead-letters/{entry_id}": _page("consoleDeadLetter", "One dead letter", 400, 403,
                                                             404, 503, parameters=[ENTRY, SPACE]),
        "/console/operations/dead-letters/{entry_id}/replay": _action(
            "consoleReplayDeadLetter", "Queue a replay of one dead letter", [ENTRY]),
        "/console/operations/dead-letters/{entry_id}/delete": _action(
            "consoleDeleteDeadLetter", "Delete one dead letter", [ENTRY]),
        "/console/operations/jobs/{job_id}/requeue": _action("consoleRequeueJob", "Run a failed job again", [JOB]),
        "/console/operations/jobs/requeue": _action("consoleRequeueAll", "Run every failed job again"),
    }
