"""``GET /openapi.json`` and ``GET /docs``: the API described, and Swagger UI rendering it for a person.

Neither asks for a credential, unlike every read, admin and compute route: the document is built from code alone
(``document.py`` reads no setting), so it holds no profile, event, token, write key, space or other configured value,
and says nothing that the source does not. Documentation of the API is not data. Keeping it open is what lets an
application team holding only the Profile API token, or someone choosing a write key, read it; the routes it
describes still refuse every request without their own credential, in the docs page's "Try it out" too.

The page is the ``index.j2`` template shipped by ``swagger-ui-bundle`` (https://github.com/spec-first/swagger_ui_bundle),
its scripts and style sheet served from the installed package: nothing is fetched from a CDN, at build or run time.
Only the files that template loads are served. A Content-Security-Policy lets the page load and call nothing but
this origin (Swagger UI's online validator badge is off, as ``validatorUrl: null``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from pathlib import Path

import jinja2
import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from swagger_ui_bundle import swagger_ui_path

from service.http.openapi.document import document
from service.http.responses import error

UI = Path(str(swagger_ui_path))
TEMPLATE = "index.j2"
SPEC_URL = "../openapi.json"  # relative to /docs/, so that the page works under any mount prefix
ASSET_CACHE = "public, max-age=3600"


@functools.cache
def spec_bytes() -> bytes:
    return orjson.dumps(document())


@functools.cache
def page() -> tuple[str, str]:
    """The rendered page and its Content-Security-Policy (the page's one inline script allowed by its hash)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(UI), autoescape=True)
    html = env.get_template(TEMPLATE).render(openapi_spec_url=SPEC_URL, validatorUrl="null")
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                      for s in re.findall(r"<script>(.*?)</script>", html, re.DOTALL))
    csp = (f"default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
           "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")
    return html, csp


@functools.cache
def assets() -> frozenset[str]:
    """The files the page loads (``./name`` in the template): the only ones served."""
    return frozenset(re.findall(r'(?:src|href)="\./([^"/]+)"', (UI / TEMPLATE).read_text()))


async def openapi_json(request: Request) -> Response:
    return Response(spec_bytes(), media_type="application/json")


async def docs_redirect(request: Request) -> Response:
    """The page loads its files relative to itself (``./swagger-ui.css``): it must be read as a directory."""
    return RedirectResponse("docs/", status_code=307)


async def docs_page(request: Request) -> Response:
    html, csp = page()
    return HTMLResponse(html, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"})


async def docs_asset(request: Request) -> Response:
    name = request.path_params["asset"]
    if name not in assets():
        return error(404, "not_found", f"no such file; the page loads {', '.join(sorted(assets()))}")
    return FileResponse(UI / name, headers={"Cache-Control": ASSET_CACHE, "X-Content-Type-Options": "nosniff"})


routes = [
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/docs", docs_redirect, methods=["GET"]),
    Route("/docs/", docs_page, methods=["GET"]),
    Route("/docs/{asset}", docs_asset, methods=["GET"]),
]
