"""A space's generations of profile state (``Keys.gen``: ``""``, ``"g1:"``, ...): which exist, the next one, and
dropping one. A rebuild writes a new generation, then switches to it (``service/state/rebuild.py``); the previous
ones stay until ``rebuild --drop-old``, and a GDPR erasure reaches them too (``service/state/ops.py``)."""

from __future__ import annotations

import redis

from service.spec.keys import Keys
from service.state.connect import scan_space

GEN_FAMILIES = ("p:", "i:", "mrg:", "acct:", "au:", "ev:")  # key families of a generation, besides its counter ("seq")


def _number(gen: str) -> int:
    """A generation's number: 0 for the original one (""), n for "gn:"."""
    return int(gen[1:-1]) if gen.startswith("g") and gen[1:-1].isdigit() else 0


def next_generation(current: str) -> str:
    return f"g{_number(current) + 1}:"


def drop_generation(client: redis.Redis, space: str, gen: str) -> int:
    """Delete one generation's keys (never the current one's: the caller checks). Returns keys deleted."""
    k = Keys(space, gen)
    deleted = 0
    patterns = [k.prefix + gen + family + "*" for family in GEN_FAMILIES]
    for pattern in patterns:
        batch: list[bytes] = []
        for key in scan_space(client, k.log, pattern):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += client.unlink(*batch)
                batch = []
        if batch:
            deleted += client.unlink(*batch)
    deleted += client.unlink(k.seq, k.seq_base)
    return deleted


def generations(client: redis.Redis, space: str) -> set[str]:
    """Every generation with keys in Redis (a scan of the space's keys)."""
    prefix = Keys(space).prefix
    found: set[str] = set()
    for key in scan_space(client, Keys(space).log, prefix + "*", count=5000):
        rest = key.decode(errors="replace")[len(prefix):]
        if rest.startswith(GEN_FAMILIES) or rest == "seq":
            found.add("")
        elif rest.startswith("g") and ":" in rest:
            gen, _, tail = rest.partition(":")
            if gen[1:].isdigit() and (tail.startswith(GEN_FAMILIES) or tail == "seq"):
                found.add(gen + ":")
    return found


def other_generations(client: redis.Redis, space: str) -> list[str]:
    """The generations besides the current one that hold profiles: those a rebuild left until ``--drop-old``, and
    one being built. Each has its profile counter, and names run g1:, g2:, ... up to one past the current: a few
    EXISTS, no scan."""
    current = (client.get(Keys(space).generation_key) or b"").decode()
    names = ["", *(f"g{i}:" for i in range(1, _number(current) + 2))]
    return [gen for gen in names if gen != current and client.exists(Keys(space, gen).seq)]
