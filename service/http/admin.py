"""Operator routes (Bearer ``ADMIN_TOKEN``): what was refused, replays and jobs, and the state of a space.

``/admin/dead-letters`` holds what passed authentication but could not be applied (replayable);
``/admin/refusals`` what was refused before authentication: metadata only, never a body, never replayable."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.config import SPACE_ID_RULE, valid_space
from service.http import auth
from service.http.intake import read_body
from service.http.responses import JSON, error, unavailable
from service.spec.bodies import BodyError
from service.spec.clock import now_ms, point_in_time
from service.spec.events import TYPES
from service.spec.keys import REFUSALS_KEY, SPACES_KEY, Keys, valid_entry_id, valid_stream_bound
from service.state import jobs, ops
from service.state.queue import REPLAY_JOB
from service.state.replay import cancel_key, resolve
from service.state.status import collect_async
from service.state.store import DLQ_DELETE, REDIS_DOWN


def admin_denied(request: Request) -> Response | None:
    """None when the request carries the admin token; else the 401 to send."""
    token = auth.bearer_token(request.headers.get("authorization"))
    if auth.token_ok(token, request.app.state.settings.admin_token):
        return None
    if not request.app.state.settings.admin_token:  # no token can be right: say so, not "send the right one"
        return error(401, "authentication_error", "the admin API is off: start the web with ADMIN_TOKEN=<a long "
                     "random secret> to turn it on, then send it as a Bearer token")
    return error(401, "authentication_error", "send ADMIN_TOKEN as a Bearer token")


def _space(request: Request) -> str:
    return request.query_params.get("space") or request.app.state.settings.space_id


def space_param(request: Request) -> str | Response:
    """``?space=`` (default SPACE_ID), or the 400 to send for a malformed one."""
    space = _space(request)
    if not valid_space(space):
        return error(400, "validation_error", f"space must be {SPACE_ID_RULE}")
    return space


def admin_endpoint(handler: Callable[[Request, str], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Admin token, ``?space=`` and the 503 for an unreachable Redis, once for every operator route."""

    async def endpoint(request: Request) -> Response:
        if denied := admin_denied(request):
            return denied
        space = space_param(request)
        if isinstance(space, Response):
            return space
        try:
            return await handler(request, space)
        except REDIS_DOWN as exc:
            return unavailable(exc)

    return endpoint


def _page(request: Request) -> tuple[int, str] | Response:
    """``?limit=`` (1-1000, default 50) and ``?before=<entry id>``, or the 400 to send. ASCII digits only: ``'²'``
    passes ``str.isdigit`` but not ``int``, and Redis refuses an entry id in other scripts' digits."""
    raw_limit = request.query_params.get("limit", "50")
    before = request.query_params.get("before") or "+"
    if not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 4) or not 1 <= int(raw_limit) <= 1000:
        return error(400, "validation_error", "limit must be a number from 1 to 1000")
    if before != "+" and not _entry_id(before):
        return error(400, "validation_error", "before must be an entry id such as 1700000000000-0")
    return int(raw_limit), before


def _entry_id(text: str) -> bool:
    """A stream range's bound ('ms-seq', or 'ms'; '(' before it for an exclusive one) that Redis takes."""
    return valid_stream_bound(text[1:] if text.startswith("(") else text)


async def _stream_page(request: Request, key: str, item: Callable[[str, dict[str, bytes]], dict],
                       extra: dict | None = None) -> Response:
    """One page of a stream, newest first (``?limit=``, ``?before=``), each entry shaped by ``item``."""
    page = _page(request)
    if isinstance(page, Response):
        return page
    limit, before = page
    try:
        client = request.app.state.redis
        rows = await client.xrevrange(key, max=before, min="-", count=limit + 1)
        total = await client.xlen(key)
    except REDIS_DOWN as exc:
        return unavailable(exc)
    more = len(rows) > limit
    return JSON({**(extra or {}), "total": total,
                 "data": [item(entry_id.decode(), {k.decode(): v for k, v in fields.items()})
                          for entry_id, fields in rows[:limit]],
                 "has_more": more, "next_before": rows[limit][0].decode() if more else None})


