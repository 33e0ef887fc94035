"""Thin RQ entry points. Each reads settings and the STATE Redis from the environment, as the worker gets them."""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import redis
from rq import Queue, get_current_job

from service.config import Settings
from service.keys import SPACES_KEY
from service.logs import event as log_event
from service.refresh import sync_timeout
from workers import recompute

log = logging.getLogger("jobs")
QUEUE = "persona-sync"
BUSY_RETRY = 30  # seconds before a refresh that found the space locked tries again


def _state() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


def _queue() -> Queue:
    url = os.environ.get("QUEUE_REDIS_URL") or os.environ["REDIS_URL"]
    return Queue(QUEUE, connection=redis.Redis.from_url(url))


def _spaces(client: redis.Redis) -> list[str]:
    return sorted(s.decode() for s in client.smembers(SPACES_KEY))


def _enqueue_sync(settings: Settings, space: str) -> None:
    _queue().enqueue(sync, space, job_timeout=sync_timeout(settings.mave_chat_timeout),
                     description=f"sync personas of {space}")


def refresh(space: str) -> dict:
    """Debounced refresh of the dirty profiles; enqueues a sync when a cluster summary changed.

    If another recompute holds the space's lock past the wait (a full recompute of a large space), this refresh
    steps aside and comes back in ``BUSY_RETRY`` seconds: the dirty marks stay until a refresh reads them."""
    settings = Settings.from_env()
    client = _state()
    try:
        report = recompute.refresh(client, settings, space)
    except recompute.Busy as exc:
        log_event(log, "refresh postponed", space=space, reason=str(exc), retry_in=BUSY_RETRY)
        _queue().enqueue_in(timedelta(seconds=BUSY_RETRY), refresh, space,
                            description=f"refresh dirty profiles of {space}")
        return {"space": space, "postponed": str(exc)}
    log_event(log, "refresh", space=space, profiles=report["profiles"], changed=len(report["changed_clusters"]),
              seconds=report["seconds"])
    if report["changed_clusters"] or report["profiles"]:
        _enqueue_sync(settings, space)
    return report


def full_recompute() -> list[dict]:
    """Scheduled by `rq cron`: rebuild every space's aggregates, then sync. A space that another recompute holds is
    skipped (the others still run)."""
    settings = Settings.from_env()
    client = _state()
    reports = []
    for space in _spaces(client):
        try:
            report = recompute.full_recompute(client, settings, space)
        except recompute.Busy as exc:
            log_event(log, "full recompute skipped", logging.WARNING, space=space, reason=str(exc))
            reports.append({"space": space, "skipped": str(exc)})
            continue
        log_event(log, "full recompute", space=space, profiles=report["profiles"], seconds=report["seconds"])
        reports.append(report)
        _enqueue_sync(settings, space)
    return reports


def sync(space: str) -> dict:
    """Push changed cluster personas to Mavera (or the outbox) and refresh the channel narrative.

    Both always run; if either failed, the job fails afterwards with both reasons, so RQ keeps it for requeue."""
    from workers.mavera import MaveraClient
    from workers.sync import narrate_space, sync_space

    settings = Settings.from_env()
    client = _state()
    mavera = MaveraClient(settings, client) if settings.mavera_api_key else None
    out: dict = {}
    errors = []
    job = get_current_job()
    steps = (("personas", lambda *a: sync_space(*a, job_id=job.id if job else None)), ("narrative", narrate_space))
    for name, step in steps:
        try:
            out[name] = step(client, settings, space, mavera)
        except Exception as exc:  # noqa: BLE001 - reported below, after the other step ran
            errors.append(f"{name}: {exc}")
    if mavera:
        mavera.close()
    if errors:
        raise RuntimeError("; ".join(errors))
    return out
