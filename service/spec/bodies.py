"""Request bodies as Segment's senders write them, split into events (pure: no I/O, no business rules).

The receiver (``service/http/receiver.py``) and the replay engine (``service/state/replay.py``) split bodies with
the same functions, so a replayed body becomes exactly the events it became live."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from service.spec.events import generated_message_id, iso_ms, tracking_times

# Segment Tracking API limits.
MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MAX_BATCH_EVENTS = 2500
# Webhooks (Actions) batch size ceiling.
MAX_ACTIONS_BATCH = 4000


class BodyError(Exception):
    """The request as a whole is refused; ``status`` is 400 or 413, ``message`` says why and ``size`` is how many
    bytes were received (for the refusal log: the body itself is never part of the error)."""

    def __init__(self, status: int, message: str, size: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.size = size


# Strings (with their escapes), a quote that opens a string never closed, and brackets: all that matters to find
# where a JSON value ends. The string alternative is "unrolled" so that it runs in linear time.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|"|[\[\]{}]', re.DOTALL)
_SCALAR = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[^\s,\]]+', re.DOTALL)
JSON_SPACE = b" \t\r\n"


def value_end(body: bytes, start: int, within: int | None = None) -> int:
    """Where the JSON value that begins at ``start`` ends, found by scanning tokens with a stack of open brackets,
    never by a recursive parser: a value nested thousands of levels deep costs one linear scan. Raises
    ``ValueError`` when it does not end (within ``within`` bytes, when given); whether it is valid JSON is the
    parser's business."""
    end = len(body) if within is None else min(len(body), start + within)
    if body[start] not in b"[{":
        scalar = _SCALAR.match(body, start, end)
        if scalar is None:
            raise ValueError("no value")
        return scalar.end()
    open_brackets = bytearray()
    for token in _TOKEN.finditer(body, start, end):
        c = body[token.start()]
        if c == 0x22:  # '"'
            if token.end() - token.start() == 1:
                raise ValueError("unterminated string")
        elif c in b"[{":
            open_brackets.append(c + 2)  # the closing bracket: ord("[") + 2 == ord("]"), ord("{") + 2 == ord("}")
        elif not open_brackets or open_brackets.pop() != c:
            raise ValueError("mismatched brackets")
        elif not open_brackets:
            return token.end()
    raise ValueError("unterminated value")


def skip_space(body: bytes, i: int) -> int:
    """The index of the first byte at or after ``i`` that is not JSON whitespace (``len(body)``: none)."""
    n = len(body)
    while i < n and body[i] in JSON_SPACE:
        i += 1
    return i


def array_elements(body: bytes, most: int | None = None, within: int | None = None) -> list[bytes]:
    """The text of each element of the array that ``body`` is, as sent. Raises ``ValueError`` for anything else,
    and past ``most`` elements or an element longer than ``within`` bytes, when given (a scan that may run before
    authentication stops there)."""
    out, end = _array_at(body, skip_space(body, 0), most, within)
    if skip_space(body, end) < len(body):
        raise ValueError("text after the array")
    return out


def _array_at(body: bytes, i: int, most: int | None, within: int | None) -> tuple[list[bytes], int]:
    """The elements' texts of the array that begins at ``i``, and where it ends (see ``array_elements``)."""
    n = len(body)
    if i >= n or body[i] != 0x5B:  # '['
        raise ValueError("not an array")
    out: list[bytes] = []
    while True:
        i = skip_space(body, i + 1)
        if i < n and body[i] == 0x5D and not out:  # ']': the empty array
            break
        if i >= n:
            raise ValueError("unterminated array")
        if most is not None and len(out) >= most:
            raise ValueError(f"more than {most} elements")
        end = value_end(body, i, within)
        out.append(body[i:end])
        i = skip_space(body, end)
        if i < n and body[i] == 0x5D:
            break
        if i >= n or body[i] != 0x2C:  # ','
            raise ValueError("expected ',' or ']' after an element")
    return out, i + 1


def object_members(body: bytes) -> dict[str, bytes]:
    """The text of each member's value of the object that ``body`` is, by its key, without decoding the values (an
    event too deep to decode still tells its userId). Raises ``ValueError`` for anything else."""
    return _object_at(body)[0]