def _text(f: dict[str, bytes], name: str) -> str:
    return f.get(name, b"").decode(errors="replace")


def _number(f: dict[str, bytes], name: str) -> int:
    value = f.get(name, b"0")
    return int(value) if value.isdigit() else 0


async def dead_letters(request: Request) -> Response:
    """Newest first; ``?space=``, ``?limit=`` (1-1000), ``?before=<entry id>`` to page back."""
    if denied := admin_denied(request):
        return denied
    space = space_param(request)
    if isinstance(space, Response):
        return space
    return await _stream_page(request, Keys(space).dead_letters, dead_letter_view, {"space": space})


async def refusals(request: Request) -> Response:
    """Requests refused before authentication, newest first, every space: time, space claimed, route, status,
    reason, size and peer address. Never a body; nothing here can be replayed. ``?limit=``, ``?before=``."""
    if denied := admin_denied(request):
        return denied
    return await _stream_page(request, REFUSALS_KEY, lambda entry_id, f: {
        "id": entry_id, "at": _number(f, "at"), "space": _text(f, "space"), "route": _text(f, "route"),
        "status": _number(f, "status"), "reason": _text(f, "reason"), "bytes": _number(f, "bytes"),
        "addr": _text(f, "addr")})


async def status(request: Request) -> Response:
    """Every space (``?space=`` for one), the queue, Mavera and Redis, and the problems with what to run next."""
    if denied := admin_denied(request):
        return denied
    only = space_param(request) if request.query_params.get("space") else None
    if isinstance(only, Response):
        return only
    state = request.app.state
    queue = state.refresh.queue().connection if state.refresh.queue_url else None
    try:
        if only and not await state.redis.sismember(SPACES_KEY, only):  # all zeros would look like a quiet space
            return error(404, "not_found", f"no space {only!r} has any data (GET /admin/status lists them all)")
        return JSON(await collect_async(state.redis, queue, state.settings, only))
    except REDIS_DOWN as exc:
        return unavailable(exc)


def dead_letter_view(entry_id: str, f: dict[str, bytes]) -> dict[str, Any]:
    """A dead letter as the operator routes and the console show it."""
    return {"id": entry_id, "reason": _text(f, "reason"), "source": _text(f, "source"), "at": _number(f, "at"),
            "raw": _text(f, "raw")}


async def read_dead_letter(client: Any, space: str, entry_id: str) -> dict[str, Any] | None:
    """One dead letter (``entry_id`` already valid), or None."""
    rows = await client.xrange(Keys(space).dead_letters, min=entry_id, max=entry_id)
    if not rows:
        return None
    return dead_letter_view(entry_id, {k.decode(): v for k, v in rows[0][1].items()})


async def drop_dead_letter(client: Any, space: str, entry_id: str) -> int | None:
    """Delete one dead letter, keeping the byte count right: the bytes freed, or None if there was none."""
    keys = Keys(space)
    if not await client.xrange(keys.dead_letters, min=entry_id, max=entry_id):
        return None
    return int(await client.register_script(DLQ_DELETE)(keys=[keys.dead_letters, keys.dead_letter_bytes],
                                                         args=[entry_id]))


@admin_endpoint
async def dead_letter(request: Request, space: str) -> Response:
    """``GET``: one dead letter, its body whole; ``DELETE``: drop it (it is never applied)."""
    entry_id = request.path_params["entry_id"]
    if not valid_entry_id(entry_id):
        return error(400, "validation_error", "the id is an entry id such as 1700000000000-0")
    client = request.app.state.redis
    if request.method == "DELETE":
        freed = await drop_dead_letter(client, space, entry_id)
        if freed is None:
            return error(404, "not_found", f"no dead letter {entry_id} in space {space}")
        return JSON({"deleted": entry_id, "bytes_freed": freed})
    letter = await read_dead_letter(client, space, entry_id)
    if letter is None:
        return error(404, "not_found", f"no dead letter {entry_id} in space {space}")
    return JSON({"id": entry_id, "space": space, **letter})


