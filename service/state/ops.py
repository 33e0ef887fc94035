"""Operator actions on STATE that need no HTTP: status, GDPR forget and the purge of forgotten log entries."""

from __future__ import annotations

import orjson
import redis

from service.config import Settings, state_url
from service.spec.clock import now_ms
from service.spec.events import normalise
from service.spec.identity import IdentityRules
from service.spec.keys import MAVERA_PAUSED_KEY, Keys
from service.state.status import queue_status, spaces, status_row
from service.state.store import Outcome, SyncStore, delete_dead_letters, encode_raw


def paused(client: redis.Redis) -> dict | None:
    """Why Mavera syncing is paused (a 402: credits exhausted), or None."""
    raw = client.get(MAVERA_PAUSED_KEY)
    return orjson.loads(raw) if raw else None


def pause(client: redis.Redis, reason: str) -> None:
    client.set(MAVERA_PAUSED_KEY, orjson.dumps({"reason": reason, "at_ms": now_ms()}))


def resume(client: redis.Redis) -> bool:
    """``persona-sync resume``: clear the pause. True when there was one."""
    return bool(client.delete(MAVERA_PAUSED_KEY))


def space_status(client: redis.Redis, only: str | None = None) -> list[dict]:
    rows = []
    for space in [only] if only else spaces(client):
        pipe = client.pipeline(transaction=False)
        queue_status(pipe, Keys(space))
        rows.append(status_row(space, pipe.execute()))
    why = client.get(MAVERA_PAUSED_KEY)
    if why:
        rows.append({"mavera": "PAUSED", "detail": why.decode(), "fix": "top up credits, then persona-sync resume"})
    return rows


def forget(client: redis.Redis, settings: Settings, space: str, user_id: str) -> Outcome:
    """Apply a Segment ``delete`` for ``user_id`` and purge its logged events now."""
    raw = {"type": "delete", "userId": user_id, "messageId": f"forget-{user_id}-{now_ms()}"}
    event = normalise(raw, now_ms(), IdentityRules.from_settings(settings))
    outcome = SyncStore(client, settings).apply(space, [(event, encode_raw(raw))])[0]
    purge_forgotten(client, space)
    return outcome


def purge_forgotten(client: redis.Redis, space: str, chunk: int = 2000) -> int:
    """Delete the logged events of erased profiles (and of profiles merged into them). Returns entries removed.

    Runs as a job after a delete: scanning the log does not belong in the request path.
    """
    k = Keys(space)
    forgotten = {m for m in client.smembers(k.forgotten_profiles)}
    if not forgotten:
        return 0
    removed, start = 0, "-"
    while True:
        rows = client.xrange(k.log, min=start, max="+", count=chunk)
        if not rows:
            break
        doomed = [eid for eid, fields in rows if fields.get(b"p") in forgotten]
        if doomed:
            removed += client.xdel(k.log, *doomed)
        last = rows[-1][0].decode()
        ms, _, seq = last.partition("-")
        start = f"{ms}-{int(seq) + 1}"
        if len(rows) < chunk:
            break
    client.srem(k.forgotten_profiles, *forgotten)
    return removed


# Dead-letter sources whose bodies passed authentication (a valid signature or write key, or open mode). Anything
# else, notably ``webhook-unsigned`` (bodies that failed the signature check, stored by earlier versions), is never
# applied.
AUTHENTICATED_SOURCES = frozenset({"webhook", "tracking"})


def replay_dead_letters(client: redis.Redis, settings: Settings, space: str, progress=None,
                        drop_unauthenticated: bool = False) -> dict:
    """Apply the dead letters again (after a fix); what applies is removed, the rest stays.

    A dead letter holds one event, or a whole refused body (an event, an Actions array or a Tracking API batch)
    that had passed authentication. An entry from any other source (``AUTHENTICATED_SOURCES``) is skipped and
    counted as ``unauthenticated``, never applied: ``drop_unauthenticated`` deletes those entries."""
    k = Keys(space)
    rules = IdentityRules.from_settings(settings)
    store = SyncStore(client, settings)
    counts = {"entries": 0, "replayed": 0, "kept": 0, "events_applied": 0, "unauthenticated": 0}
    last = "-"
    while True:
        rows = client.xrange(k.dead_letters, min=last, max="+", count=500)
        rows = [row for row in rows if row[0].decode() != last]
        if not rows:
            break
        for entry_id, fields in rows:
            counts["entries"] += 1
            if progress:
                progress(1)
            if fields.get(b"source", b"").decode(errors="replace") not in AUTHENTICATED_SOURCES:
                counts["unauthenticated"] += 1
                if drop_unauthenticated:
                    delete_dead_letters(client, space, [entry_id])
                continue
            try:
                doc = orjson.loads(fields.get(b"raw", b""))
                items = doc.get("batch") if isinstance(doc, dict) and "batch" in doc else doc
                items = items if isinstance(items, list) else [items]
                events = [(normalise(e, now_ms(), rules), encode_raw(e)) for e in items]
                outcomes = store.apply(space, events)
            except (orjson.JSONDecodeError, orjson.JSONEncodeError, ValueError):  # encode: nested too deeply
                counts["kept"] += 1
                continue
            if all(o.status != "error" for o in outcomes):
                delete_dead_letters(client, space, [entry_id])
                counts["replayed"] += 1
                counts["events_applied"] += sum(o.status in ("ok", "deleted") for o in outcomes)
            else:
                counts["kept"] += 1
        last = rows[-1][0].decode()
    return counts


def purge_job(space: str) -> int:
    """RQ entry point (enqueued by the receiver after a delete)."""
    client = redis.Redis.from_url(state_url(Settings.from_env()))
    return purge_forgotten(client, space)
