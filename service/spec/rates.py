"""Per-minute event counts → rates over the last minute and the last hour (pure; the Redis side is
``service/state/rates.py``).

Counts are kept in one bucket per minute (epoch ms // 60,000). A window that does not start on a minute boundary
takes its oldest bucket in proportion to the part of that minute it covers (the sliding-window estimate of
https://blog.cloudflare.com/counting-things-a-lot-of-different-things/): exact while the rate is steady, and
otherwise off by at most the part of that one bucket it guesses.
"""

from __future__ import annotations

from collections.abc import Mapping

MINUTE_MS = 60_000
HOUR_MINUTES = 60
# What an event came to, as the receiver answers Segment: accepted (applied; a delete included), duplicate
# (messageId seen within DEDUPE_WINDOW), suppressed (a deleted userId's), rejected (invalid: a dead letter and,
# for a single event or a whole body, a 4xx).
OUTCOMES = ("accepted", "duplicate", "rejected", "suppressed")
# Store statuses (``service.state.store.Outcome``) by the outcome they count as.
OUTCOME_OF = {"ok": "accepted", "deleted": "accepted", "duplicate": "duplicate", "suppressed": "suppressed",
              "error": "rejected", "rejected": "rejected"}
REPLAY = "replay:"  # field prefix of what imports and replays applied, kept apart from live intake

Buckets = Mapping[int, Mapping[str, int]]  # minute -> field -> count


def minute_of(ms: int) -> int:
    return ms // MINUTE_MS


def minutes_back(now_ms: int, minutes: int = HOUR_MINUTES) -> list[int]:
    """The buckets a window of ``minutes`` ending now touches, oldest first (one more than ``minutes``)."""
    current = minute_of(now_ms)
    return list(range(current - minutes, current + 1))


def window(buckets: Buckets, now_ms: int, minutes: int, fields: tuple[str, ...] = OUTCOMES,
           prefix: str = "") -> dict[str, float]:
    """Events per field over the ``minutes`` before ``now_ms``: the buckets it covers whole, plus the share of the
    oldest one it covers in part."""
    current = minute_of(now_ms)
    covered = (now_ms % MINUTE_MS) / MINUTE_MS  # of the current minute; the oldest is covered for the rest
    out = dict.fromkeys(fields, 0.0)
    for minute in range(current - minutes, current + 1):
        weight = 1.0 - covered if minute == current - minutes else 1.0
        counts = buckets.get(minute, {})
        for f in fields:
            out[f] += weight * counts.get(prefix + f, 0)
    return out


def rates(buckets: Buckets, now_ms: int, fields: tuple[str, ...] = OUTCOMES,
          prefix: str = "") -> dict[str, dict[str, float]]:
    """Counts and events/s over the last minute and the last hour, by field."""
    out: dict[str, dict[str, float]] = {}
    for name, minutes in (("last_minute", 1), ("last_hour", HOUR_MINUTES)):
        counts = window(buckets, now_ms, minutes, fields, prefix)
        out[name] = {f: round(n) for f, n in counts.items()}
        out[name + "_per_second"] = {f: round(n / (minutes * 60), 3) for f, n in counts.items()}
    return out


def series(buckets: Buckets, now_ms: int, minutes: int = HOUR_MINUTES, fields: tuple[str, ...] = OUTCOMES,
           prefix: str = "") -> list[dict[str, int]]:
    """One row per minute, oldest first, the current (partial) minute last: for a chart of the last hour."""
    return [{"minute_ms": m * MINUTE_MS, **{f: int(buckets.get(m, {}).get(prefix + f, 0)) for f in fields}}
            for m in minutes_back(now_ms, minutes)[1:]]


def decode(raw: Mapping[bytes | str, bytes | str]) -> dict[str, int]:
    """A bucket as Redis returns it (HGETALL) → field -> count."""
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