async def json_body(request: Request, limit: int) -> Any:
    """An operator request's JSON body (an empty body is ``{}``), read within ``limit``, or the 4xx to send."""
    try:
        body = await read_body(request, limit)
        return orjson.loads(body) if body.strip() else {}
    except BodyError as exc:
        return error(exc.status, "validation_error", exc.message)
    except orjson.JSONDecodeError as exc:
        return error(400, "validation_error", f"malformed JSON: {exc}")


REPLAY_FIELDS = {"source", "since", "until", "profile", "types", "event", "reason", "id", "dry_run", "rate",
                 "resume"}


def replay_spec(doc: Any, now: int) -> dict[str, Any] | str:
    """The validated replay request, or what is wrong with it."""
    if not isinstance(doc, dict):
        return "send a JSON object, e.g. {\"source\": \"log\", \"since\": \"2h\"}"
    unknown = set(doc) - REPLAY_FIELDS
    if unknown:
        return f"unknown fields {sorted(unknown)}; allowed: {sorted(REPLAY_FIELDS)}"
    spec: dict[str, Any] = {"source": doc.get("source", "log")}
    if spec["source"] not in ("log", "dead-letters", "archive"):
        return "source is 'log', 'dead-letters' or 'archive' (files are loaded with `persona-sync import` on a host)"
    for name in ("since", "until"):
        if doc.get(name) is not None:
            when = point_in_time(doc[name], now)
            if when is None:
                return f"{name}: an ISO-8601 time or a time ago such as 90m, 2h or 7d"
            spec[name], spec[f"{name}_ms"] = doc[name], when
    for name in ("profile", "event", "reason"):
        if doc.get(name) is not None:
            if not isinstance(doc[name], str) or not doc[name] or len(doc[name]) > 500:
                return f"{name}: a non-empty string"
            spec[name] = doc[name]
    if doc.get("id") is not None:
        if spec["source"] != "dead-letters" or not isinstance(doc["id"], str) or not valid_entry_id(doc["id"]):
            return "id: one dead letter's id such as 1700000000000-0, with source 'dead-letters'"
        spec["id"] = doc["id"]
    if spec["source"] == "dead-letters":  # an option of the other source would be ignored: a far larger replay
        given = [name for name in ("since", "until", "profile", "types", "event") if doc.get(name) is not None]
        if given:
            return (f"{', '.join(given)} select(s) log or archive events, not dead letters: drop it, or use source "
                    "'log' (dead letters are chosen by reason or id)")
    elif "reason" in spec:
        return "reason selects dead letters: use source 'dead-letters', or drop reason"
    if "since_ms" in spec and "until_ms" in spec and spec["since_ms"] > spec["until_ms"]:
        return f"since ({spec['since']}) is after until ({spec['until']}): nothing lies between them"
    if "profile" in spec and ":" not in spec["profile"]:
        return "profile: TYPE:VALUE, e.g. email:ada@example.com"
    if "profile" in spec and spec["source"] == "archive":
        return "profile works on the log only (archived events carry no profile id); use types or event"
    if doc.get("types") is not None:
        if not isinstance(doc["types"], list) or not all(isinstance(t, str) for t in doc["types"]):
            return "types: a list of call types, e.g. [\"identify\", \"track\"]"
        not_types = sorted({t for t in doc["types"] if t.lower() not in TYPES})
        if not_types:
            return f"types: {not_types[0][:40]!r} is not a call type; one of {', '.join(sorted(TYPES))}"
        spec["types"] = sorted({t.lower() for t in doc["types"]})
    if doc.get("rate") is not None:
        if isinstance(doc["rate"], bool) or not isinstance(doc["rate"], int | float) or not 0 <= doc["rate"] <= 1e6:
            return "rate: events per second, 0 (no limit) to 1000000"
        spec["rate"] = float(doc["rate"])
    for name in ("dry_run", "resume"):
        if doc.get(name) is not None:
            if not isinstance(doc[name], bool):
                return f"{name}: true or false"
            spec[name] = doc[name]
    return spec


