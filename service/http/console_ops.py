"""The console's Operations page: dead letters (filter, show, replay one, delete), failed jobs (requeue), and the
replays and full recomputes waiting or running, with their progress.

Every action is a POST through ``webui.console`` (session and CSRF token), then a redirect back to the page
(post/redirect/get), which says what was done. Replays run as jobs, exactly as ``POST /admin/replay`` queues them.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

from rq.job import Job
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from service.http.admin import (
    Refused,
    dead_letter_view,
    drop_dead_letter,
    queue_replay,
    read_dead_letter,
    valid_entry_id,
    valid_job_id,
)
from service.http.webui import HEADERS, PREFIX, Ctx, PageError, console, href, known_spaces
from service.spec.clock import now_ms, point_in_time
from service.spec.keys import Keys
from service.state import jobs
from service.state.replay import AUTHENTICATED_SOURCES

PAGE = 50  # dead letters a page shows
EXAMINE = 1000  # entries one page reads at most while filtering; then it offers the next page
OPS = PREFIX + "/operations"
DONE = {
    "replay-queued": "Replay of dead letter {entry} queued as job {job}. It runs on a worker; follow it below.",
    "deleted": "Dead letter {entry} deleted: it will never be applied.",
    "requeued": "Job {job} queued again.",
    "requeued-all": "{count} failed job(s) queued again.",
}


def _ms(dt: datetime | None) -> int | None:
    return int(dt.timestamp() * 1000) if dt else None


def job_row(job: Job) -> dict[str, Any]:
    """A job as the page shows it (read in a thread: RQ is blocking)."""
    status = jobs.status_of(job)
    result = job.return_value(refresh=False) if status == "finished" else None
    return {"id": job.id, "function": (job.func_name or "?").rsplit(".", 1)[-1], "status": status,
            "space": job.args[0] if job.args and isinstance(job.args[0], str) else None,
            "description": job.description, "enqueued_ms": _ms(job.enqueued_at), "started_ms": _ms(job.started_at),
            "ended_ms": _ms(job.ended_at), "progress": jobs.progress(job),
            "outcomes": result.get("outcomes") if isinstance(result, dict) else None,
            "error": jobs.last_error(job) if status == "failed" else None}


def _filters(ctx: Ctx) -> dict[str, Any]:
    """``reason`` (substring), ``source``, ``since`` / ``until`` (ISO 8601 or a time ago: 2h), ``before`` (paging)."""
    q, now = ctx.request.query_params, now_ms()
    out: dict[str, Any] = {"reason": (q.get("reason") or "").strip()[:200], "source": q.get("source") or "",
                           "since": (q.get("since") or "").strip(), "until": (q.get("until") or "").strip(),
                           "before": q.get("before") or ""}
    if out["source"] and out["source"] not in AUTHENTICATED_SOURCES:
        raise PageError(400, "Unknown source", f"source is one of {', '.join(sorted(AUTHENTICATED_SOURCES))}.")
    for name in ("since", "until"):
        out[name + "_ms"] = point_in_time(out[name], now) if out[name] else None
        if out[name] and out[name + "_ms"] is None:
            raise PageError(400, f"Bad {name}", f"{name}: an ISO 8601 time (2026-03-15T10:00:00Z) or a time ago "
                                                "(90m, 2h, 7d).")
    if out["before"] and not valid_entry_id(out["before"]):
        raise PageError(400, "Bad page", "before: a dead letter id such as 1700000000000-0.")
    return out


async def dead_letter_page(client: Any, space: str, f: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first, filtered; at most PAGE shown and EXAMINE read. Times map onto entry ids (ms), so a time
    window costs what it holds. Returns the page and where the next one starts (None: no more)."""
    hi = f"({f['before']}" if f["before"] else (str(f["until_ms"]) if f["until_ms"] is not None else "+")
    lo = str(f["since_ms"]) if f["since_ms"] is not None else "-"
    found: list[dict[str, Any]] = []
    examined, last = 0, None
    while examined < EXAMINE:
        rows = await client.xrevrange(Keys(space).dead_letters, max=hi, min=lo, count=100)
        for entry_id, fields in rows:
            examined, last = examined + 1, entry_id.decode()
            view = dead_letter_view(last, {k.decode(): v for k, v in fields.items()})
            if f["reason"] and f["reason"].lower() not in view["reason"].lower():
                continue
            if f["source"] and view["source"] != f["source"]:
                continue
            view["bytes"] = len(fields.get(b"raw", b""))
            view["raw"] = view["raw"][:160]
            found.append(view)
            if len(found) == PAGE:
                return found, last
        if len(rows) < 100:
            return found, None
        hi = f"({last}"
    return found, last


def _message(ctx: Ctx) -> str | None:
    q = ctx.request.query_params
    template = DONE.get(q.get("done") or "")
    if template is None:
        return None
    entry, job, count = q.get("entry") or "", q.get("job") or "", q.get("count") or "0"
    if (entry and not valid_entry_id(entry)) or (job and not valid_job_id(job)) or not count.isdigit():
        return None
    return template.format(entry=entry, job=job, count=count)


