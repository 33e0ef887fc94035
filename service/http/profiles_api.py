"""Segment Profile API, self-hosted: ``/v1/spaces/<space>/collections/users|accounts/profiles/<id>/<part>``.

Same URLs, parameters, response shapes and error envelope as Segment's
(https://segment.com/docs/unify/profile-api/), so a client written for Segment's Profile API reads our profiles by
changing only the host. A merged profile answers to every one of its identifiers; audience membership shows as
boolean traits. Users have ``traits``, ``external_ids``, ``metadata``, ``links`` (their accounts) and ``events``;
accounts (``group_id:<id>``, from ``group`` calls) have ``traits`` and ``links`` (their users), as Segment's.

Identifiers are read from the raw path, so a value holding ``/`` arrives as ``%2F`` and is decoded after the path
is split; they are then normalised as the receiver normalised them when it indexed them (emails lower-case and
trimmed). A bare profile id (``use_…``, the form of the cursor URLs) works too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote, urlencode

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.config import valid_space
from service.http import auth
from service.http.responses import JSON, error, unavailable
from service.spec.events import InvalidEvent, iso_ms, normalise
from service.spec.keys import Keys, profile_api_rate
from service.spec.profile import Profile, decode_profile
from service.state.store import REDIS_DOWN, state_keys_async

PREFIX = "/v1/spaces/{space}/collections/{collection}/profiles/"
CLASSES = {"audience": "audience", "computed_trait": "computed_trait"}
CALL_TYPES = ("track", "page", "screen", "identify", "group", "alias")
EVENTS_WINDOW_MS = 14 * 86400 * 1000  # Segment's /events serves the last 14 days unless start says otherwise
PROFILE_ID_PREFIX = "use_"
PROFILE_ID = re.compile(re.escape(PROFILE_ID_PREFIX) + "[0-9]+")  # as the apply script names profiles
MAX_EXAMINED = 1000  # index entries one /events request examines at most (20 x limit when that is more)


def iso(ms: int | str | None) -> str | None:
    """A stored time as ISO-8601; None for none, or for one no date can show (an older version accepted times
    before year 1 in UTC)."""
    if ms is None or ms == "":
        return None
    try:
        return iso_ms(int(ms))
    except (ValueError, OverflowError, OSError):
        return None


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _limit(request: Request, default: int, most: int = 100) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4) or not 1 <= int(raw) <= most:
        raise ApiError(400, "validation_error", f"limit must be a whole number from 1 to {most}")
    return int(raw)


def _csv(request: Request, name: str) -> list[str]:
    return [x.strip() for x in (request.query_params.get(name) or "").split(",") if x.strip()]


def split_path(request: Request) -> tuple[str, str]:
    """``(identifier, part)`` from the raw path: split first, then percent-decode, so ``%2F`` stays in the value."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    segments = raw.decode("latin-1").split("?", 1)[0].split("/")
    # "", "v1", "spaces", space, "collections", collection, "profiles", identifier, part
    if len(segments) != 9 or segments[6] != "profiles" or not segments[7] or not segments[8]:
        raise ApiError(404, "not_found", "the path must end in /profiles/<type>:<value>/<part>")
    return unquote(segments[7], encoding="utf-8", errors="replace"), segments[8]


async def find_profile(request: Request, ident: str) -> Profile:
    """Resolve ``<type>:<value>``, ``segment_id:<id>`` or a bare ``use_…`` id to the live profile."""
    return await lookup(request.app.state, request.path_params["space"], ident)


async def lookup(state: Any, space: str, ident: str) -> Profile:
    """``find_profile`` for a space named by the caller (the console looks profiles up the same way)."""
    kind, sep, value = ident.partition(":")
    if not sep and ident.startswith(PROFILE_ID_PREFIX):
        kind, value = "segment_id", ident
    elif not sep or not kind or not value:
        raise ApiError(400, "invalid_request_error",
                       "profile id must look like user_id:abc, email:a@b.c or a Segment id (use_…)")
    if kind == "segment_id":
        found: tuple[str, str] | None = ("segment_id", value)
    else:
        prepared = state.rules.prepare([(kind.strip().lower(), value)])
        found = prepared[0] if prepared else None
    live = await state.reader.find(space, *found) if found else None
    if live is None:
        raise ApiError(404, "not_found", "Profile was not found.")
    pid, fields, generation = live
    profile = decode_profile(pid, fields)
    profile.generation = generation
    return profile


