"""The OpenAPI document against the app it describes.

Completeness: every route and method of ``app.routes`` is documented, and every documented path and method reaches
a route of the app. Which route a documented path reaches is asked of Starlette's own matching (``Route.matches``),
with each path parameter filled in from the document (every value of an enum, else the example, else a sample), so
a route with path parameters counts as documented through the paths that expand it, and a documented expansion
must reach some route. The Profile API is one such route, whose collection and part are path parameters: which
collections and parts it answers is read from its own tables and compared with the document's.

Real responses are validated against the document in ``test_openapi_responses.py``.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
from openapi_spec_validator import validate
from starlette.applications import Starlette
from starlette.routing import Match, Route
from starlette.testclient import TestClient

from service.config import Settings
from service.http import profiles_api
from service.http.app import create_app
from service.http.openapi import profiles
from service.http.openapi.document import document

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
IMPLIED = {"HEAD"}  # Starlette answers HEAD on every GET route by itself: documented with the GET


def documented() -> dict[tuple[str, str], dict[str, Any]]:
    """(path template, METHOD) -> the operation."""
    return {(path, method.upper()): op for path, item in document()["paths"].items()
            for method, op in item.items() if method in METHODS}


def _parameters(path: str) -> dict[str, dict[str, Any]]:
    """The path parameters of ``path``'s operations (path-level and operation-level), by name."""
    params = document()["components"]["parameters"]
    item = document()["paths"].get(path, {})
    found = {}
    for p in [*item.get("parameters", []), *(p for m in METHODS for p in item.get(m, {}).get("parameters", []))]:
        p = params[p["$ref"].rsplit("/", 1)[1]] if "$ref" in p else p
        if p["in"] == "path":
            found[p["name"]] = p
    return found


def expansions(path: str) -> list[str]:
    """Concrete paths for a template: every enum value of each parameter, else its example, else a sample."""
    names = re.findall(r"{(\w+)}", path)
    params = _parameters(path)
    choices = [params[n]["schema"].get("enum") or [params[n].get("example", "x1")] for n in names]
    out = []
    for values in itertools.product(*choices):
        concrete = path
        for name, value in zip(names, values, strict=True):
            concrete = concrete.replace("{" + name + "}", str(value))
        out.append(concrete)
    return out


def route_for(app: Starlette, path: str, method: str) -> Route | None:
    """The route Starlette would run for ``method path``: the first that matches both."""
    scope = {"type": "http", "path": path, "root_path": "", "method": method}
    for route in app.routes:
        if route.matches(scope)[0] == Match.FULL:
            assert isinstance(route, Route)
            return route
    return None


def gaps(app: Starlette, ops: dict[tuple[str, str], Any]) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(routes and methods no documented operation reaches, documented operations that reach no route)."""
    served = set()
    for route in app.routes:
        assert isinstance(route, Route), f"{route!r}: walk its routes here before adding a Mount"
        served |= {(route.path, m) for m in (route.methods or set()) - IMPLIED}
    reached, phantom = set(), set()
    for path, method in ops:
        for concrete in expansions(path):
            route = route_for(app, concrete, method)
            if route is None:
                phantom.add((concrete, method))
            else:
                reached.add((route.path, method))
    return served - reached, phantom


@pytest.fixture(scope="module")
def app() -> Starlette:
    return create_app(Settings(), "redis://127.0.0.1:1", "")  # never started: only its routes are read


def test_the_document_is_valid_openapi_and_served_without_a_credential(client: TestClient) -> None:
    resp = client.get("/openapi.json")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    assert resp.json() == document()
    validate(resp.json())


def test_every_route_and_method_is_documented_and_every_documented_one_exists(app: Starlette) -> None:
    undocumented, phantom = gaps(app, documented())
    assert undocumented == set(), "document these in service/http/openapi/ (a Profile API collection or part: " \
                                  "profiles.COLLECTIONS)"
    assert phantom == set(), "these documented paths reach no route of the app"


def test_the_completeness_check_sees_a_missing_route_and_a_phantom_path(app: Starlette) -> None:
    async def nothing(request: Any) -> Any:
        raise AssertionError

    extra = Starlette(routes=[*app.routes, Route("/admin/new", nothing, methods=["POST"])])
    ops = {**documented(), ("/admin/nothing-here", "GET"): {}}
    del ops[("/healthz", "GET")]
    undocumented, phantom = gaps(extra, ops)
    assert undocumented == {("/admin/new", "POST"), ("/healthz", "GET")}
    assert phantom == {("/admin/nothing-here", "GET")}


def test_every_collection_and_part_the_profile_api_answers_is_documented() -> None:
    served = {"users": set(profiles_api.USER_PARTS), "accounts": set(profiles_api.ACCOUNT_PARTS)}
    assert {c: set(parts) for c, parts in profiles.COLLECTIONS.items()} == served, \
        "document it in service/http/openapi/profiles.py (COLLECTIONS)"
