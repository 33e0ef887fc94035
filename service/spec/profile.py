"""Decode a profile hash (as ``HGETALL`` returns it) into plain data.

Pure: the Profile API and the workers both read profiles through ``decode_profile`` so that the hash layout
(``service/spec/keys.py``) is interpreted in one place.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from service.spec import keys as K


class Trait(NamedTuple):  # NamedTuples: a full recompute builds millions of these, and they are cheap
    value: Any
    ts: int  # effective time of the write, ms (the event's time, never later than its receipt)
    kind: str | None  # None, "audience" or "computed_trait"


class Identifier(NamedTuple):
    type: str
    value: str
    first_seen: int
    first_message_id: str


class Order(NamedTuple):
    key: str
    ts: int
    revenue: float
    categories: tuple[str, ...]


@dataclass
class Profile:
    id: str
    traits: dict[str, Trait] = field(default_factory=dict)
    identifiers: list[Identifier] = field(default_factory=list)
    orders: list[Order] = field(default_factory=list)
    activity: dict[str, dict[int, int]] = field(default_factory=dict)  # channel -> day -> slot bitmap
    groups: dict[str, int] = field(default_factory=dict)
    merged_from: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    identifier_total: int | None = None  # set when decoded without its identifiers (``detail=False``)
    generation: str | None = None  # the generation of state it was read from, when known (reads that follow use it)

    @property
    def identifier_count(self) -> int:
        return len(self.identifiers) if self.identifier_total is None else self.identifier_total

    def trait_values(self) -> dict[str, Any]:
        return {name: t.value for name, t in self.traits.items()}

    def sessions(self, channel: str, first_day: int, last_day: int) -> int:
        """Distinct 30-minute slots with activity on ``channel`` between two UTC day numbers, inclusive."""
        days = self.activity.get(channel, {})
        return sum(bits.bit_count() for day, bits in days.items() if first_day <= day <= last_day)

    @property
    def first_seen(self) -> int | None:
        return _int_or_none(self.meta.get("fs"))

    @property
    def last_seen(self) -> int | None:
        return _int_or_none(self.meta.get("ls"))

    @property
    def merges(self) -> int:
        return _int_or_none(self.meta.get("merges")) or 0


def _int_or_none(v: bytes | str | None) -> int | None:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def stamp_time(v: bytes | str | None) -> int:
    """The effective time (ms) of a trait's stamp, ``<ms>`` or ``<ms>+<received later by>`` (see apply.lua)."""
    if v is None:
        return 0
    return _int_or_none(_s(v).partition("+")[0]) or 0


def _s(v: bytes | str) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


assert (K.TRAIT, K.TRAIT_TS, K.TRAIT_CLASS, K.IDENT, K.IDENT_COUNT, K.ORDER, K.ACTIVITY, K.META, K.GROUP,
        K.ANCESTOR, K.REVERSED) == ("t:", "T:", "c:", "x:", "n:", "o:", "a:", "m:", "g:", "r:", "q:"), \
    "decode_profile spells the prefixes out: keep it in step"


def decode_profile(pid: str, raw: dict[bytes | str, bytes | str], traits: Collection[str] | None = None,
                   detail: bool = True) -> Profile:
    """Turn the flat hash into a ``Profile``; unknown fields are ignored so old data never breaks a read.

    Field prefixes are those of ``service/spec/keys.py`` (spelt out here: this loop runs for every field of every
    profile in a full recompute, so values are decoded only where they are used, and a client that decodes
    replies itself (``decode_responses=True``) saves the key decoding altogether).

    ``traits`` limits which traits are decoded (the recompute needs a dozen of them, not every one);
    ``detail=False`` leaves out what the workers never read: identifier records (only counted, see
    ``Profile.identifier_count``) and trait timestamps and classes (``Trait.ts`` 0, ``Trait.kind`` None)."""
    if raw and isinstance(next(iter(raw)), bytes):  # one comprehension, no call per field: this is the hot loop
        fields: dict[str, bytes | str] = {k.decode("utf-8", "replace"): v  # type: ignore[union-attr]
                                          for k, v in raw.items()}  # keys are all bytes or all str
    else:
        fields = raw  # type: ignore[assignment]
    p = Profile(id=pid)
    traits_out, idents, orders, activity, groups, meta = p.traits, p.identifiers, p.orders, p.activity, p.groups, p.meta
    count = 0
    reversed_orders: set[str] = set()
    for f, v in fields.items():
        prefix = f[:2]  # most frequent first; "T:", "c:" and "n:" are read beside their trait, or not at all
        if prefix == "m:":
            meta[f[2:]] = v if type(v) is str else _s(v)
        elif prefix == "t:":
            rest = f[2:]
            if traits is not None and rest not in traits:
                continue
            try:
                value = orjson.loads(v)
            except orjson.JSONDecodeError:
                value = _s(v)
            if value is None:  # set to null: removed. The stored write and its time stay, so an older value
                continue  # arriving later loses to it (last write wins) and does not bring the trait back
            if detail:
                kind = fields.get("c:" + rest)
                traits_out[rest] = Trait(value, stamp_time(fields.get("T:" + rest)),
                                         _s(kind) if kind is not None else None)
            else:
                traits_out[rest] = Trait(value, 0, None)
        elif prefix == "o:":
            ts, _, tail = (v if type(v) is str else _s(v)).partition("|")
            revenue, _, cats = tail.partition("|")
            try:
                rev = float(revenue)
            except ValueError:
                rev = 0.0
            orders.append(Order(f[2:], _int_or_none(ts) or 0, rev,
                                tuple(c for c in cats.split("\x1f") if c) if cats else ()))
        elif prefix == "a:":
            channel, _, day = f[2:].partition(":")
            try:
                activity.setdefault(channel, {})[int(day)] = int(v)
            except ValueError:
                pass
        elif prefix == "x:":
            count += 1
            if detail:
                kind, _, value = f[2:].partition(":")
                ts, _, mid = _s(v).partition("|")
                idents.append(Identifier(kind, value, _int_or_none(ts) or 0, mid))
        elif prefix == "g:":
            groups[f[2:]] = _int_or_none(v) or 0
        elif prefix == "q:":
            reversed_orders.add(f[2:])
        elif prefix == "r:":
            p.merged_from.append(f[2:])
    if not detail:
        p.identifier_total = count
    if len(idents) > 1:
        idents.sort(key=lambda i: (i.type, i.value))
    if reversed_orders:  # refunded or cancelled: out of spend, counts and categories, whichever arrived first
        orders[:] = [o for o in orders if o.key not in reversed_orders]
    if len(orders) > 1:
        orders.sort(key=lambda o: (o.ts, o.key))
    p.merged_from.sort()
    return p
