"""Segment Profile API, self-hosted: ``/v1/spaces/<space>/collections/users/profiles/<type>:<value>/...``.

Same URLs, parameters, response shapes and error envelope as Segment's
(https://segment.com/docs/unify/profile-api/), so a client written for Segment's Profile API reads our profiles by
changing only the host. A merged profile answers to every one of
its identifiers; audience membership shows as boolean traits.
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.config import valid_space
from service.http import auth
from service.http.responses import JSON, error, unavailable
from service.spec.keys import TOMBSTONE
from service.spec.profile import Profile, decode_profile
from service.state.store import REDIS_DOWN, state_keys_async

BASE = "/v1/spaces/{space}/collections/users/profiles/{ident}"
CLASSES = {"audience": "audience", "computed_trait": "computed_trait"}


def iso(ms: int | str | None) -> str | None:
    if ms is None or ms == "":
        return None
    return datetime.fromtimestamp(int(ms) / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _limit(request: Request, default: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise ApiError(400, "validation_error", "limit must be a whole number from 1 to 100")
    return int(raw)


async def find_profile(request: Request) -> Profile:
    """Resolve ``<type>:<value>`` (or ``segment_id:<id>``) to the live profile, following merges."""
    state = request.app.state
    space = request.path_params["space"]
    kind, sep, value = request.path_params["ident"].partition(":")
    if not sep or not kind or not value:
        raise ApiError(400, "invalid_request_error", "profile id must look like user_id:abc or email:a@b.c")
    client = state.redis
    keys = await state_keys_async(client, space)
    if kind == "segment_id":
        pid = value
    else:
        prepared = state.rules.prepare([(kind, value)])
        pid = await client.get(keys.ident(*prepared[0])) if prepared else None
        pid = pid.decode() if pid else None
    if pid == TOMBSTONE:
        pid = None
    for _ in range(16):  # follow merge redirects
        if not pid:
            break
        raw = await client.hgetall(keys.profile(pid))
        if raw:
            return decode_profile(pid, raw)
        nxt = await client.get(keys.redirect(pid))
        pid = nxt.decode() if nxt else None
    raise ApiError(404, "not_found", "Profile was not found.")


def _page(request: Request, names: list[str], limit: int) -> tuple[list[str], dict]:
    after = request.query_params.get("next") or ""
    names = [n for n in sorted(names) if n > after] if after else sorted(names)
    page, more = names[:limit], len(names) > limit
    params = {k: v for k, v in request.query_params.items() if k != "next"}
    if more:
        params["next"] = page[-1]
    cursor = {"url": request.url.path + ("?" + urlencode(params) if params else ""), "has_more": more,
              "next": page[-1] if more else ""}
    return page, cursor


def traits_body(request: Request, profile: Profile) -> dict:
    limit = _limit(request, 10)
    include = {x for x in (request.query_params.get("include") or "").split(",") if x}
    klass = request.query_params.get("class")
    if klass is not None and klass not in CLASSES:
        raise ApiError(400, "validation_error", "class must be audience or computed_trait")
    verbose = (request.query_params.get("verbose") or "").lower() in ("1", "true", "yes")
    names = [n for n, t in profile.traits.items()
             if (not include or n in include) and (klass is None or t.kind == klass)]
    page, cursor = _page(request, names, limit)
    out = {}
    for n in page:
        t = profile.traits[n]
        out[n] = {"value": t.value, "source_id": None, "updated_at": iso(t.ts)} if verbose else t.value
    return {"traits": out, "cursor": cursor}


def external_ids_body(request: Request, profile: Profile) -> dict:
    limit = _limit(request, 25)
    include = {x for x in (request.query_params.get("include") or "").split(",") if x}
    by_name = {f"{i.type}:{i.value}": i for i in profile.identifiers if not include or i.type in include}
    page, cursor = _page(request, list(by_name), limit)
    data = [{"id": by_name[n].value, "type": by_name[n].type, "source_id": None, "collection": "users",
             "created_at": iso(by_name[n].first_seen), "encoding": "none",
             "first_message_id": by_name[n].first_message_id} for n in page]
    return {"data": data, "cursor": cursor}


def metadata_body(request: Request, profile: Profile) -> dict:
    m = profile.meta
    return {"metadata": {
        "segment_id": profile.id,
        "created_at": iso(m.get("ca")),
        "updated_at": iso(m.get("ua")),
        "expires_at": None,
        "first_message_id": m.get("fm"),
        "first_message_at": iso(m.get("fs")),
        "last_message_id": m.get("lm"),
        "last_message_at": iso(m.get("ls")),
        "merged_from": profile.merged_from,
    }}


def links_body(request: Request, profile: Profile) -> dict:
    data = [{"to_collection": "accounts", "external_ids": [{"id": gid, "type": "group_id", "source_id": None,
             "collection": "accounts", "created_at": iso(ts), "encoding": "none"}]}
            for gid, ts in sorted(profile.groups.items())]
    return {"data": data, "cursor": {"url": request.url.path, "has_more": False, "next": ""}}


BODIES = {"traits": traits_body, "external_ids": external_ids_body, "metadata": metadata_body, "links": links_body}


async def profile_endpoint(request: Request) -> Response:
    state = request.app.state
    if not auth.token_ok(auth.basic_username(request.headers.get("authorization")), state.settings.profile_api_token):
        return error(401, "authentication_error",
                     "send the PROFILE_API_TOKEN as the HTTP Basic username (empty password)")
    part = request.path_params["part"]
    if part not in BODIES or not valid_space(request.path_params["space"]):
        return error(404, "not_found", f"unknown Profile API path; use one of {', '.join(sorted(BODIES))}")
    try:
        profile = await find_profile(request)
        return JSON(BODIES[part](request, profile))
    except ApiError as exc:
        return error(exc.status, exc.code, exc.message)
    except REDIS_DOWN as exc:
        return unavailable(exc)


routes = [Route(BASE + "/{part:str}", profile_endpoint, methods=["GET"])]