def _cursor(request: Request, subject: str, more: bool, nxt: str) -> dict:
    """Segment's cursor: the URL names the profile by its id, as Segment's own cursor URLs do."""
    params = {k: v for k, v in request.query_params.items() if k != "next"}
    if more:
        params["next"] = nxt
    space, collection = request.path_params["space"], request.path_params["collection"]
    path = f"/v1/spaces/{space}/collections/{collection}/profiles/{quote(subject, safe=':@')}/{split_path(request)[1]}"
    return {"url": path + ("?" + urlencode(params) if params else ""), "has_more": more, "next": nxt if more else ""}


def _page(request: Request, subject: str, names: list[str], limit: int) -> tuple[list[str], dict]:
    """One page of ``names`` in order; the cursor is the last name given, encoded: never empty while there is
    more, even after a name that is (a trait may be called "")."""
    token = request.query_params.get("next")
    names = sorted(names)
    if token:
        try:
            after = base64.urlsafe_b64decode(token[1:].encode() + b"==").decode() if token[:1] == "n" else None
        except (ValueError, binascii.Error, UnicodeDecodeError):
            after = None
        if after is None:
            raise ApiError(400, "validation_error", "next is not a cursor this API returned")
        names = [n for n in names if n > after]
    page, more = names[:limit], len(names) > limit
    nxt = "n" + base64.urlsafe_b64encode(page[-1].encode()).decode().rstrip("=") if more else ""
    return page, _cursor(request, subject, more, nxt)


def _traits(request: Request, subject: str, traits: dict) -> dict:
    limit = _limit(request, 10, most=200)  # Segment: 10 by default, up to 200
    include = set(_csv(request, "include"))
    klass = request.query_params.get("class")
    if klass is not None and klass not in CLASSES:
        raise ApiError(400, "validation_error", "class must be audience or computed_trait")
    verbose = (request.query_params.get("verbose") or "").lower() in ("1", "true", "yes")
    names = [n for n, t in traits.items() if (not include or n in include) and (klass is None or t.kind == klass)]
    page, cursor = _page(request, subject, names, limit)
    out = {}
    for n in page:
        t = traits[n]
        out[n] = {"value": t.value, "source_id": None, "updated_at": iso(t.ts)} if verbose else t.value
    return {"traits": out, "cursor": cursor}


async def traits_body(request: Request, profile: Profile) -> dict:
    return _traits(request, profile.id, profile.traits)


async def external_ids_body(request: Request, profile: Profile) -> dict:
    limit = _limit(request, 25)
    include = set(_csv(request, "include"))
    by_name = {f"{i.type}:{i.value}": i for i in profile.identifiers if not include or i.type in include}
    page, cursor = _page(request, profile.id, list(by_name), limit)
    data = [{"id": by_name[n].value, "type": by_name[n].type, "source_id": None, "collection": "users",
             "created_at": iso(by_name[n].first_seen), "encoding": "none",
             "first_message_id": by_name[n].first_message_id} for n in page]
    return {"data": data, "cursor": cursor}


async def metadata_body(request: Request, profile: Profile) -> dict:
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


def _linked(names: list[str], collection: str, kind: str, created: dict[str, Any]) -> list[dict]:
    return [{"to_collection": collection, "external_ids": [{
        "id": n, "type": kind, "source_id": None, "collection": collection, "created_at": iso(created.get(n)),
        "encoding": "none"}]} for n in names]


async def links_body(request: Request, profile: Profile) -> dict:
    """A user's accounts (from ``group`` calls), 20 a page as Segment's."""
    page, cursor = _page(request, profile.id, list(profile.groups), _limit(request, 20))
    return {"data": _linked(page, "accounts", "group_id", profile.groups), "cursor": cursor}


# -- /events ---------------------------------------------------------------------------------------------------

