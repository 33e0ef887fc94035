"""Thin RQ entry points. Each reads settings and the STATE Redis from the environment, as the worker gets them."""

from __future__ import annotations

import logging
import os

import redis
from rq import Queue

from service.config import Settings
from service.keys import SPACES_KEY
from service.logs import event as log_event
from workers import recompute

log = logging.getLogger("jobs")
QUEUE = "persona-sync"


def _state() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


def _queue() -> Queue:
    url = os.environ.get("QUEUE_REDIS_URL") or os.environ["REDIS_URL"]
    return Queue(QUEUE, connection=redis.Redis.from_url(url))


def _spaces(client: redis.Redis) -> list[str]:
    return sorted(s.decode() for s in client.smembers(SPACES_KEY))


def refresh(space: str) -> dict:
    """Debounced refresh of the dirty profiles; enqueues a sync when a cluster summary changed."""
    settings = Settings.from_env()
    client = _state()
    report = recompute.refresh(client, settings, space)
    log_event(log, "refresh", space=space, profiles=report["profiles"], changed=len(report["changed_clusters"]),
              seconds=report["seconds"])
    if report["changed_clusters"] or report["profiles"]:
        _queue().enqueue(sync, space, description=f"sync personas of {space}")
    return report


def full_recompute() -> list[dict]:
    """Scheduled by `rq cron`: rebuild every space's aggregates, then sync."""
    settings = Settings.from_env()
    client = _state()
    reports = []
    for space in _spaces(client):
        report = recompute.full_recompute(client, settings, space)
        log_event(log, "full recompute", space=space, profiles=report["profiles"], seconds=report["seconds"])
        reports.append(report)
        _queue().enqueue(sync, space, description=f"sync personas of {space}")
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
    for name, step in (("personas", sync_space), ("narrative", narrate_space)):
        try:
            out[name] = step(client, settings, space, mavera)
        except Exception as exc:  # noqa: BLE001 - reported below, after the other step ran
            errors.append(f"{name}: {exc}")
    if mavera:
        mavera.close()
    if errors:
        raise RuntimeError("; ".join(errors))
    return out
