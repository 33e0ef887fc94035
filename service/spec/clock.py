"""The one clock: milliseconds since the epoch, the unit of event timestamps, stream ids and every stored time."""

from __future__ import annotations

import time
from typing import Any


def now_ms() -> int:
    return int(time.time() * 1000)


def point_in_time(value: Any, now: int) -> int | None:
    """Epoch ms of an ISO-8601 time (``2026-03-01``, ``2026-03-01T10:00:00Z``) or of a time ago (``90m``, ``2h``,
    ``7d``) before ``now`` (at the earliest the epoch: nothing is older); None when it is neither."""
    from service.config import ConfigError, parse_duration
    from service.spec.events import InvalidEvent, parse_timestamp

    if not isinstance(value, str):
        return None
    try:
        return max(0, now - int(parse_duration("time", value) * 1000))
    except ConfigError:
        pass
    try:
        return parse_timestamp(value)
    except InvalidEvent:
        return None
