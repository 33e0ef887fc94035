"""The one clock: milliseconds since the epoch, the unit of event timestamps, stream ids and every stored time."""

from __future__ import annotations

import time


def now_ms() -> int:
    return int(time.time() * 1000)