def _time(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if not raw:
        return None
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ApiError(400, "validation_error", f"{name} must be an ISO 8601 date or time, e.g. 2026-01-02 "
                                                f"or 2026-01-02T15:04:05Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _encode_next(score: int, member: str) -> str:
    return base64.urlsafe_b64encode(f"{score}::{member}".encode()).decode()


def _decode_next(token: str) -> tuple[int, str]:
    try:
        score, sep, member = base64.urlsafe_b64decode(token.encode()).decode().partition("::")
        if not sep or not member:
            raise ValueError
        return int(score), member
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "validation_error", "next is not a cursor this API returned") from None


class _Index:
    """One profile's event index (``Keys.events_index``), read in order a batch at a time. Each batch continues
    from the last score read (skipping the members already read at that score), so a read costs what it returns,
    however deep into the index it is."""

    BATCH = 200

    def __init__(self, client: Any, key: str, lo: int, hi: int, desc: bool) -> None:
        self.client, self.key, self.lo, self.hi, self.desc = client, key, lo, hi, desc
        self.skip, self.done = 0, False  # members already read at the bound's score
        self.buf: list[tuple[int, str]] = []  # the batch read, last item first

    async def head(self) -> tuple[int, str] | None:
        if not self.buf and not self.done:
            if self.desc:
                rows = await self.client.zrevrangebyscore(self.key, self.hi, self.lo, start=self.skip,
                                                          num=self.BATCH, withscores=True)
            else:
                rows = await self.client.zrangebyscore(self.key, self.lo, self.hi, start=self.skip,
                                                       num=self.BATCH, withscores=True)
            self.done = len(rows) < self.BATCH
            if rows:
                last = int(rows[-1][1])
                same = sum(1 for _, score in rows if int(score) == last)
                bound = self.hi if self.desc else self.lo
                self.skip = self.skip + same if last == bound else same
                if self.desc:
                    self.hi = last
                else:
                    self.lo = last
            self.buf = [(int(score), member.decode()) for member, score in reversed(rows)]
        return self.buf[-1] if self.buf else None

    def pop(self) -> tuple[int, str]:
        return self.buf.pop()


async def _in_order(indexes: list[_Index], desc: bool, after: tuple[int, str] | None):  # noqa: ANN202
    """The (score, member) of every index merged by time (then member), past the cursor ``after``. An entry in
    two indexes (a log replay after a merge indexes it again under the survivor) comes once."""
    previous = None
    while True:
        best, best_i = None, -1
        for i, ix in enumerate(indexes):
            h = await ix.head()
            if h is not None and (best is None or (h > best if desc else h < best)):
                best, best_i = h, i
        if best is None:
            return
        indexes[best_i].pop()
        if best == previous or (after is not None and (best >= after if desc else best <= after)):
            continue
        previous = best
        yield best


def event_view(obj: dict, pid: str, ids: list[tuple[str, str]]) -> dict:
    """A logged Segment event in the shape of Segment's ``/events`` items."""
    kind = str(obj.get("type", "")).lower()
    out: dict[str, Any] = {
        "external_ids": [{"collection": "users", "type": t, "id": v, "encoding": "none"} for t, v in ids],
        "context": obj.get("context") or {},
        "type": kind,
        "message_id": obj.get("messageId"),
        "source_id": None,
        "timestamp": obj.get("timestamp") or obj.get("originalTimestamp"),
    }
    if kind == "track":
        out["event"] = obj.get("event")
    if kind in ("page", "screen"):
        out["name"] = obj.get("name")
    if kind in ("track", "page", "screen"):
        out["properties"] = obj.get("properties") or {}
    if kind in ("identify", "group"):
        out["traits"] = obj.get("traits") or {}
    if kind == "group":
        out["group_id"] = obj.get("groupId")
    if kind == "alias":
        out["previous_id"] = obj.get("previousId")
    out["related"] = {"users": pid}
    return out


async def events_body(request: Request, profile: Profile) -> dict:
    """The profile's logged events (and those of the profiles merged into it), newest first unless ``sort=asc``.

    ``include`` / ``exclude`` take event names (``Order Completed``) and call types (``page``, ``identify``…):
    by default only track events are served, as Segment's; naming a call type in ``include`` adds that type."""
    state = request.app.state
    limit = _limit(request, 10)
    sort = (request.query_params.get("sort") or "desc").lower()
    if sort not in ("asc", "desc"):
        raise ApiError(400, "validation_error", "sort must be asc or desc")
    desc = sort == "desc"
    now = int(time.time() * 1000)
    end = _time(request, "end")
    start = _time(request, "start")
    hi = end if end is not None else now
    lo = start if start is not None else hi - EVENTS_WINDOW_MS
    include, exclude = _csv(request, "include"), set(_csv(request, "exclude"))
    types = {x.lower() for x in include if x.lower() in CALL_TYPES}
    names = {x for x in include if x.lower() not in CALL_TYPES}
    if not types and not names:
        types = {"track"}
    after = _decode_next(request.query_params["next"]) if request.query_params.get("next") else None
    page, more, nxt = await logged_events(state, request.path_params["space"], profile, limit=limit, lo=lo, hi=hi,
                                          desc=desc, types=types, names=names, exclude=exclude, after=after)
    return {"data": event_views(state, profile, [obj for _, _, obj in page], now),
            "cursor": _cursor(request, profile.id, more, nxt)}


async def logged_events(state: Any, space: str, profile: Profile, *, limit: int, lo: int, hi: int, desc: bool,
                        types: set[str], names: set[str], exclude: set[str],
                        after: tuple[int, str] | None = None) -> tuple[list[tuple[int, str, dict]], bool, str]:
    """One page of a profile's logged events between ``lo`` and ``hi`` (ms): ``(page, has_more, next cursor)``.

    ``types`` are the call types served, ``names`` track event names served besides, ``exclude`` names and types
    left out. Shared by ``/events`` and the console's profile page."""
    excluded_types = {x.lower() for x in exclude if x.lower() in CALL_TYPES}
    # members start with the call type's letter: what is not asked for is skipped before its event is read
    letters = {t[0] for t in types - excluded_types} | ({"t"} if names and "track" not in excluded_types else set())
    if after is not None:
        hi, lo = (min(hi, after[0]), lo) if desc else (hi, max(lo, after[0]))

    client = state.redis
    # the generation the profile was read from: a rebuild's switch since then must not send its ids to the new one's
    keys = Keys(space, profile.generation) if profile.generation is not None else await state_keys_async(client, space)
    indexes = [_Index(client, keys.events_index(p), lo, hi, desc) for p in [profile.id, *profile.merged_from]]
    kept: list[tuple[int, str, dict]] = []
    batch: list[tuple[int, str]] = []

    async def flush() -> None:
        pipe = client.pipeline(transaction=False)
        for _, member in batch:
            pipe.xrange(keys.log, min=member[1:], max=member[1:])
        for (score, member), rows in zip(batch, await pipe.execute(), strict=True):
            if not rows or len(kept) > limit:
                continue  # trimmed from the log (retention) or erased
            try:
                obj = orjson.loads(rows[0][1].get(b"e", b""))
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            kind = str(obj.get("type", "")).lower()
            name = obj.get("event") if isinstance(obj.get("event"), str) else None  # any JSON was accepted there
            if kind in excluded_types or name in exclude:
                continue
            if kind == "track" and "track" not in types and name not in names:
                continue
            kept.append((score, member, obj))
        batch.clear()

    examined, last_seen, cut = 0, None, False
    most = max(MAX_EXAMINED, 20 * limit)  # a page may come back short (has_more, a cursor) rather than scan on
    async for item in _in_order(indexes, desc, after):
        examined += 1
        if examined > most:
            cut = True
            break
        last_seen = item
        if item[1][:1] not in letters:
            continue
        batch.append(item)
        if len(batch) >= limit + 1 - len(kept):
            await flush()
            if len(kept) > limit:
                break
    if batch:
        await flush()
    page, more = kept[:limit], len(kept) > limit
    nxt = _encode_next(page[-1][0], page[-1][1]) if more else ""
    if cut and not more and last_seen is not None:  # stopped at the scan limit: go on from the last entry examined
        more, nxt = True, _encode_next(*last_seen)
    return page, more, nxt


def event_views(state: Any, profile: Profile, objs: list[dict], now: int) -> list[dict]:
    """Logged events in the shape of Segment's ``/events`` items, with the identifiers each one carried."""
    data = []
    for obj in objs:
        try:
            ids = list(normalise(obj, now, state.rules).identifiers)
        except InvalidEvent:
            ids = []
        data.append(event_view(obj, profile.id, ids))
    return data


# -- accounts ---------------------------------------------------------------------------------------------------

async def account_traits(request: Request, group_id: str) -> dict:
    keys = await state_keys_async(request.app.state.redis, request.path_params["space"])
    raw = await request.app.state.redis.hgetall(keys.account(group_id))
    if not raw:
        raise ApiError(404, "not_found", "Profile was not found.")
    return _traits(request, f"group_id:{group_id}", decode_profile(group_id, raw).traits)


async def account_links(request: Request, group_id: str) -> dict:
    """The account's users, 20 a page: a sorted set of live profile ids kept by the apply script (a merge moves
    the membership to the survivor, an erasure removes it), read a page at a time."""
    client = request.app.state.redis
    keys = await state_keys_async(client, request.path_params["space"])
    limit = _limit(request, 20)
    after = request.query_params.get("next") or ""
    if after and not PROFILE_ID.fullmatch(after):  # the cursor is the last profile id of the page before
        raise ApiError(400, "validation_error", "next is not a cursor this API returned")
    members = await client.zrangebylex(keys.account_users(group_id), f"({after}" if after else "-", "+",
                                       start=0, num=limit + 1)
    if not members and not after and not await client.exists(keys.account(group_id)):
        raise ApiError(404, "not_found", "Profile was not found.")
    page = [m.decode() for m in members[:limit]]
    pipe = client.pipeline(transaction=False)
    for pid in page:
        pipe.hget(keys.profile(pid), f"g:{group_id}")
    joined = dict(zip(page, await pipe.execute(), strict=True))
    more = len(members) > limit
    cursor = _cursor(request, f"group_id:{group_id}", more, page[-1] if more else "")
    return {"data": _linked(page, "users", "segment_id", joined), "cursor": cursor}


Body = Callable[[Request, Profile], Coroutine[Any, Any, dict]]
USER_PARTS: dict[str, Body] = {"traits": traits_body, "external_ids": external_ids_body,
                               "metadata": metadata_body, "links": links_body, "events": events_body}
ACCOUNT_PARTS = {"traits": account_traits, "links": account_links}


def _second() -> int:
    return int(time.time())


def token_key(token: str, second: int) -> str:
    """The rate limiter's key for a token and second: a digest, so the token itself is never written to Redis."""
    return profile_api_rate(hashlib.sha256(token.encode()).hexdigest()[:16], second)


async def over_limit(request: Request, token: str) -> int:
    """Seconds to wait when the token went over ``PROFILE_API_RATE_LIMIT`` requests in this second, else 0.

    A counter per token and second in Redis, so every web process shares the one limit (a fixed window: at
    most twice the rate across a second's boundary, which is what Segment's "100 requests/sec" promises)."""
    limit = request.app.state.settings.profile_api_rate_limit
    if limit <= 0:
        return 0
    key = token_key(token, _second())
    pipe = request.app.state.redis.pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, 2)
    count, _ = await pipe.execute()
    return 1 if count > limit else 0


