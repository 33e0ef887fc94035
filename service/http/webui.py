"""What every console page shares: templates, the session guard, CSRF on every action, security headers, the
error pages (4xx for bad input, 503 while Redis is down).

Templates are Jinja2 with autoescape always on: values from events (traits, event names, identifiers) reach the
page only escaped. Pages carry no script at all, and the Content-Security-Policy says so: a value that slipped
through escaping could still not run. ADMIN_TOKEN is only ever compared, never rendered or logged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from service.config import SPACE_ID_RULE, valid_space
from service.http.intake import read_body
from service.http.session import COOKIE, Session, csrf_ok, csrf_token, session_key, verify
from service.spec.bodies import BodyError
from service.spec.keys import SPACES_KEY
from service.state import problems
from service.state.store import REDIS_DOWN

HERE = Path(__file__).resolve().parent
PREFIX = "/console"
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "same-origin", "Cache-Control": "no-store"}
MAX_FORM = 16 * 1024


def _ms(value: Any) -> int | None:
    """A stored epoch-ms value, or None for none ('', 0, missing, not a number)."""
    return int(value) if value not in (None, "", 0) and str(value).lstrip("-").isdigit() else None


def when(ms: Any) -> str:
    """Epoch ms as the status prints it, ``2026-03-15 10:00:00 UTC`` ('—' for none)."""
    at = _ms(ms)
    return "—" if at is None else problems.when(at)


def ago(ms: Any, now_ms: int | None = None) -> str:
    """How long ago, as the status says it: ``42 s ago``, ``5 min ago`` ('never' for none)."""
    at = _ms(ms)
    return "never" if at is None else problems.ago(at, now_ms if now_ms is not None else int(time.time() * 1000))


def size(n: Any) -> str:
    return problems.size(int(n or 0))


def as_text(value: Any) -> str:
    """A trait or property value as text: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)


def href(path: str, **params: Any) -> str:
    """A console link with its query string: always a path of ours, so an event's value can never become a
    ``javascript:`` URL, only (escaped) query text."""
    assert path.startswith(PREFIX)
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return f"{path}?{query}" if query else path


ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates" / "console"), autoescape=True,
                         undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
ENV.filters.update(when=when, ago=ago, size=size, as_text=as_text, thousands=lambda n: f"{int(n or 0):,}",
                   money=lambda v: f"{float(v or 0):,.2f}", pct=lambda v: f"{float(v or 0):.1f}")
ENV.globals.update(href=href, prefix=PREFIX, replicas=problems.replicas)


class PageError(Exception):
    """Bad input or a missing thing: the status and what to tell the person."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


@dataclass
class Ctx:
    """One request of a logged-in person: the space looked at, the session's CSRF token, the form posted."""

    request: Request
    session: Session
    csrf: str
    space: str
    form: dict[str, str]

    @property
    def state(self) -> Any:
        return self.request.app.state

    def render(self, template: str, status: int = 200, **values: Any) -> HTMLResponse:
        return render(template, status, logged_in=True, csrf=self.csrf, space=self.space,
                      path=self.request.url.path, now_ms=int(time.time() * 1000), **values)


def render(template: str, status: int = 200, **values: Any) -> HTMLResponse:
    values.setdefault("logged_in", False)
    values.setdefault("space", "")
    values.setdefault("path", "")
    html = ENV.get_template(template).render(**values)
    return HTMLResponse(html, status_code=status, headers=HEADERS)


def error_page(status: int, title: str, message: str, logged_in: bool = False, **values: Any) -> HTMLResponse:
    return render("error.html", status, title=title, message=message, logged_in=logged_in, **values)


def disabled() -> HTMLResponse:
    return error_page(403, "The console is disabled", "Set ADMIN_TOKEN for the web process to turn the console "
                      "on; you log in with it.")


def unavailable() -> HTMLResponse:
    response = error_page(503, "Redis is unavailable", "The console cannot read the state right now. It answers "
                          "again as soon as Redis does; `persona-sync status` says more.")
    response.headers["Retry-After"] = "5"
    return response


def same_origin(request: Request) -> bool:
    """A form posted from one of our own pages: browsers send Origin with every POST (an absent one is a client
    that is not a browser, which no cookie-stealing page can be)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    try:
        return urlsplit(origin).netloc == request.headers.get("host", "")
    except ValueError:  # not a URL (an unbalanced '[')
        return False


async def read_form(request: Request) -> dict[str, str]:
    """The urlencoded form of a POST (read within MAX_FORM); a name given twice keeps its first value."""
    try:
        body = await read_body(request, MAX_FORM)
    except BodyError as exc:
        raise PageError(exc.status, "Request refused", exc.message) from None
    form: dict[str, str] = {}
    for name, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        form.setdefault(name, value)
    return form


def login_url(request: Request) -> str:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return href(PREFIX + "/login", next=target)


def safe_next(target: str | None) -> str:
    """Where to go after logging in: only a console path of ours (``//evil.example`` is not one)."""
    if target and target.startswith(PREFIX) and not target.startswith("//") and "\\" not in target:
        return target
    return PREFIX


def current_session(request: Request) -> tuple[bytes, Session | None]:
    key = session_key(request.app.state.settings.admin_token)
    return key, verify(key, request.cookies.get(COOKIE), int(time.time()))


Handler = Callable[[Ctx], Awaitable[Response]]


def console(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a page or an action: ADMIN_TOKEN set, a valid session (else the login page), a valid ``?space=``; for
    a POST, our own origin and the session's CSRF token; the error pages for what goes wrong."""

    async def endpoint(request: Request) -> Response:
        if not request.app.state.settings.admin_token:
            return disabled()
        key, session = current_session(request)
        if session is None:
            if request.method == "GET":
                return RedirectResponse(login_url(request), 303, headers=HEADERS)
            return error_page(403, "Session expired", "Log in again, then repeat what you were doing.")
        csrf = csrf_token(key, session)
        try:
            form: dict[str, str] = {}
            if request.method == "POST":
                form = await read_form(request)
                if not same_origin(request) or not csrf_ok(key, session, form.get("csrf")):
                    raise PageError(403, "Request refused", "This form is not from this session: reload the page "
                                    "and try again.")
            space = form.get("space") or request.query_params.get("space") or request.app.state.settings.space_id
            if not valid_space(space):
                raise PageError(400, "Unknown space", f"A space is {SPACE_ID_RULE}.")
            return await handler(Ctx(request, session, csrf, space, form))
        except PageError as exc:
            return error_page(exc.status, exc.title, exc.message, logged_in=True, csrf=csrf)
        except REDIS_DOWN:
            return unavailable()

    return endpoint


async def known_spaces(ctx: Ctx) -> list[str]:
    """Every space that received data (a small set), and the one looked at."""
    found = {s.decode() for s in await ctx.state.redis.smembers(SPACES_KEY)}
    return sorted(found | {ctx.space})