@admin_endpoint
async def replay(request: Request, space: str) -> Response:
    """Queue a replay of the log or the dead letters as an RQ job; 202 with where to follow it."""
    doc = await json_body(request, 64 * 1024)
    if isinstance(doc, Response):
        return doc
    spec = replay_spec(doc, now_ms())
    if isinstance(spec, str):
        return error(400, "validation_error", spec)
    if spec["source"] == "archive" and not request.app.state.settings.event_archive_dir:
        return error(400, "validation_error", "EVENT_ARCHIVE_DIR is not set: there is no archive to replay")
    try:
        job_id = await queue_replay(request.app.state, space, spec)
    except Refused as exc:
        return error(exc.status, exc.code, exc.message)
    return JSON({"job": job_id, "status": "queued", "space": space, "request": spec,
                 "follow": f"/admin/jobs/{job_id}"}, 202)


REPLAY_TIMEOUT = 24 * 3600


class Refused(Exception):
    """An operator action that cannot go ahead: the status and message to answer with."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


async def queue_replay(state: Any, space: str, spec: dict[str, Any]) -> str:
    """Queue a validated replay request as a job (the admin route and the console); its id. Raises ``Refused``."""
    if "profile" in spec:  # resolved as the receiver normalised it; an identifier of nobody is a 404, not a no-op
        _, _, pid = await asyncio.to_thread(lambda: resolve(state.sync_redis(), state.rules, space, spec["profile"]))
        if pid is None:
            raise Refused(404, "not_found", f"no profile has {spec['profile']} in space {space}")
        # the job (kept a week, shown by GET /admin/jobs/{id}) names the profile by its id, not by an email
        spec = {**spec, "profile": f"segment_id:{pid}"}
    if "id" in spec and await read_dead_letter(state.redis, space, spec["id"]) is None:
        raise Refused(404, "not_found", f"no dead letter {spec['id']} in space {space}")
    if not state.refresh.queue_url:
        raise Refused(503, "unavailable", "no job queue is configured for this web process (QUEUE_REDIS_URL)")
    queue = state.refresh.queue()
    job = await asyncio.to_thread(queue.enqueue, REPLAY_JOB, space, spec, job_timeout=REPLAY_TIMEOUT,
                                  result_ttl=7 * 86400, failure_ttl=7 * 86400,
                                  description=f"replay {spec['source']} of {space}")
    return str(job.id)


@admin_endpoint
async def forget(request: Request, space: str) -> Response:
    """GDPR by any identifier: ``{"id": "email:ada@example.com"}`` (a bare value is a userId), exactly as
    ``persona-sync forget``; 404 when it resolves to nobody."""
    doc = await json_body(request, 16 * 1024)
    if isinstance(doc, Response):
        return doc
    if isinstance(doc, dict) and set(doc) - {"id"}:  # e.g. a "space": the space is ?space=, and erasing in another
        return error(400, "validation_error",  # one than the sender meant cannot be undone
                     f"unknown fields {sorted(set(doc) - {'id'})}: send only {{\"id\": \"TYPE:VALUE\"}}; the space "
                     "is the ?space= query parameter")
    ident = doc.get("id") if isinstance(doc, dict) else None
    if not isinstance(ident, str) or not ident.strip() or len(ident) > 1000:
        return error(400, "validation_error", 'send {"id": "TYPE:VALUE"}, e.g. {"id": "email:ada@example.com"}')
    state = request.app.state
    try:
        outcome, user_id = await asyncio.to_thread(lambda: ops.forget(state.sync_redis(), state.settings, space,
                                                                      ident, not state.refresh.queue_url))
    except ops.NotFound as exc:
        return error(404, "not_found", f"{exc}: nothing was erased")
    except ops.NotAnIdentifier as exc:
        return error(400, "validation_error", str(exc))
    if state.refresh.queue_url:  # scanning the log and the archive is a job's work, not a request's
        await state.refresh.purge(space)
    await state.refresh.touch(space)  # the erased profile leaves its cluster at the next refresh
    return JSON({"space": space, "id": ident, "erased_profile": outcome.profile_id or None,
                 "suppressed_user_id": user_id,
                 "events_purge": "queued" if state.refresh.queue_url else "done"})


@admin_endpoint
async def suppression_list(request: Request, space: str) -> Response:
    rows = await asyncio.to_thread(lambda: ops.suppressions(request.app.state.sync_redis(), space))
    return JSON({"space": space, "total": len(rows), "data": rows})


@admin_endpoint
async def suppression_lift(request: Request, space: str) -> Response:
    user_id = request.path_params["user_id"]
    try:
        lifted = await asyncio.to_thread(lambda: ops.lift_suppression(request.app.state.sync_redis(), space, user_id))
    except ops.NotAnIdentifier as exc:
        return error(400, "validation_error", str(exc))
    if not lifted:
        return error(404, "not_found", f"{user_id} is not suppressed in space {space}")
    return JSON({"space": space, "lifted": user_id})


def job_view(job: Job) -> dict[str, Any]:
    status = job.get_status(refresh=False)

    def iso(dt: Any) -> str | None:
        return dt.isoformat() if dt else None
    return {"id": job.id, "function": job.func_name, "args": list(job.args), "status": jobs.status_of(job),
            "enqueued_at": iso(job.enqueued_at), "started_at": iso(job.started_at), "ended_at": iso(job.ended_at),
            "progress": {k: v for k, v in jobs.progress(job).items() if k != "profiles"},
            "result": job.return_value(refresh=False) if status == JobStatus.FINISHED else None,
            "error": jobs.last_error(job) if status == JobStatus.FAILED else None}


async def job(request: Request) -> Response:
    """``GET``: a job's state, progress and result; ``DELETE``: cancel it (a running replay stops at its next
    chunk and can be resumed)."""
    if denied := admin_denied(request):
        return denied
    job_id = request.path_params["job_id"]
    if not valid_job_id(job_id):
        return error(400, "validation_error", "a job id is letters, digits and '-'")
    if not request.app.state.refresh.queue_url:
        return error(503, "unavailable", "no job queue is configured for this web process (QUEUE_REDIS_URL)")
    queue = request.app.state.refresh.queue()

    def act() -> dict[str, Any] | None:
        try:
            found = Job.fetch(job_id, connection=queue.connection)
        except NoSuchJobError:
            return None
        if request.method != "DELETE":
            return job_view(found)
        status = found.get_status()
        if status in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
            found.cancel()
            cancel = "done"
        elif status == JobStatus.STARTED:
            queue.connection.set(cancel_key(job_id), "1", ex=REPLAY_TIMEOUT)
            cancel = "requested"  # a replay stops at its next chunk
        else:  # finished, failed, stopped or canceled already: nothing to cancel, and the answer says so
            cancel = f"nothing to cancel: the job is {jobs.status_of(found)}"
        found.refresh()
        return job_view(found) | {"cancel": cancel}

    try:
        view = await asyncio.to_thread(act)
    except REDIS_DOWN as exc:
        return unavailable(exc)
    if view is None:
        return error(404, "not_found", f"no job {job_id} (finished jobs are kept 7 days)")
    return JSON(view)


_JOB_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")


def valid_job_id(job_id: str) -> bool:
    return bool(_JOB_ID.match(job_id))


routes = [
    Route("/admin/forget", forget, methods=["POST"]),
    Route("/admin/suppressions", suppression_list, methods=["GET"]),
    # :path, as a userId may hold a '/' (sent as %2F, which the router sees decoded)
    Route("/admin/suppressions/{user_id:path}", suppression_lift, methods=["DELETE"]),
    Route("/admin/replay", replay, methods=["POST"]),
    Route("/admin/jobs/{job_id}", job, methods=["GET", "DELETE"]),
    Route("/admin/dead-letters/{entry_id}", dead_letter, methods=["GET", "DELETE"]),
    Route("/admin/dead-letters", dead_letters, methods=["GET"]),
    Route("/admin/refusals", refusals, methods=["GET"]),
    Route("/admin/status", status, methods=["GET"]),
]
