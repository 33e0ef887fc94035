"""Segment Spec → one normalised ``Event`` (pure, no I/O).

Time: ``Event.ts`` is when an event takes effect, its timestamp but never later than its receipt
(``effective_time``); ``Event.received`` breaks ties. The Tracking API's clock-skew correction is
``tracking_times``, applied by the receiver before ``normalise`` and written into the logged event.

Every Segment field name and the meaning of every call type live here once. The receiver turns raw JSON into
``Event`` objects; ``service/state/store.py`` hands them, encoded by ``Event.script_payload`` (the one encoder), to
``service/state/lua/apply.lua``, which applies each atomically. Where a call takes effect:

    call          what it changes (the ``Event`` field)                                where in apply.lua
    every call    dedupe by messageId; identity: match, create or merge profiles by      1 dedupe, 3 identity,
                  ``identifiers``; first / last seen; event log; dirty mark              4 merge, 5 meta, 6 log
    identify      user traits, Engage audiences, computed traits (``traits``; last       5 ``lww``
                  write wins per trait, by effective time, then receipt)
    track         ``Order Completed``: an order keyed by order_id (``order``);           5 ``ofield``, ``lww``,
                  ``Audience Entered`` / ``Exited``, ``Trait Computed``: traits of       ``afield``
                  class audience / computed_trait (``traits``); activity (``activity``);
                  ``Order Refunded`` / ``Cancelled``: the order is taken back (``reversal``)   ``rfield``
    page, screen  channel activity slot, web or mobile (``activity``)                   5 ``afield``
    group         link to the account, and the account's traits (``group``)             5 ``gfield``, ``acct:``
    alias         previousId's profile merges into userId's (``alias_of``;               3 identity
                  ``ALIAS_MERGES=false`` turns it off)
    delete        erase the profile and its identifiers; suppress the userId's events   2 deletion
                  at or before it (``ts``)
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from service.spec.identity import IdentityRules
from service.spec.keys import SLOT_MS, SLOTS_PER_DAY

TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias", "delete"})
MAX_MESSAGE_ID = 100
MAX_TRAITS = 300
ORDER_EVENTS = frozenset({"Order Completed"})
REVERSAL_EVENTS = frozenset({"Order Refunded", "Order Cancelled"})  # take an Order Completed back, by order_id
# Email-spec events that show a person engaging with email. Delivered/Bounced say nothing about the person.
EMAIL_ENGAGEMENT = frozenset({"Email Opened", "Email Link Clicked"})
AUDIENCE_ENTERED, AUDIENCE_EXITED, TRAIT_COMPUTED = "Audience Entered", "Audience Exited", "Trait Computed"
MOBILE_LIBRARY = re.compile(r"ios|android|react-native|flutter|xamarin|kotlin|swift|unity")
WEB_LIBRARY = re.compile(r"^(?:analytics\.js|analytics-next|analytics-browser|web)")
_EMPTY: dict[str, Any] = {}
AUDIENCE, COMPUTED = "audience", "computed_trait"


class InvalidEvent(ValueError):
    """The event can never be applied; the message is the dead-letter reason."""


@dataclass(slots=True)
class Event:
    """One event as the store applies it. Not frozen, though nothing changes one after ``normalise``: a frozen
    dataclass's ``__init__`` sets each field through ``object.__setattr__``, 2 µs more per event on the intake path
    (3.8 against 1.5 µs on the benchmark machine)."""

    type: str
    message_id: str
    ts: int  # when the event takes effect, epoch ms: its time, never later than its receipt (``effective_time``)
    user_id: str | None
    identifiers: tuple[tuple[str, str], ...]  # by priority, highest first
    traits: tuple[tuple[str, str, str], ...] = ()  # (name, JSON value, class or "")
    order: tuple[str, float, tuple[str, ...]] | None = None  # (key, revenue, categories)
    activity: tuple[str, int, int] | None = None  # (channel, UTC day, slot 0..47)
    group: tuple[str, tuple[tuple[str, str], ...]] | None = None  # (groupId, account traits as JSON)
    alias_of: str | None = None  # previousId, for alias merging
    reversal: str | None = None  # order key of an Order Refunded / Order Cancelled
    received: int = 0  # when it was received, epoch ms: breaks ties between writes of the same ``ts``
    erase: str | None = None  # a delete without userId: the profile id to erase (``persona-sync forget``)

    def script_payload(self) -> bytes:
        """The event as the Lua script reads it: everything it needs and nothing more; this is the only place
        either form is written (apply.lua's header documents both).

        Plain, for most calls (no group, alias or erasure, no tab or U+001E in a value and no colon in an
        identifier's type): ``t \\t ts \\t mid \\t uid \\t activity field \\t slot \\t type:value \\t ...``,
        the activity field being the profile's ``a:channel:day`` (empty, with the slot, without activity), which
        the script splits with one pattern match (no JSON): for Redis, the cheapest form to read. Traits (without
        U+001E or U+001F in them) come first: ``\\x1e received \\x1f stamp``, ``\\x1f name \\x1f JSON value
        \\x1f class`` each, then ``\\x1e`` (the stamp being what the profile records of their time: ``ts``, or
        ``ts+delay`` when received later); without traits, no receipt time (only they need it). An order or a
        reversal (no U+001D in it, no U+001F in its key) comes before all that: ``\\x1d o \\x1f key \\x1f revenue
        \\x1f categories joined by U+001F \\x1d``, or ``\\x1d r \\x1f key \\x1d``.

        Else compact JSON (cjson): ``t`` type, ``mid`` message_id, ``ts`` event time (ms), ``uid`` user_id or "",
        ``ids`` identifiers ([type, value] by priority), ``tr`` traits ([name, JSON value, class]), ``o`` order
        ([key, revenue as text, categories joined by U+001F] or null), ``a`` activity ([channel, day, slot] or
        null), ``g`` group ([groupId, [[name, JSON value], ...]] or null), ``al`` alias_of (previousId or null),
        ``rv`` reversal (the order key of a refund or cancellation, or null), ``rc`` received (ms; ``ts`` when
        unknown), ``ep`` the profile id a delete without userId erases (or null)."""
        if not (self.group or self.alias_of or self.erase):
            plain = self._plain()
            if plain is not None:
                return plain.encode()
        return orjson.dumps({
            "t": self.type,
            "mid": self.message_id,
            "ts": self.ts,
            "uid": self.user_id or "",
            "ids": self.identifiers,
            "tr": self.traits,
            "o": [self.order[0], repr(self.order[1]), "\x1f".join(self.order[2])] if self.order else None,
            "a": self.activity,
            "g": self.group,
            "al": self.alias_of,
            "rv": self.reversal,
            "rc": max(self.received, self.ts),
            "ep": self.erase,
        })

    def _plain(self) -> str | None:
        """The plain form of an event of identifiers, activity, traits and orders only; None when a value holds
        one of its separators (a tab or U+001E, U+001F in a trait or an order's key, U+001D in an order) or an
        identifier's type a colon. Checked on the text once built, by counting separators: a few C-level scans
        rather than one per value."""
        if self.order or self.reversal:
            text = self._plain_unordered()
            if text is None:
                return None
            if self.order:
                key, revenue, categories = self.order
                section = f"\x1do\x1f{key}\x1f{revenue!r}\x1f{chr(31).join(categories)}\x1d"
            else:
                key = self.reversal or ""
                section = f"\x1dr\x1f{key}\x1d"
            if section.count("\x1d") != 2 or "\x1f" in key:
                return None
            return section + text
        return self._plain_unordered()

    def _plain_unordered(self) -> str | None:
        """The plain form without an order section (``_plain``)."""
        ids = self.identifiers
        if any(":" in kind for kind, _ in ids):
            return None
        field, slot = (f"a:{self.activity[0]}:{self.activity[1]}", str(self.activity[2])) if self.activity \
            else ("", "")
        joined = "\t".join([f"{kind}:{value}" for kind, value in ids])
        text = f"{self.type}\t{self.ts}\t{self.message_id}\t{self.user_id or ''}\t{field}\t{slot}\t{joined}"
        if text.count("\t") != 6 + max(len(ids) - 1, 0) or "\x1e" in text:
            return None
        if not self.traits:
            return text
        received = max(self.received, self.ts)
        stamp = f"{self.ts}+{received - self.ts}" if received > self.ts else str(self.ts)
        traits = "".join([f"\x1f{n}\x1f{v}\x1f{c}" for n, v, c in self.traits])
        if traits.count("\x1f") != 3 * len(self.traits) or "\x1e" in traits:
            return None
        return f"\x1e{received}\x1f{stamp}{traits}\x1e{text}"


def dedupe_digest(message_id: str) -> tuple[int, int]:
    """(shard, id) of a messageId: 80 bits in all, so collisions are negligible. The id is a signed 64-bit integer,
    which Redis keeps in a set's compact intset encoding (8 bytes an id, found by binary search)."""
    d = hashlib.blake2b(message_id.encode(), digest_size=10).digest()
    return int.from_bytes(d[:2], "big"), int.from_bytes(d[2:], "big", signed=True)


def legacy_dedupe_field(dedupe_id: int) -> bytes:
    """The 8-byte hash field an older version kept for a dedupe id (see ``Keys.legacy_dedupe``)."""
    return dedupe_id.to_bytes(8, "big", signed=True)


def parse_timestamp(value: Any) -> int:
    """Epoch ms from an ISO-8601 string; naive times are UTC."""
    if not isinstance(value, str) or not value:
        raise InvalidEvent(f"timestamp {value!r} is not an ISO-8601 string")
    if len(value) > 40:  # the longest ISO-8601 time is 32 characters: a longer string is padding or garbage
        value = value.strip()
        if len(value) > 40:
            raise InvalidEvent(f"timestamp {value[:40]!r}... is not ISO-8601")
    return _parse_iso(value)


_EPOCH, _MS = datetime(1970, 1, 1, tzinfo=UTC), timedelta(milliseconds=1)


@functools.lru_cache(maxsize=4096)
def _parse_iso(value: str) -> int:
    """Cached (at most 4,096 strings of at most 40 characters): the events of a batch share their receivedAt,
    and often their timestamps."""
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidEvent(f"timestamp {value[:40]!r} is not ISO-8601") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    ms = (dt - _EPOCH) // _MS  # exact: the float of timestamp() * 1000 put one in 170 times a millisecond early
    if ms < 0:  # no clock means a time before the epoch; and one before year 1 in UTC could not even be written out
        raise InvalidEvent(f"timestamp {value[:40]!r} is before 1970: the sender's clock is wrong")
    return ms


def _id(value: Any) -> str | None:
    """userId / anonymousId: strings or numbers; anything else is absent."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        value = str(int(value)) if float(value).is_integer() else str(value)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def _person_id(value: Any) -> str | None:
    """userId, anonymousId, previousId: as ``_id``, but a JSON number past what a double holds exactly (orjson reads
    one past 64 bits as a float) is refused, as two different people would become one. (Elsewhere, an order id or a
    device id, such a number only blurs one identifier, not worth the whole event.)"""
    if isinstance(value, float) and value.is_integer() and abs(value) >= 2 ** 53:
        raise InvalidEvent(f"an id is the number {value:.17g}, too large to be exact: send ids as strings")
    return _id(value)


def _dict(value: Any) -> dict[str, Any]:
    return value if type(value) is dict else _EMPTY


def _event_name(raw: dict[str, Any]) -> str | None:
    """``event`` of a track call; anything but a string (a list, an object) names nothing."""
    name = raw.get("event")
    return name if isinstance(name, str) else None


def _event_time(raw: dict[str, Any], received_ms: int) -> int:
    for name in ("timestamp", "originalTimestamp", "receivedAt", "sentAt"):
        if raw.get(name) is not None:
            return parse_timestamp(raw[name])
    return received_ms


def _received_time(raw: dict[str, Any], received_ms: int) -> int:
    """When the event was received: its ``receivedAt`` (Segment's, on webhook deliveries; ours, written by the
    receiver into Tracking API events, so a replay keeps it), never later than ``received_ms`` (now)."""
    value = raw.get("receivedAt")
    if isinstance(value, str):
        try:
            return min(parse_timestamp(value), received_ms)
        except InvalidEvent:
            pass  # a malformed receivedAt cannot sink an event whose timestamp is fine
    return received_ms


def effective_time(event_ms: int, received_ms: int) -> int:
    """When a write takes effect: the event's time, but never later than its receipt. A client clock set to 2099
    must not pin a trait for ever: last write wins, audience enter/exit, first/last seen, activity slots, orders
    and deletion order by this time. The event keeps its own timestamp in the log."""
    return min(event_ms, received_ms)


def effective_ms(raw: dict[str, Any], received_ms: int) -> int | None:
    """The time an event took effect (as ``normalise`` works it out: its own, never later than its receipt), for
    code that reads raw events back (the GDPR purge); None when its time cannot be read."""
    try:
        return effective_time(_event_time(raw, received_ms), _received_time(raw, received_ms))
    except InvalidEvent:
        return None


def tracking_times(event: dict[str, Any], batch_sent_at: Any, received_ms: int) -> dict[str, Any]:
    """The times Segment's Tracking API gives an event, as a new dict: ``receivedAt`` is our receipt (a client's
    own receivedAt is overwritten), and when the client sent ``sentAt`` (its own, else the batch's) the clock skew
    is corrected as Segment does: ``timestamp = receivedAt - (sentAt - originalTimestamp)``, where the client's
    time is its ``originalTimestamp``, else the ``timestamp`` its library stamped. An event that carries both
    ``timestamp`` and ``originalTimestamp`` had its timestamp set explicitly and keeps it
    (https://segment.com/docs/connections/spec/common/#timestamps). An event without a time of its own is
    stamped with its receipt, as the Tracking API does. Unreadable times are left for ``normalise`` to refuse."""
    out = dict(event)
    out["receivedAt"] = iso_ms(received_ms)
    client = event.get("originalTimestamp")
    if client is None:
        client = event.get("timestamp")
    if client is None:  # no time of the client's own: the Tracking API defaults timestamp to the receipt
        out["timestamp"] = out["receivedAt"]
        return out
    sent = event.get("sentAt", batch_sent_at)
    if sent is None or (event.get("timestamp") is not None and event.get("originalTimestamp") is not None):
        return out
    try:
        corrected_ms = received_ms - (parse_timestamp(sent) - parse_timestamp(client))
        if corrected_ms < 0:  # a sentAt far ahead of the event's own time (a broken clock): keep the client's time
            return out
        corrected = iso_ms(corrected_ms)
    except (InvalidEvent, ValueError, OverflowError, OSError):  # unreadable, or corrected out of datetime's range
        return out
    out["originalTimestamp"] = client
    out["timestamp"] = corrected
    if "sentAt" not in out:
        out["sentAt"] = sent
    return out


_iso_second: tuple[int, str] = (0, "1970-01-01T00:00:00")  # the last second formatted: every request needs one


def iso_ms(ms: int) -> str:
    """ISO-8601 UTC with milliseconds and a Z, as Segment writes its times. The second's text is kept for the
    next call: the receiver stamps every request with its receipt, and a datetime per call cost 4.6 µs (0.8 now)."""
    global _iso_second
    second, text = _iso_second
    if ms // 1000 != second:
        second = ms // 1000
        text = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds").removesuffix("+00:00")
        _iso_second = (second, text)
    return f"{text}.{ms % 1000:03d}Z"


def _message_id(raw: dict[str, Any]) -> str:
    mid = raw.get("messageId")
    if mid is None or mid == "":
        # Segment "deduplicates on messageId, not on the contents": two identical events without one are two
        # events. (The receiver writes the generated id into the event it logs, so a replay keeps it.)
        return generated_message_id()
    if not isinstance(mid, str | int):
        raise InvalidEvent("messageId must be a string")
    mid = str(mid)
    if len(mid) > MAX_MESSAGE_ID:
        raise InvalidEvent(f"messageId is {len(mid)} characters; Segment allows at most {MAX_MESSAGE_ID}")
    return mid


def generated_message_id() -> str:
    """A messageId for an event that came without one: unique, never derived from the event's contents."""
    return f"gen-{uuid.uuid4().hex}"


def _dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return orjson.dumps(str(value)).decode()


def _traits(kind: str, raw: dict[str, Any], ctx: dict[str, Any], props: dict[str, Any]) -> list[tuple[str, str, str]]:
    personas = _dict(ctx.get("personas"))
    pclass = personas.get("computation_class")
    pkey = personas.get("computation_key")
    out: dict[str, tuple[str, str, str]] = {}
    # Only identify writes user traits: context.traits on other calls feeds identity resolution (its email) but
    # "won't update the user's profile" (https://segment.com/docs/connections/spec/track/); group traits belong
    # to the account.
    base = dict(_dict(raw.get("traits"))) if kind == "identify" else {}
    if len(base) >= MAX_TRAITS:
        raise InvalidEvent(f"{len(base)} traits; Segment rejects identify calls with {MAX_TRAITS} or more")
    for name, value in base.items():
        klass = ""
        if isinstance(pkey, str) and name == pkey:
            klass = AUDIENCE if pclass == "audience" else COMPUTED if pclass == "trait" else ""
        out[str(name)] = (str(name), _dumps(value), klass)
    if kind == "track":
        event = _event_name(raw)
        if pclass == "audience" or event in (AUDIENCE_ENTERED, AUDIENCE_EXITED):
            key = pkey if isinstance(pkey, str) and pclass == "audience" else props.get("audience_key")
            if isinstance(key, str) and key:
                member = props.get(key)
                if not isinstance(member, bool):
                    member = event != AUDIENCE_EXITED
                out[key] = (key, _dumps(member), AUDIENCE)
        elif pclass == "trait" or event == TRAIT_COMPUTED:
            key = pkey if isinstance(pkey, str) and pclass == "trait" else props.get("trait_key")
            if isinstance(key, str) and key and key in props:
                out[key] = (key, _dumps(props[key]), COMPUTED)
    return sorted(out.values())


def _platform(device: Any, ctx: dict[str, Any]) -> str | None:
    text = f"{_dict(device).get('type') or ''} {_dict(ctx.get('os')).get('name') or ''}".lower()
    if "android" in text:
        return "android"
    if any(s in text for s in ("ios", "iphone", "ipad", "tvos", "watchos")):
        return "ios"
    return None


def _identifiers(kind: str, raw: dict[str, Any], ctx: dict[str, Any], props: dict[str, Any],
                 user_id: str | None, custom: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Identifiers of the person. A groupId is not one: it is shared by everyone in the account, so it would
    either merge colleagues or, under merge protection, land on whoever arrived first. Groups are links.
    ``custom``: the configured identifier types of the space's own (a phone number, a CRM id), which Segment also
    reads from ``properties`` and ``context.traits`` (an identify's ``traits`` too), by name."""
    ids: list[tuple[str, str]] = []
    if user_id:
        ids.append(("user_id", user_id))
    anon = _person_id(raw.get("anonymousId"))
    if anon:
        ids.append(("anonymous_id", anon))
    traits = _dict(raw.get("traits")) if kind == "identify" else {}
    for src in (traits, _dict(ctx.get("traits"))):  # never properties.email: `Invite Sent {email: friend}`
        email = src.get("email")
        if isinstance(email, str) and email.strip():
            ids.append(("email", email))
    device = _dict(ctx.get("device"))
    # Segment's table: ios.id is context.device.id "when context.device.type = 'ios'" (android alike), not for a
    # watch, a TV or an event that only names the OS
    dtype = device.get("type")
    platform = dtype.lower() if isinstance(dtype, str) and dtype.lower() in ("ios", "android") else None
    if platform:
        if device_id := _id(device.get("id")):
            ids.append((f"{platform}.id", device_id))
        if device.get("adTrackingEnabled") is True and (advertising_id := _id(device.get("advertisingId"))):
            ids.append((f"{platform}.idfa", advertising_id))
        if token := _id(device.get("token")):
            ids.append((f"{platform}.push_token", token))
    for holder in (raw, ctx):  # analytics.js sends it in the call's integrations; Segment's table names context's
        if ga_id := _id(_dict(_dict(holder.get("integrations")).get("Google Analytics")).get("clientId")):
            ids.append(("ga_client_id", ga_id))
    if custom:
        holders = (props if kind != "group" else {}, _dict(ctx.get("traits")), traits)
        for kind_name in custom:
            for holder in holders:
                for key in _spellings(kind_name):
                    if value := _id(holder.get(key)):
                        ids.append((kind_name, value))
    external = ctx.get("externalIds")
    if isinstance(external, list):
        for item in external:
            item = _dict(item)
            etype = item.get("type")
            if not (isinstance(etype, str) and etype.strip() and item.get("collection", "users") == "users"):
                continue
            etype = etype.strip().lower()
            if ":" in etype:  # profiles keep an identifier as 'type:value': the type must end at its first ':'
                raise InvalidEvent(f"context.externalIds type {etype[:40]!r} contains ':'; name it with letters, "
                                   "digits, '.', '_' or '-'")
            # a person's own ids as numbers too large to be exact would merge two people
            evalue = _person_id(item.get("id")) if etype in ("user_id", "anonymous_id") else _id(item.get("id"))
            if evalue:
                ids.append((etype, evalue))
    return ids


@functools.lru_cache(maxsize=256)
def _spellings(key: str) -> tuple[str, ...]:
    """The keys a custom identifier is read from: as configured, and in camelCase and snake_case, as Segment reads
    traits and properties ("Segment accepts both camelCase and snake_case for context.traits, traits, and
    properties", https://segment.com/docs/unify/identity-resolution/identity-resolution-onboarding/):
    ``app_id`` -> app_id, appId; ``appId`` -> appId, app_id."""
    head, *rest = key.split("_")
    camel = head + "".join(part[:1].upper() + part[1:] for part in rest)
    snake = re.sub(r"(?<=[a-z0-9])([A-Z])", lambda m: "_" + m.group(1).lower(), key)
    return tuple(dict.fromkeys((key, camel, snake)))


# A person has a handful of identifiers; an event naming hundreds is a bug or an attack, and matching them costs
# Redis time (the apply script drops one and matches again while they exceed the profile's limits).
MAX_EVENT_IDENTIFIERS = 50

DESKTOP_OS = re.compile(r"mac|windows|linux|chrome ?os|ubuntu|fedora|debian")


def _channel(kind: str, raw: dict[str, Any], ctx: dict[str, Any], platform: str | None) -> str | None:
    """Email engagement, then an explicit channel, then the device and OS (a macOS app built on analytics-swift
    is web, not mobile), then the call (screen / page), then the library's name."""
    if kind == "track" and _event_name(raw) in EMAIL_ENGAGEMENT:
        return "email"
    channel = str(raw.get("channel") or ctx.get("channel") or "").lower()
    if channel == "mobile":
        return "mobile"
    if channel == "browser":
        return "web"
    if platform:
        return "mobile"
    device_os = f"{_dict(ctx.get('device')).get('type') or ''} {_dict(ctx.get('os')).get('name') or ''}".lower()
    if DESKTOP_OS.search(device_os):
        return "web"
    library = str(_dict(ctx.get("library")).get("name") or "").lower()
    if kind == "screen" or MOBILE_LIBRARY.search(library):
        return "mobile"
    if kind == "page" or WEB_LIBRARY.match(library):
        return "web"
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _order(raw: dict[str, Any], props: dict[str, Any], mid: str) -> tuple[str, float, tuple[str, ...]]:
    revenue = _number(props.get("revenue"))
    if revenue is None:
        revenue = _number(props.get("total")) or 0.0
    cats = []
    products = props.get("products")
    if isinstance(products, list):
        for p in products:
            cat = _dict(p).get("category")
            if isinstance(cat, str) and cat.strip():
                cats.append(cat.strip().replace("\x1f", " ").replace("|", "/"))
    return _order_key(props, mid), round(revenue, 6), tuple(cats)


def _order_key(props: dict[str, Any], mid: str) -> str:
    """The order's id (``order_id``), which an Order Completed and its refund or cancellation share."""
    return (_id(props.get("order_id")) or mid).replace("|", "/")


def normalise(raw: Any, received_ms: int, rules: IdentityRules) -> Event:
    """Validate one Segment event and reduce it to what the store applies. Raises ``InvalidEvent``."""
    if not isinstance(raw, dict):
        raise InvalidEvent("event is not a JSON object")
    kind = raw.get("type")
    if not isinstance(kind, str) or kind.lower() not in TYPES:
        raise InvalidEvent(f"unknown type {str(kind)[:40]!r}; expected one of {', '.join(sorted(TYPES))}")
    kind = kind.lower()
    user_id = _person_id(raw.get("userId"))
    received = _received_time(raw, received_ms)
    ts = effective_time(_event_time(raw, received_ms), received)
    if kind == "delete":
        if not user_id:
            raise InvalidEvent("delete needs a userId")
        if not rules.usable(user_id):  # deleting it would suppress every sender of the placeholder
            raise InvalidEvent(f"delete of userId {user_id[:40]!r}: a blocked placeholder identifies nobody")
        return Event("delete", _message_id(raw), ts, user_id, (("user_id", user_id),), received=received)
    if not user_id and not _person_id(raw.get("anonymousId")):
        raise InvalidEvent("neither userId nor anonymousId is set")
    mid = _message_id(raw)
    ctx, props = _dict(raw.get("context")), _dict(raw.get("properties"))
    device = ctx.get("device")
    platform = _platform(device, ctx) if type(device) is dict or ctx.get("os") else None
    ids = rules.prepare(_identifiers(kind, raw, ctx, props, user_id, rules.custom))
    if len(ids) > MAX_EVENT_IDENTIFIERS:
        raise InvalidEvent(f"{len(ids)} identifiers in one event (userId, anonymousId, context.externalIds and the "
                           f"rest); at most {MAX_EVENT_IDENTIFIERS}")
    alias_of = None
    if kind == "alias":
        if rules.alias_merges:
            alias_of = rules.usable(_person_id(raw.get("previousId")))
        else:  # Unify: an alias call cannot merge profiles, nor by its own userId and anonymousId (analytics.js
            ids = ids[:1]  # sends previousId = anonymousId): it is the person of its first-ranked identifier
    if not ids:
        raise InvalidEvent("no usable identifier: every value is blocked")
    channel = _channel(kind, raw, ctx, platform)
    slot = ts // SLOT_MS
    group = None
    if kind == "group" and (group_id := _id(raw.get("groupId"))):
        gtraits = tuple(sorted((str(k), _dumps(v)) for k, v in _dict(raw.get("traits")).items()))
        group = (group_id, gtraits)
    return Event(
        type=kind,
        message_id=mid,
        ts=ts,
        user_id=user_id,
        identifiers=ids,
        traits=tuple(_traits(kind, raw, ctx, props)),
        order=_order(raw, props, mid) if kind == "track" and _event_name(raw) in ORDER_EVENTS else None,
        activity=(channel, slot // SLOTS_PER_DAY, slot % SLOTS_PER_DAY) if channel else None,
        group=group,
        alias_of=alias_of,
        reversal=_order_key(props, mid) if kind == "track" and _event_name(raw) in REVERSAL_EVENTS else None,
        received=received,
    )