async def profile_endpoint(request: Request) -> Response:
    state = request.app.state
    token = auth.basic_username(request.headers.get("authorization"))
    if not auth.token_ok(token, state.settings.profile_api_token):
        if not state.settings.profile_api_token:  # no token can be right: say so, not "send the right one"
            return error(401, "authentication_error", "the Profile API is off: start the web with "
                         "PROFILE_API_TOKEN=<a long random secret> to turn it on, then send it as the HTTP Basic "
                         "username (empty password)")
        return error(401, "authentication_error",
                     "send the PROFILE_API_TOKEN as the HTTP Basic username (empty password)")
    collection = request.path_params["collection"]
    try:
        ident, part = split_path(request)
        parts: dict = USER_PARTS if collection == "users" else ACCOUNT_PARTS if collection == "accounts" else {}
        if part not in parts or not valid_space(request.path_params["space"]):
            return error(404, "not_found", f"unknown Profile API path; a {collection} profile has "
                                           f"{', '.join(sorted(parts)) or 'no parts (use users or accounts)'}")
        assert token is not None
        if wait := await over_limit(request, token):
            return error(429, "rate_limit_error", "Too many requests hit the API too quickly; retry after "
                         f"{wait} s (PROFILE_API_RATE_LIMIT requests per second per token)",
                         {"Retry-After": str(wait)})
        if collection == "accounts":
            kind, _, group_id = ident.partition(":")
            if kind != "group_id" or not group_id:
                raise ApiError(400, "invalid_request_error", "an account is named group_id:<groupId>")
            return JSON(await parts[part](request, group_id))
        return JSON(await parts[part](request, await find_profile(request, ident)))
    except ApiError as exc:
        return error(exc.status, exc.code, exc.message)
    except REDIS_DOWN as exc:
        return unavailable(exc)


routes = [Route(PREFIX + "{rest:path}", profile_endpoint, methods=["GET"])]