def _object_at(body: bytes, split: str | None = None, most: int | None = None,
               within: int | None = None) -> tuple[dict[str, bytes], list[bytes] | None]:
    """``object_members``, and the elements' texts of member ``split`` when it is an array, read with the limits of
    ``array_elements`` (its text is then not among the members); ``within`` bounds every other value too."""
    n, i = len(body), skip_space(body, 0)
    if i >= n or body[i] != 0x7B:  # '{'
        raise ValueError("not an object")
    out: dict[str, bytes] = {}
    elements: list[bytes] | None = None
    while True:
        i = skip_space(body, i + 1)
        if i < n and body[i] == 0x7D and not out and elements is None:  # '}': the empty object
            return out, elements
        if i >= n or body[i] != 0x22:
            raise ValueError("expected a key")
        key_end = value_end(body, i)
        try:
            key = orjson.loads(body[i:key_end])
        except orjson.JSONDecodeError:
            raise ValueError("a key that is not a string") from None
        i = skip_space(body, key_end)
        if i >= n or body[i] != 0x3A:  # ':'
            raise ValueError("expected ':' after a key")
        i = skip_space(body, i + 1)
        if i >= n:
            raise ValueError("a key without a value")
        if key == split and body[i] == 0x5B:
            elements, end = _array_at(body, i, most, within)
            out.pop(key, None)
        else:
            end = value_end(body, i, within)
            out[key] = body[i:end]
            if key == split:
                elements = None
        i = skip_space(body, end)
        if i < n and body[i] == 0x7D:
            return out, elements
        if i >= n or body[i] != 0x2C:
            raise ValueError("expected ',' or '}' after a member")


@dataclass(frozen=True)
class Unparsed:
    """An element of a batch nested deeper than the JSON parser goes (1,024 levels): refused on its own, and kept
    as sent, rather than the whole batch refused with it."""

    raw: bytes


def parse_json(body: bytes, split: bool = True, arrays: bool = True) -> Any:
    """The document, or ``BodyError``. ``split``: a batch whose parse fails on depth (a bare array, as Webhooks
    (Actions) sends, or a Tracking API ``batch``) is split into its events, the ones too deep kept as ``Unparsed``;
    off for a body not authenticated yet, which must not cost the split's scan. ``arrays``: bare arrays too (off
    where one is no valid body: the Tracking API)."""
    if not body.strip():
        raise BodyError(400, "empty body: send a JSON event, a JSON array of events, or a Tracking API batch",
                        len(body))
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "surrogate" in str(exc):
            repaired = repair_surrogates(body)
            if repaired is not None:
                return repaired
        if split and "depth limit" in str(exc):
            first = body.lstrip()[:1]
            parsed = (_elements_apart(body) if first == b"[" and arrays
                      else _batch_apart(body) if first == b"{" else None)
            if parsed is not None:
                return parsed
        raise BodyError(400, f"malformed JSON: {exc}", len(body)) from None


def _elements_apart(body: bytes, most: int = MAX_ACTIONS_BATCH, within: int | None = None) -> list[Any] | None:
    """A batch whose parse failed on depth, parsed element by element: the ones too deep become ``Unparsed``.
    None when it is not a well-formed array of otherwise valid elements, or has more than ``most`` of them or one
    longer than ``within`` bytes (the whole body is then refused)."""
    try:
        elements = array_elements(body, most, within)
    except ValueError:
        return None
    return _parsed_apart(elements)


def _parsed_apart(elements: list[bytes]) -> list[Any] | None:
    """Each element decoded, or ``Unparsed`` when it is too deep; None when one is not JSON for another reason."""
    out: list[Any] = []
    for raw in elements:
        try:
            out.append(orjson.loads(raw))
        except orjson.JSONDecodeError as exc:
            if "depth limit" not in str(exc):
                return None
            out.append(Unparsed(raw))
    return out


def _batch_apart(body: bytes) -> dict[str, Any] | None:
    """A Tracking API batch whose parse failed on depth: its members parsed apart, and its ``batch`` element by
    element (``_elements_apart``), so that one event too deep is refused alone, not the whole batch with the
    others (and, with the write key only in the body, nothing kept at all). None when it is not such a body."""
    # the scan stops at a batch's most events, and at an event (or another member) of 8 times the most Segment takes
    try:
        members, texts = _object_at(body, "batch", MAX_BATCH_EVENTS, 8 * MAX_EVENT_BYTES)
    except ValueError:
        return None
    batch = _parsed_apart(texts) if texts is not None else None
    if batch is None:
        return None
    try:
        doc = {key: orjson.loads(text) for key, text in members.items() if key != "batch"}
    except orjson.JSONDecodeError:
        return None  # too deep outside the events (a shared context): refused whole
    doc["batch"] = batch
    return doc


