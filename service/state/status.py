"""The state of a space in one pipeline: shared by `persona-sync status` (sync) and `GET /admin/status` (async)."""

from __future__ import annotations

from typing import Any

import orjson
import redis

from service.spec.keys import REFUSALS_KEY, SPACES_KEY, Keys


def spaces(client: redis.Redis) -> list[str]:
    """Every space that has received an event, sorted."""
    return sorted(s.decode() for s in client.smembers(SPACES_KEY))


def queue_status(pipe: Any, keys: Keys) -> None:
    """Queue the reads on a (sync or async) pipeline; ``status_row`` reads their replies in this order."""
    pipe.get(keys.seq)
    pipe.scard(keys.dirty)
    pipe.xlen(keys.log)
    pipe.xlen(keys.dead_letters)
    pipe.scard(keys.suppressed)
    pipe.hlen(keys.clusters)
    pipe.hvals(keys.personas)
    pipe.xlen(REFUSALS_KEY)
    pipe.get(keys.dead_letter_bytes)


def status_row(space: str, replies: list) -> dict[str, Any]:
    seq, dirty, log_len, dlq, suppressed, clusters, personas, refusals, dlq_bytes = replies[:9]
    states: dict[str, int] = {}
    for raw in personas:
        state = orjson.loads(raw).get("state", "?")
        states[state] = states.get(state, 0) + 1
    return {"space": space, "profiles_created": int(seq or 0), "dirty_profiles": dirty, "event_log_entries": log_len,
            "dead_letters": dlq, "dead_letter_bytes": int(dlq_bytes or 0), "suppressed_user_ids": suppressed,
            "clusters": clusters, "personas": dict(sorted(states.items())),
            "refusals_logged": refusals}  # requests refused before authentication, every space (GET /admin/refusals)