STALLED_AFTER_MS = 60_000  # a running rebuild whose record has not moved for this long was stopped


@console
async def operations(ctx: Ctx) -> Response:
    f = _filters(ctx)
    client, state = ctx.state.redis, ctx.state
    letters, next_before = await dead_letter_page(client, ctx.space, f)
    total = await client.xlen(Keys(ctx.space).dead_letters)
    failed: list[dict[str, Any]] | None = None
    watched: list[dict[str, Any]] | None = None
    if state.refresh.queue_url:
        queue = state.refresh.queue()
        failed, watched = await asyncio.to_thread(
            lambda: ([job_row(j) for j in jobs.failed(queue)], [job_row(j) for j in jobs.watched(queue)]))
    query = {k: f[k] for k in ("reason", "source", "since", "until")}
    rebuild = {k.decode(): v.decode() for k, v in (await client.hgetall(Keys(ctx.space).rebuild_status)).items()}
    return ctx.render("operations.html", page="operations", filters=f, letters=letters, total=total, rebuild=rebuild,
                      stalled_after_ms=STALLED_AFTER_MS,
                      next_href=href(OPS, space=ctx.space, before=next_before, **query) if next_before else None,
                      failed=failed, watched=watched, message=_message(ctx), sources=sorted(AUTHENTICATED_SOURCES),
                      spaces=await known_spaces(ctx))


def _entry(ctx: Ctx) -> str:
    entry_id = ctx.request.path_params["entry_id"]
    if not valid_entry_id(entry_id):
        raise PageError(400, "Bad dead letter id", "A dead letter id looks like 1700000000000-0.")
    return str(entry_id)


@console
async def dead_letter(ctx: Ctx) -> Response:
    entry_id = _entry(ctx)
    letter = await read_dead_letter(ctx.state.redis, ctx.space, entry_id)
    if letter is None:
        raise PageError(404, "No such dead letter", f"There is no dead letter {entry_id} in space {ctx.space} "
                                                    "(replayed or deleted already?).")
    try:
        body = json.dumps(json.loads(letter["raw"]), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to lay out: shown as it came
        body = letter["raw"]
    return ctx.render("dead_letter.html", page="operations", letter=letter, body=body,
                      replayable=letter["source"] in AUTHENTICATED_SOURCES, spaces=await known_spaces(ctx))


def back(ctx: Ctx, **params: Any) -> Response:
    return RedirectResponse(href(OPS, space=ctx.space, **params), 303, headers=HEADERS)


@console
async def replay_one(ctx: Ctx) -> Response:
    entry_id = _entry(ctx)
    try:
        job_id = await queue_replay(ctx.state, ctx.space, {"source": "dead-letters", "id": entry_id})
    except Refused as exc:
        raise PageError(exc.status, "Replay not queued", exc.message) from None
    return back(ctx, done="replay-queued", entry=entry_id, job=job_id)


@console
async def delete_one(ctx: Ctx) -> Response:
    entry_id = _entry(ctx)
    if await drop_dead_letter(ctx.state.redis, ctx.space, entry_id) is None:
        raise PageError(404, "No such dead letter", f"There is no dead letter {entry_id} in space {ctx.space}.")
    return back(ctx, done="deleted", entry=entry_id)


def _queue(ctx: Ctx) -> Any:
    if not ctx.state.refresh.queue_url:
        raise PageError(503, "No job queue", "No job queue is configured for this web process (QUEUE_REDIS_URL).")
    return ctx.state.refresh.queue()


@console
async def requeue_one(ctx: Ctx) -> Response:
    job_id = ctx.request.path_params["job_id"]
    if not valid_job_id(job_id):
        raise PageError(400, "Bad job id", "A job id is letters, digits and '-'.")
    queue = _queue(ctx)
    done, _ = await asyncio.to_thread(jobs.requeue, queue, {job_id})
    if not done:
        raise PageError(404, "Not a failed job", f"Job {job_id} has not failed (or has expired).")
    return back(ctx, done="requeued", job=job_id)


@console
async def requeue_all(ctx: Ctx) -> Response:
    queue = _queue(ctx)
    done, _ = await asyncio.to_thread(lambda: jobs.requeue(queue, set(queue.failed_job_registry.get_job_ids())))
    return back(ctx, done="requeued-all", count=len(done))


routes = [
    Route(OPS, operations, methods=["GET"]),
    Route(OPS + "/dead-letters/{entry_id}", dead_letter, methods=["GET"]),
    Route(OPS + "/dead-letters/{entry_id}/replay", replay_one, methods=["POST"]),
    Route(OPS + "/dead-letters/{entry_id}/delete", delete_one, methods=["POST"]),
    Route(OPS + "/jobs/{job_id}/requeue", requeue_one, methods=["POST"]),
    Route(OPS + "/jobs/requeue", requeue_all, methods=["POST"]),
]