# A JSON string escape: an escaped backslash (kept, so that `\\ud800` stays text), a high + low surrogate pair
# (kept), or a lone surrogate (replaced). Scanning left to right keeps the backslashes paired.
_ESCAPE = re.compile(rb"(\\\\)|(\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2})"
                     rb"|\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
# A surrogate encoded as UTF-8 bytes (ED A0..BF xx), which UTF-8 forbids.
_RAW_SURROGATE = re.compile(rb"\xed[\xa0-\xbf][\x80-\xbf]")


def repair_surrogates(body: bytes) -> Any | None:
    """The document with every lone UTF-16 surrogate replaced by U+FFFD, or None if it is still not JSON.

    JavaScript strings may hold half an emoji (a string cut in the middle of a pair), and ``JSON.stringify``
    writes it as a lone ``\\udXXX`` escape, which strict JSON parsers refuse. One such character must not sink a
    whole batch. Signatures are checked on the bytes as received, before this runs."""
    fixed = _ESCAPE.sub(lambda m: m.group(0) if m.group(1) or m.group(2) else b"\\ufffd", body)
    fixed = _RAW_SURROGATE.sub("\ufffd".encode(), fixed)
    try:
        return orjson.loads(fixed)
    except orjson.JSONDecodeError:
        return None


@dataclass(frozen=True)
class Item:
    """One event as received: the decoded object and the bytes kept for the log and dead letters.

    ``error`` is set for an event refused before it is looked at (nested deeper than ``MAX_DEPTH``).
    """

    obj: Any
    raw: bytes
    error: str = ""


# orjson parses 1024 levels but serialises at most 254, and every event is serialised again downstream (the log,
# the script payload, generated messageIds): an event nested deeper is refused on its own, never with a 500.
MAX_DEPTH = 254
TOO_DEEP = f"event is nested more than {MAX_DEPTH} levels deep"
TRACKING_TYPES = ("identify", "track", "page", "screen", "group", "alias")


def _json_key(name: str) -> bytes:
    """A pattern for the JSON key ``name`` however it is written: each letter as itself or as a \\u escape of
    either case ("write\\u004bey" is writeKey too)."""
    letters = [f"(?:{re.escape(c)}|\\\\u00(?i:{ord(c):02x}))" for c in name]
    return "".join(letters).encode()


_WRITE_KEY = re.compile(b'("' + _json_key("writeKey") + rb'"\s*:\s*)("(?:[^"\\]|\\.)*")')


def named_write_keys(body: bytes) -> list[str]:
    """The write keys a body names anywhere (at most 8, of at most 200 characters), found without parsing it:
    whether a body that needs an expensive parse claims a key of ours before that parse is spent on it."""
    found: list[str] = []
    for m in _WRITE_KEY.finditer(body):
        try:
            key = orjson.loads(m.group(2))
        except orjson.JSONDecodeError:
            continue
        if isinstance(key, str) and 0 < len(key) <= 200:
            found.append(key)
            if len(found) == 8:
                break
    return found


def without_write_key(raw: bytes) -> bytes:
    """A Tracking API body or event as sent, its ``writeKey`` values blanked: a dead letter keeps the body for
    the operator, and a credential is not part of it (analytics.js repeats the key in every batched event)."""
    return _WRITE_KEY.sub(rb'\1""', raw) if b'"writeKey"' in raw or b"\\u" in raw else raw
# A delete is a GDPR erasure, which also suppresses the user's earlier events: it is taken only from a body signed
# whole (a classic webhook). A browser's write key is public, and in an Actions batch only the first event is signed
# (and Actions never sends deletes).
DELETES_COME_FROM = "deletions come only from Segment's classic Webhooks (signed whole) or `persona-sync forget`"


def _call_type(obj: Any) -> str | None:
    """An event's ``type`` as sent, when it is a string."""
    kind = obj.get("type") if isinstance(obj, dict) else None
    return kind if isinstance(kind, str) else None


def _tracking_only(it: Item) -> Item:
    """A Tracking API event whose type is not a tracking call (a ``delete``, Segment's internal types) is invalid."""
    kind = _call_type(it.obj)
    if it.error or kind is None or kind.lower() in TRACKING_TYPES:
        return it
    return Item(it.obj, it.raw, f"type {kind[:40]!r} is not a Tracking API call ({', '.join(TRACKING_TYPES)}); "
                                + DELETES_COME_FROM)


def _no_delete(it: Item, where: str = "a Webhooks (Actions) batch, where only the first event is signed") -> Item:
    """A delete in a Webhooks (Actions) batch is invalid: only the batch's first event is signed."""
    kind = _call_type(it.obj)
    if it.error or kind is None or kind.lower() != "delete":
        return it
    return Item(it.obj, it.raw, f"a delete in {where}; {DELETES_COME_FROM}")


def not_replayed_delete(it: Item) -> Item:
    """A dead letter's delete is not applied by a replay: an Actions batch's events were kept one by one, as
    webhooks, so a dead letter cannot tell a signed delete from one that came unsigned in a batch."""
    return _no_delete(it, "a dead letter (it cannot show it was signed)")


def item(obj: Any, raw: bytes | None = None, received_at: str | None = None) -> Item:
    """The event and the bytes that are logged (and archived, one per line): always its compact JSON, whatever
    the body looked like (pretty-printed, lone surrogates repaired), so that every reader can parse a log entry
    or an archive line on its own. The serialisation doubles as the depth check; ``raw`` (the bytes as received)
    is kept only for an event too deep to serialise, as its dead letter.

    What the receiver adds goes into those bytes too, so that a replay applies the event exactly as it was
    applied live: a messageId where the event had none, and ``received_at`` as ``receivedAt`` where the event had
    none (Segment's webhook deliveries carry their own)."""
    if isinstance(obj, Unparsed):
        return Item({}, obj.raw, TOO_DEEP)
    if isinstance(obj, dict):
        if obj.get("messageId") in (None, ""):
            obj = {**obj, "messageId": generated_message_id()}
        if received_at is not None and obj.get("receivedAt") is None:
            obj = {**obj, "receivedAt": received_at}
    try:
        encoded = orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return Item(obj, raw if raw is not None else deep_json(obj), TOO_DEEP)
    return Item(obj, encoded)


def deep_json(obj: Any) -> bytes:
    """JSON of what is nested deeper than orjson writes (254 levels), e.g. an event of a batch kept as a dead
    letter: the standard library's encoder goes as deep as Python's recursion limit; deeper still, b""."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(errors="replace")
    except (RecursionError, ValueError, TypeError):
        return b""


def webhook_items(doc: Any, body: bytes, received_ms: int) -> list[Item]:
    """Classic Webhooks (one object) or Webhooks (Actions) (one object, or a bare array)."""
    received_at = iso_ms(received_ms)
    if isinstance(doc, dict):
        return [item(doc, body, received_at)]
    if isinstance(doc, list):
        if len(doc) > MAX_ACTIONS_BATCH:
            raise BodyError(413, f"batch of {len(doc)} events; Webhooks (Actions) sends at most {MAX_ACTIONS_BATCH}")
        items = _as_sent(body, [item(e, None, received_at) for e in doc])
        for n, e in enumerate(doc):  # a delete is rare: its first letter spares the others a lower() (inline, not
            kind = e.get("type") if type(e) is dict else None  # _call_type: a call per event costs 0.03 µs)
            if isinstance(kind, str) and kind[:1] in "dD":
                items[n] = _no_delete(items[n])
        return items
    raise BodyError(400, "body must be a JSON object (one event) or an array of events")


def tracking_items(doc: Any, body: bytes, kind: str | None, received_ms: int) -> list[Item]:
    """Tracking API: ``/v1/<type>`` carries one event; ``/v1/batch`` a ``batch`` array with shared context.

    Every event gets Segment's times (``tracking_times``: our receivedAt, and the clock-skew correction when the
    client sent ``sentAt``, per event or for the whole batch)."""
    if not isinstance(doc, dict):
        raise BodyError(400, "body must be a JSON object")
    if kind is not None:
        if len(body) > MAX_EVENT_BYTES:
            raise BodyError(413, f"event is {len(body)} bytes; the Tracking API allows {MAX_EVENT_BYTES}")
        event = tracking_times(doc, None, received_ms)
        event.pop("writeKey", None)
        event.setdefault("type", kind)
        single = item(event)
        if single.error and not single.raw:
            single = Item(single.obj, without_write_key(body), single.error)
        return [_tracking_only(single)]
    items: list[Item] = []
    events = batch_events(doc)  # validates the batch first
    for sent, e in zip(doc["batch"], events, strict=True):
        # the 32 KB limit applies to the event as it is kept: with the batch's shared context merged in (else one
        # large context would be stored once per event), but not with the times we add
        try:
            size = len(orjson.dumps(e))
        except orjson.JSONEncodeError:
            size = 0  # too deep: item() refuses it
        if size > MAX_EVENT_BYTES:
            items.append(Item(sent, without_write_key(orjson.dumps(sent)),
                              f"event is {size} bytes with the batch's context; the Tracking API allows "
                              f"{MAX_EVENT_BYTES}"))
            continue
        if isinstance(e, dict):
            e = tracking_times(e, doc.get("sentAt"), received_ms)
        items.append(_tracking_only(item(e)))
    items = _as_sent(body, items, lambda text: _object_at(text, "batch")[1] or [])
    return [Item(it.obj, without_write_key(it.raw), it.error) if it.error else it for it in items]


def _as_sent(body: bytes, items: list[Item], elements: Callable[[bytes], list[bytes]] | None = None) -> list[Item]:
    """The items of a batch, those refused as too deep to write out again (nested past 254 levels, and past
    Python's recursion limit too, so ``item`` kept nothing) with the text they were sent as, for their dead letter.
    ``elements``: the events' texts in ``body`` (an Actions array's, by default); read only when needed."""
    lost = [n for n, it in enumerate(items) if it.error and not it.raw]
    if not lost:
        return items
    try:
        texts = (elements or array_elements)(body)
    except ValueError:
        return items
    if len(texts) != len(items):
        return items
    out = list(items)
    for n in lost:
        out[n] = Item(items[n].obj, texts[n], items[n].error)
    return out


# What a batch's shared context may add up to once merged into each of its events: a copy is kept with every event,
# so a 500 KB body with a 30 KB context and 2,500 events would store 75 MB and copy its keys millions of times
# (seconds of a blocked event loop, gigabytes of memory) before any event was refused. SDKs send a context of a few
# hundred bytes, or one per event.
MAX_SHARED_CONTEXT_TOTAL = 4 * 1024 * 1024


def _check_shared_context(context: dict[str, Any], events: int) -> None:
    """Refuse the batch (413) whose shared context would make an event too large, or the batch too large once
    merged into every event; measured once, before anything is merged."""
    try:
        size = len(orjson.dumps(context))
    except orjson.JSONEncodeError:
        return  # too deep to write: each event is refused as too deep, with its text
    if size > MAX_EVENT_BYTES:
        raise BodyError(413, f"the batch's shared context is {size} bytes: merged into each event it passes the "
                             f"Tracking API's {MAX_EVENT_BYTES} bytes per event; send a smaller context")
    if size * events > MAX_SHARED_CONTEXT_TOTAL:
        raise BodyError(413, f"the batch's shared context ({size} bytes) would be kept with each of its {events} "
                             f"events, {size * events} bytes in all (at most {MAX_SHARED_CONTEXT_TOTAL}): send "
                             "smaller batches, or the context in the events")


def batch_events(doc: dict[str, Any]) -> list[Any]:
    """The events of a Tracking API batch body, each with the batch's ``context`` merged under its own and the
    batch's ``integrations`` where it has none, and without ``writeKey`` (analytics.js repeats it in every
    batched event; a credential is not part of the event, and the log never keeps it)."""
    batch = doc.get("batch")
    if not isinstance(batch, list):
        raise BodyError(400, "a batch body needs a 'batch' array of events")
    if len(batch) > MAX_BATCH_EVENTS:
        raise BodyError(413, f"batch of {len(batch)} events; the Tracking API allows {MAX_BATCH_EVENTS}")
    shared_ctx = doc.get("context") if isinstance(doc.get("context"), dict) else None
    shared_int = doc.get("integrations") if isinstance(doc.get("integrations"), dict) else None
    if shared_ctx:
        _check_shared_context(shared_ctx, len(batch))
    out: list[Any] = []
    for e in batch:
        if isinstance(e, dict):
            e = dict(e)
            e.pop("writeKey", None)
            if shared_ctx:
                ctx = e["context"] if isinstance(e.get("context"), dict) else {}
                e["context"] = {**shared_ctx, **ctx}
            if shared_int and not isinstance(e.get("integrations"), dict):
                e["integrations"] = shared_int
        out.append(e)
    return out
