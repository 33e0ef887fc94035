"""Replay: apply events again, through the receiver's own path (split → ``normalise`` → apply.lua), from the
event log, the dead letters or history files (Segment's S3 / GCS archives, NDJSON, JSON arrays, Tracking API
batches).

One engine serves every source: a source yields ``Record``s with a resume position; ``run`` normalises them,
applies them in pipelined chunks as the receiver does, keeps what cannot apply as dead letters, throttles to a rate,
saves a checkpoint after every chunk and stops cleanly between chunks when asked.

What a replay does to what was already applied:
- from the log, every event is applied again (``reapply``: not deduplicated, not logged a second time). Every
  effect is idempotent (last write wins by time, orders by id, slot bits, min/max), so a profile that was right
  stays the same and one that a bug had got wrong is rewritten by the current code.
- from files and dead letters, events go through the live path: deduplicated by messageId, logged once.
  Events of files without a messageId get one derived from the file's name and line, so importing the same file
  twice adds nothing; events without ``receivedAt`` get their own timestamp as receipt, so ties resolve the same
  way on every import.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import orjson
import redis

from service.config import DEFAULT_REPLAY_RATE, Settings
from service.spec.bodies import (
    BodyError,
    Item,
    batch_events,
    item,
    not_replayed_delete,
    parse_json,
    tracking_items,
    webhook_items,
)
from service.spec.clock import now_ms
from service.spec.events import (
    Event,
    InvalidEvent,
    dedupe_digest,
    iso_ms,
    legacy_dedupe_field,
    normalise,
    parse_timestamp,
)
from service.spec.identity import IdentityRules
from service.spec.keys import TOMBSTONE, Keys, replay_cancel
from service.spec.rates import OUTCOME_OF
from service.state.queue import QUEUE_NAME, queue_purge_if_due
from service.state.rates import count_applied
from service.state.store import DEDUPE_BUCKETS, REDIS_DOWN, StoreUnavailable, SyncStore, delete_dead_letters, state_keys

CHUNK = 1000  # events per pipelined apply, as a Webhooks (Actions) batch
SHARD_LINES = 500  # lines (or array elements) per share of a file split between processes (``file_records``)
# dead letters that may be applied again: bodies that passed authentication, and what an operator replayed or imported
AUTHENTICATED_SOURCES = frozenset({"webhook", "tracking", "import", "replay", "rebuild"})


@dataclass(frozen=True)
class Record:
    """One event to apply (or the reason it cannot be), where it came from, and where to resume after it."""

    item: Item
    where: str  # "orders.ndjson.gz:12", "log 1700000000000-0", "dead letter 1700000000000-0"
    position: str  # resume token: a run started with this position skips everything up to and including it
    received_ms: int | None = None  # receipt of a dead letter's body; None: now
    dead_letter: bytes | None = None  # the dead letter this event came from (removed once all of it applies)
    logged_as: str | None = None  # the log entry this event is (a replay of the log)


@dataclass
class Report:
    """What a run did, by event type and outcome; ``stopped`` is the position to resume from, if interrupted."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    dead_letters_removed: int = 0
    stopped: str | None = None
    interrupted: bool = False  # stopped before the end of the input (Ctrl-C, a cancelled job)
    seconds: float = 0.0

    def outcome_totals(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (_, outcome), n in self.counts.items():
            out[outcome] += n
        return dict(sorted(out.items()))

    def by_type(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (kind, outcome), n in sorted(self.counts.items()):
            out.setdefault(kind, {})[outcome] = n
        return out

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {"events": self.total, "outcomes": self.outcome_totals(), "by_type": self.by_type(),
                "dead_letters_removed": self.dead_letters_removed, "interrupted": self.interrupted,
                "stopped_at": self.stopped,
                "seconds": round(self.seconds, 2)}


@dataclass
class Options:
    dry_run: bool = False
    rate: float | None = None  # events per second; None: as fast as Redis takes them
    reapply: bool = False  # the event log: apply again, not deduplicated, not logged again
    generation: str | None = None  # a rebuild's new generation (None: the space's current one)


# --- sources --------------------------------------------------------------------------------------------------

def log_records(client: redis.Redis, space: str, since_ms: int | None = None, until_ms: int | None = None,
                profile: ProfileFilter | None = None, after: str | None = None,
                until_id: str | None = None) -> Iterator[Record]:
    """The space's event log in arrival order, filtered by receipt time (the entry id) and by a profile
    (``profile_filter``; ``only`` filters by call type and event name). ``after``: resume past this entry id;
    ``until_id``: stop at this one, or at ``until_ms`` if that comes first."""
    key = Keys(space).log
    start = f"({after}" if after else (str(since_ms) if since_ms is not None else "-")
    end = str(until_ms) if until_ms is not None else "+"
    if until_id is not None and (until_ms is None or int(until_id.partition("-")[0]) <= until_ms):
        end = until_id
    while True:
        rows = client.xrange(key, min=start, max=end, count=CHUNK)
        for entry_id, fields in rows:
            eid = entry_id.decode()
            raw = fields.get(b"e", b"")
            by_id = profile is None or fields.get(b"p") in profile.pids
            if profile is not None and not by_id and not profile.might_hold(raw):
                continue
            try:
                obj = parse_json(raw)  # entries of older versions may be pretty-printed or hold lone surrogates
            except BodyError:
                obj = None
            received = int(eid.partition("-")[0])  # its receipt, not now
            if profile is not None and not by_id and not profile.holds(obj, received):
                continue
            yield Record(item(obj, raw) if obj is not None else Item(None, raw, "logged event is not JSON"),
                         f"log {eid}", eid, received_ms=received, logged_as=eid)
        if len(rows) < CHUNK:
            return
        start = "(" + rows[-1][0].decode()


def only(records: Iterable[Record], types: set[str] | None, event: str | None) -> Iterator[Record]:
    """The records of these call types and this track event name (either may be None: any)."""
    for rec in records:
        obj = rec.item.obj
        if types and not (isinstance(obj, dict) and str(obj.get("type", "")).lower() in types):
            continue
        if event is not None and not (isinstance(obj, dict) and obj.get("event") == event):
            continue
        yield rec


def resolve(client: redis.Redis, rules: IdentityRules, space: str, identifier: str) -> tuple[str, str, str | None]:
    """``TYPE:VALUE`` (a bare value is a user_id; ``segment_id:use_…`` a profile id), normalised as the receiver
    does → (type, value, the live profile's id or None), following merges (a merged-away id points at the
    survivor)."""
    kind, sep, value = identifier.partition(":")
    if not sep:
        kind, value = "user_id", identifier
    prepared = rules.prepare([(kind.strip().lower(), value)])
    if not prepared:
        return kind, value, None
    kind, value = prepared[0]
    keys = state_keys(client, space)
    # segment_id: the profile's own id (``use_…``), as the Profile API takes it; merged-away ones redirect below
    pid = value.encode() if kind == "segment_id" else client.get(keys.ident(kind, value))
    for _ in range(100):
        if not pid or pid == TOMBSTONE.encode():
            return kind, value, None
        if client.exists(keys.profile(pid.decode())):
            return kind, value, pid.decode()
        pid = client.get(keys.redirect(pid.decode()))
    return kind, value, None


@dataclass
class ProfileFilter:
    """What picks a profile's entries out of the log (``profile_filter``): the entry carries its id or the id of a
    profile merged into it (the id its profile had then); or, for entries a rebuild applied again under the new
    generation's ids while the entries keep the old ones, the event has one of the profile's identifiers."""

    pids: set[bytes]
    identifiers: set[tuple[str, str]]
    rules: IdentityRules
    needles: list[bytes] = field(default_factory=list)  # the identifiers' values as they appear in logged JSON

    def __post_init__(self) -> None:
        self.needles = [orjson.dumps(value)[1:-1].lower() for _, value in self.identifiers]

    def might_hold(self, raw: bytes) -> bool:
        """A logged event (compact JSON) that names none of the identifiers' values, in any case (the rules lower
        an email), is not the profile's: checked before parsing and normalising it, which would cost ~10 us for
        every entry of the log."""
        lowered = raw.lower()
        return any(needle in lowered for needle in self.needles)

    def holds(self, obj: Any, received_ms: int) -> bool:
        """Whether the event has one of the profile's identifiers, as the rules read them."""
        if not isinstance(obj, dict):
            return False
        try:
            event = normalise(obj, received_ms, self.rules)
        except InvalidEvent:
            return False
        return any(i in self.identifiers for i in event.identifiers)


def profile_filter(client: redis.Redis, settings: Settings, space: str, pid: str) -> ProfileFilter:
    """The ``ProfileFilter`` of profile ``pid``: its id, those merged into it, and its identifiers."""
    fields = client.hkeys(state_keys(client, space).profile(pid))
    pids = {pid.encode(), *(f[2:] for f in fields if f.startswith(b"r:"))}
    identifiers = set()
    for f in fields:
        if f.startswith(b"x:"):
            kind, _, value = f[2:].decode(errors="replace").partition(":")
            identifiers.add((kind, value))
    return ProfileFilter(pids, identifiers, IdentityRules.from_settings(settings))


def dead_letter_records(client: redis.Redis, space: str, reason: str | None = None,
                        after: str | None = None, entry: str | None = None) -> Iterator[Record]:
    """The dead letters that passed authentication, oldest first (``reason``: a case-insensitive substring;
    ``entry``: that one only). A dead letter holds one event or a whole refused body; each of its events becomes a
    record."""
    key = Keys(space).dead_letters
    start = f"({after}" if after else entry or "-"
    needle = reason.lower() if reason else None
    while True:
        rows = client.xrange(key, min=start, max=entry or "+", count=200)
        for entry_id, fields in rows:
            eid = entry_id.decode()
            source = fields.get(b"source", b"").decode(errors="replace")
            why = fields.get(b"reason", b"").decode(errors="replace")
            if source not in AUTHENTICATED_SOURCES or (needle and needle not in why.lower()):
                continue
            at = int(fields.get(b"at", b"0") or 0) or None
            raw = fields.get(b"raw", b"")
            try:
                items = [not_replayed_delete(it) for it in split_body(parse_json(raw), raw, source, at or now_ms())]
            except BodyError as exc:
                items = [Item(None, raw, exc.message)]
            for n, it in enumerate(items):
                yield Record(it, f"dead letter {eid}" + (f" #{n}" if len(items) > 1 else ""), eid, at, entry_id)
        if len(rows) < 200:
            return
        start = "(" + rows[-1][0].decode()


def split_body(doc: Any, raw: bytes, source: str, received_ms: int) -> list[Item]:
    """A body as the receiver split it: a Tracking API batch or event, an Actions array or a webhook event."""
    if source == "tracking" and isinstance(doc, dict):
        return tracking_items(doc, raw, None if isinstance(doc.get("batch"), list) else str(doc.get("type", "")),
                              received_ms)
    return webhook_items(doc, raw, received_ms)


DAMAGED = (EOFError, gzip.BadGzipFile, zlib.error)  # what reading a truncated or corrupt gzip file raises


def open_history(path: str) -> tuple[io.BufferedReader, io.BufferedReader]:
    """A history file (``-`` is stdin), decompressed when it is gzip (by its first bytes, not its name), and the
    file itself (its position is how far the reading got, for progress)."""
    raw: io.BufferedReader
    if path == "-":  # a pipe may hand over its first byte alone, so peek() could see one: read two, put them back
        stdin = cast(io.BufferedReader, sys.stdin.buffer)
        raw = cast(io.BufferedReader, io.BufferedReader(_Prefixed(stdin.read(2), stdin), 1 << 16))
    else:
        raw = open(path, "rb")  # noqa: SIM115
    if raw.peek(2)[:2] == b"\x1f\x8b":
        return io.BufferedReader(cast(io.RawIOBase, gzip.GzipFile(fileobj=raw)), 1 << 16), raw
    return raw, raw


class _Prefixed(io.RawIOBase):
    """``head`` (bytes already read), then the rest of ``stream``."""

    def __init__(self, head: bytes, stream: io.BufferedReader) -> None:
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.head[:len(buffer)] if self.head else self.stream.read1(len(buffer))
        self.head = self.head[len(data):]
        buffer[:len(data)] = data
        return len(data)


@dataclass
class ByteMeter:
    """How far ``file_records`` got through its files, in bytes as stored (compressed), for an ETA."""

    total: int | None = None
    done: int = 0

    @staticmethod
    def of(paths: list[str]) -> ByteMeter:
        return ByteMeter(None if "-" in paths else sum(Path(p).stat().st_size for p in paths))


def file_records(paths: list[str], after: str | None = None, shard: tuple[int, int] = (0, 1),
                 meter: ByteMeter | None = None) -> Iterator[Record]:
    """Events of history files, in order: one JSON event per line (Segment's S3 / GCS archives, gzip or not, and
    NDJSON), a JSON array of events, or a Tracking API batch body, or one such array or batch per line (request
    bodies kept one per line). A line that is not an event becomes a record
    that carries the reason (a dead letter, with file and line); nothing stops the import.

    Positions are ``@<file path>:<line>``; ``after`` skips up to and including one: the files before that file
    in ``paths`` and its lines up to that one. Named by path rather than by place, a position still holds when the
    list changed since (a relative ``--since`` lets the oldest archive hour fall out of the window); a path no
    longer listed replays every file given (applying an event again changes nothing). A ``<file index>:<line>``
    of an older version counts by place. ``shard`` (k, n) lets n
    processes share an import (the state is order-independent, so the shares may apply in any order, save which
    profile keeps an identifier that merge protection stops from linking two; each has its own positions to resume
    from): with at least n files, process k takes every n-th file whole (each
    file is read once); else the k-th of every n runs of ``SHARD_LINES`` lines (array elements), skipping the
    others before parsing them."""
    skip_file, skip_line = -1, -1
    if after:
        f, _, ln = after.rpartition(":")
        skip_line = int(ln)
        if not f.startswith("@"):
            skip_file = int(f)
        elif f[1:] in paths:
            skip_file = paths.index(f[1:])
    by_file = shard[1] > 1 and len(paths) >= shard[1]
    before = 0  # bytes of the files already read
    for index, path in enumerate(paths):
        size = 0 if path == "-" else Path(path).stat().st_size
        if index < skip_file or (by_file and index % shard[1] != shard[0]):
            before += size
            continue
        lines_of = (0, 1) if by_file else shard
        name = "stdin" if path == "-" else Path(path).name
        stream, raw = open_history(path)
        line = 0
        try:
            first, blank = stream.readline(), 0
            while first and not first.strip():
                first, blank = stream.readline(), blank + 1
            head, whole_line = first.lstrip()[:1], _is_json(first)
            # a document: an array (unless a whole one per line: more follows) or a pretty-printed object
            if (head == b"[" and not (whole_line and stream.peek(1).strip())) or (head == b"{" and not whole_line):
                records = _document_records(first + stream.read(), name, "@" + path, lines_of)  # array, pretty
            else:
                records = _line_records(itertools.chain([first], stream), name, "@" + path, 1 + blank, lines_of)
            for n, rec in enumerate(records):
                if meter is not None and path != "-" and n % 256 == 0:  # tell() costs a system call
                    meter.done = before + raw.tell()
                line = int(rec.position.rpartition(":")[2])
                if index == skip_file and line <= skip_line:
                    continue
                yield rec
        except DAMAGED as exc:  # a copy cut short, a corrupt block: what was read stands, the next file follows
            reason = (f"{name} is damaged ({type(exc).__name__}: {exc}) after line {line}: the rest of it was not "
                      "read; replace the file and import it again (what applied is then a duplicate)")
            mine = by_file or shard[0] == 0  # shares of one file's lines: the first share says it once
            if mine and not (index == skip_file and line + 1 <= skip_line):
                yield Record(Item(None, b"", reason), f"{name}:{line + 1}", f"@{path}:{line + 1}")
        finally:
            before += size
            if path != "-":
                stream.close()


def _is_json(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


def _mine(number: int, shard: tuple[int, int]) -> bool:
    """Whether line (or element) ``number`` (from 1) belongs to ``shard``."""
    return shard[1] == 1 or ((number - 1) // SHARD_LINES) % shard[1] == shard[0]


def _line_records(stream: Iterable[bytes], name: str, file: str, first_line: int,
                  shard: tuple[int, int]) -> Iterator[Record]:
    for n, line in enumerate(stream, first_line):
        if not _mine(n, shard):
            continue
        line = line.strip()
        if not line:
            continue
        where, position = f"{name}:{n}", f"{file}:{n}"
        try:
            doc = parse_json(line)
        except BodyError as exc:
            yield Record(Item(None, line, exc.message), where, position)
            continue
        if isinstance(doc, dict) and isinstance(doc.get("batch"), list):  # one Tracking API batch per line
            for m, it in enumerate(_batch_items(doc, line, name, n)):
                yield Record(it, f"{where} #{m}", position)
            continue
        if isinstance(doc, list):  # one Webhooks (Actions) batch per line: bodies kept as they came
            for m, it in enumerate(_numbered_items(doc, name, n), 1):
                yield Record(it, f"{where} #{m}", position)
            continue
        yield Record(_history_item(doc, None, name, n), where, position)


def _document_records(body: bytes, name: str, file: str, shard: tuple[int, int]) -> Iterator[Record]:
    """A whole-file document: a JSON array of events, a Tracking API batch body, or one event. A file that is
    not one document after all (lines of which the first is broken) is read line by line."""
    try:
        doc = parse_json(body)
    except BodyError as exc:
        if body.lstrip()[:1] == b"{":
            yield from _line_records(body.splitlines(), name, file, 1, shard)
            return
        yield Record(Item(None, body[:DOCUMENT_SNIPPET], exc.message), f"{name}:1", f"{file}:1")
        return
    if isinstance(doc, dict) and isinstance(doc.get("batch"), list):
        items = _batch_items(doc, body, name, 0)
    elif isinstance(doc, list):
        items = [_history_item(e, None, name, n) for n, e in enumerate(doc, 1)]
    else:
        items = [_history_item(doc, None, name, 1)]
    for n, it in enumerate(items, 1):  # the element's number stands for its "line"
        if _mine(n, shard):
            yield Record(it, f"{name}#{n}", f"{file}:{n}")


DOCUMENT_SNIPPET = 64 * 1024  # of a file that is not JSON at all, what the dead letter keeps


def _batch_items(doc: dict[str, Any], raw: bytes, name: str, line: int) -> list[Item]:
    """A Tracking API batch from a file, split as the receiver splits one, but with its times as they are: a
    historical batch's sentAt says nothing about its sender's clock today."""
    try:
        events = batch_events(doc)
    except BodyError as exc:
        return [Item(None, raw[:DOCUMENT_SNIPPET], exc.message)]
    return _numbered_items(events, name, line)


def _numbered_items(events: list[Any], name: str, line: int) -> list[Item]:
    """The events of one line (a batch, an array) as items, each numbered within it for a generated messageId."""
    return [_history_item(e, None, name, line * 100_000 + n) for n, e in enumerate(events, 1)]


def _history_item(obj: Any, raw: bytes | None, name: str, line: int) -> Item:
    """An event from a file. Without a messageId it gets one from the file's name, line and content (re-importing
    the file adds nothing, wherever it lies now; two files of one name in two folders, such as daily exports, are
    two histories); without receivedAt, its own time (ties resolve the same on every import)."""
    if isinstance(obj, dict):
        extra: dict[str, Any] = {}
        if obj.get("messageId") in (None, ""):
            digest = hashlib.sha1(f"{name}:{line}:".encode())
            try:
                digest.update(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS))
            except orjson.JSONEncodeError:  # too deep: refused as such by item() below, whatever its id
                pass
            extra["messageId"] = "import-" + digest.hexdigest()[:24]
        if obj.get("receivedAt") is None:
            for key in ("timestamp", "originalTimestamp", "sentAt"):
                if isinstance(obj.get(key), str):
                    try:
                        extra["receivedAt"] = iso_ms(parse_timestamp(obj[key]))
                    except (InvalidEvent, ValueError, OverflowError, OSError):
                        pass
                    break
        if extra:
            return item({**obj, **extra})
    return item(obj, raw)


# --- the engine -----------------------------------------------------------------------------------------------

class Checkpoint:
    """Where a run got to, kept in Redis under a name made from its source and filters, so that the same command
    with ``--resume`` continues there. Saved after every applied chunk; deleted when the run completes."""

    def __init__(self, client: redis.Redis, space: str, name: str) -> None:
        self.client = client
        self.key = f"{Keys(space).prefix}replay:{name}"

    @staticmethod
    def name_of(*parts: object) -> str:
        return hashlib.sha1(orjson.dumps([str(p) for p in parts])).hexdigest()[:16]

    def load(self) -> str | None:
        raw = self.client.hget(self.key, "position")
        return raw.decode() if raw else None

    def save(self, position: str) -> None:
        self.client.hset(self.key, mapping={"position": position, "at": now_ms()})
        self.client.expire(self.key, 30 * 86400)

    def clear(self) -> None:
        self.client.delete(self.key)


def run(client: redis.Redis, settings: Settings, space: str, records: Iterable[Record], options: Options,
        source: str, checkpoint: Checkpoint | None = None, progress: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None) -> Report:
    """Apply ``records`` to ``space``; invalid ones become dead letters (``source`` names where they came from).

    Stops between chunks when ``should_stop()`` (Ctrl-C, a cancelled job) and reports where: the checkpoint then
    holds that position."""
    rules = IdentityRules.from_settings(settings)
    store = SyncStore(client, settings)
    report = Report()
    start = time.monotonic()
    seen: set[tuple[int, int]] = set()  # dry run: messageIds met earlier in this input
    chunk: list[Record] = []
    last_position: str | None = None
    batch = CHUNK if not options.rate else max(1, min(CHUNK, int(options.rate // 10) or 1))
    paced = 0
    # One chunk is in Redis while the next is normalised: the two halves of the work overlap (redis-py waits on
    # the socket without the GIL), and chunks still apply strictly in order.
    pool = ThreadPoolExecutor(1, thread_name_prefix="replay-apply")
    pending: tuple[Future[None], int, str] | None = None  # the chunk in flight: its size and checkpoint

    def settle() -> None:
        """Wait for the chunk in flight, then count it, checkpoint it and sleep off what ran ahead of the rate."""
        nonlocal pending, paced
        if pending is None:
            return
        future, size, position = pending
        future.result()
        pending = None
        if progress:
            progress(size)
        paced += size
        if checkpoint and not options.dry_run:
            checkpoint.save(position)
        if options.rate:
            ahead = paced / options.rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)

    def flush() -> None:
        """Send the chunk to Redis (after the one in flight); its checkpoint is its last record's position."""
        nonlocal chunk, pending
        if not chunk:
            return
        prepared = _prepare(chunk, rules, now_ms())
        settle()
        pending = (pool.submit(_execute, client, store, space, prepared, options, source, report, seen),
                   len(chunk), chunk[-1].position)
        chunk = []

    try:
        for rec in records:
            # a position is complete once every record carrying it is in a chunk: stop only at a boundary
            if len(chunk) >= batch and rec.position != chunk[-1].position:
                flush()
                if should_stop and should_stop():
                    settle()
                    report.interrupted = True
                    report.stopped = last_position
                    break
            chunk.append(rec)
            last_position = rec.position
        else:
            flush()
            settle()
            if checkpoint and not options.dry_run:
                checkpoint.clear()
    except KeyboardInterrupt:  # the chunk in flight completes; the checkpoint then holds what is fully applied
        try:
            settle()
        except Exception:  # noqa: BLE001 - it stays unapplied; the resume applies it again
            pass
        pool.shutdown(wait=True)
        report.interrupted = True
        report.stopped = checkpoint.load() if checkpoint else None
        report.seconds = time.monotonic() - start
        raise Interrupted(report) from None
    except (StoreUnavailable, *REDIS_DOWN) as exc:
        # Redis refused a chunk (down, read-only after a failover, out of memory, or STATE_WAIT_REPLICAS replicas
        # that did not acknowledge it): the checkpoint holds what was applied before it, and a resume starts there
        # (what the refused chunk did apply is then skipped as duplicates, or applied again if a failover lost it)
        report.interrupted = True
        report.stopped = checkpoint.load() if checkpoint else None
        report.seconds = time.monotonic() - start
        raise Interrupted(report, f"Redis refused a chunk: {exc}") from exc
    finally:
        pool.shutdown(wait=True)
    report.seconds = time.monotonic() - start
    return report


class Interrupted(Exception):
    """Ctrl-C during a run, or Redis refusing a chunk (``reason``); ``report`` says what was done and where to
    resume."""

    def __init__(self, report: Report, reason: str | None = None) -> None:
        super().__init__(reason or "interrupted")
        self.report = report
        self.reason = reason


def _kind(obj: Any) -> str:
    return str(obj.get("type", "?")).lower()[:20] if isinstance(obj, dict) else "?"


@dataclass
class Prepared:
    """A chunk, normalised: what the store applies, and what is invalid already."""

    chunk: list[Record]
    now: int
    good: list[tuple[Record, Event]]
    invalid: list[tuple[Record, str]]


def _prepare(chunk: list[Record], rules: IdentityRules, now: int) -> Prepared:
    """Normalise a chunk. An event from a file with no time of its own is applied as received ``now``, and that
    receipt goes into the bytes that are logged (and archived), as the receiver does: a later replay of the log
    or the archive then applies it as of the same time, not as of the replay's."""
    good: list[tuple[Record, Event]] = []
    invalid: list[tuple[Record, str]] = []
    for rec in chunk:
        try:
            if rec.item.error:
                raise InvalidEvent(rec.item.error)
            if rec.received_ms is None and isinstance(rec.item.obj, dict) and rec.item.obj.get("receivedAt") is None:
                rec = replace(rec, item=item(rec.item.obj, rec.item.raw, iso_ms(now)))
            good.append((rec, normalise(rec.item.obj, rec.received_ms or now, rules)))
        except InvalidEvent as exc:
            invalid.append((rec, str(exc)))
    return Prepared(chunk, now, good, invalid)


def _execute(client: redis.Redis, store: SyncStore, space: str, p: Prepared, options: Options, source: str,
             report: Report, seen: set[tuple[int, int]]) -> None:
    """Apply a prepared chunk (one pipeline), keep what failed as dead letters, remove dead letters that applied."""
    for rec, _ in p.invalid:
        report.counts[(_kind(rec.item.obj), "invalid")] += 1
    if options.dry_run:
        events = [e for _, e in p.good]
        for event, dup in zip(events, _already_seen(client, store, space, events, p.now, seen, options.reapply),
                              strict=True):
            report.counts[(event.type, "duplicate" if dup else ("reapply" if options.reapply else "new"))] += 1
        return
    invalid = list(p.invalid)
    outcomes = store.apply(space, [(e, rec.item.raw) for rec, e in p.good], now=p.now, reapply=options.reapply,
                           generation=options.generation, logged_as=[rec.logged_as for rec, _ in p.good])
    for (rec, event), outcome in zip(p.good, outcomes, strict=True):
        status = {"ok": "applied", "deleted": "applied", "error": "invalid"}.get(outcome.status, outcome.status)
        report.counts[(event.type, status)] += 1
        if outcome.status == "error":
            invalid.append((rec, outcome.profile_id))
    counted = Counter(OUTCOME_OF.get(o.status, o.status) for o in outcomes) + Counter(rejected=len(p.invalid))
    count_applied(client, space, now_ms(), counted)  # the status's replay rates: one more round trip a chunk
    failed: set[bytes] = set()
    letters = []
    for rec, why in invalid:
        if rec.dead_letter is not None:
            failed.add(rec.dead_letter)  # it stays, with its reason
        else:
            letters.append((f"{rec.where}: {why}"[:500], rec.item.raw))
    if letters:
        store.dead_letters(space, letters, source)
    done = {rec.dead_letter for rec in p.chunk if rec.dead_letter is not None} - failed
    if done:
        report.dead_letters_removed += len(done)
        delete_dead_letters(client, space, sorted(done))


def _already_seen(client: redis.Redis, store: SyncStore, space: str, events: list[Event], now: int,
                  seen: set[tuple[int, int]], reapply: bool) -> list[bool]:
    """Dry run: which events the dedupe would drop (read-only; the same buckets the script checks). An older
    version's hash records are read in every bucket, where the script reads them only in the upgrade's first two:
    a hash record outside those (a rollback) reads as a duplicate here, which errs on the side of saying less."""
    if reapply:
        return [False] * len(events)
    keys = Keys(space)
    width = store.applier.bucket_width
    bucket = now // 1000 // width
    shards = store.applier.settings.dedupe_shards
    pipe = client.pipeline(transaction=False)
    digests = []
    for e in events:
        shard, dedupe_id = dedupe_digest(e.message_id)
        digests.append((shard, dedupe_id))
        for b in range(bucket - DEDUPE_BUCKETS, bucket + 1):  # the sets, and an older version's hashes
            pipe.sismember(keys.dedupe(b, shard % shards), dedupe_id)
            pipe.hexists(keys.legacy_dedupe(b, shard % shards), legacy_dedupe_field(dedupe_id))
    replies = pipe.execute()
    per = 2 * (DEDUPE_BUCKETS + 1)
    out = []
    for i, digest in enumerate(digests):
        dup = any(replies[i * per:(i + 1) * per]) or digest in seen
        seen.add(digest)
        out.append(dup)
    return out


# --- the RQ job behind POST /admin/replay ---------------------------------------------------------------------

def cancel_key(job_id: str) -> str:
    """Set by DELETE /admin/jobs/{id} while the job runs: it stops at its next chunk boundary."""
    return replay_cancel(job_id)


def records_for(client: redis.Redis, settings: Settings, space: str, spec: dict[str, Any],
                after: str | None) -> Iterator[Record]:
    """The records a replay request names (``spec`` as validated by the admin route)."""
    if spec.get("source") == "dead-letters":
        return dead_letter_records(client, space, spec.get("reason"), after, spec.get("id"))
    if spec.get("source") == "archive":
        from service.state.archive import archive_files

        files = [str(f) for f in archive_files(settings.event_archive_dir, space, spec.get("since_ms"),
                                               spec.get("until_ms"))] if settings.event_archive_dir else []
        return only(file_records(files, after), set(spec["types"]) if spec.get("types") else None, spec.get("event"))
    pids = None
    if spec.get("profile"):
        rules = IdentityRules.from_settings(settings)
        pid = resolve(client, rules, space, str(spec["profile"]))[2]
        pids = profile_filter(client, settings, space, pid) if pid else ProfileFilter(set(), set(), rules)
    types = set(spec["types"]) if spec.get("types") else None
    last = client.xrevrange(Keys(space).log, count=1)
    return only(log_records(client, space, spec.get("since_ms"), spec.get("until_ms"), pids, after,
                            until_id=last[0][0].decode() if last else None), types, spec.get("event"))


def replay_job(space: str, spec: dict[str, Any]) -> dict[str, Any]:
    """RQ entry point: run a replay, with its progress in the job's meta (``done``, ``total``) and a clean stop
    when cancelled. Resumable like the command: the checkpoint is named after the request."""
    from rq import Queue, get_current_job

    from service.state.connect import state_client

    settings = Settings.from_env()
    client = state_client(settings)
    job = get_current_job()
    source = spec.get("source", "log")
    key = Keys(space)
    total = client.xlen(key.dead_letters if source == "dead-letters" else key.log) if source != "archive" else 0
    if spec.get("id"):
        total = 1
    named = {k: v for k, v in spec.items() if k not in ("resume", "dry_run", "rate", "since_ms", "until_ms")}
    checkpoint = Checkpoint(client, space, Checkpoint.name_of("http", space, sorted(named.items())))
    after = checkpoint.load() if spec.get("resume") else None
    done = 0
    last_save = 0.0

    def progress(n: int) -> None:
        nonlocal done, last_save
        done += n
        if job is not None and time.monotonic() - last_save >= 1:
            last_save = time.monotonic()
            job.meta.update(done=done, total=total)
            job.save_meta()

    def should_stop() -> bool:
        return job is not None and bool(job.connection.exists(cancel_key(job.id)))

    options = Options(dry_run=bool(spec.get("dry_run")), rate=spec.get("rate", DEFAULT_REPLAY_RATE) or None,
                      reapply=source != "dead-letters")
    report = run(client, settings, space, records_for(client, settings, space, spec, after), options, "replay",
                 checkpoint,
                 progress, should_stop)
    if job is not None:
        job.meta.update(done=done, total=total, stopped=report.interrupted)
        job.save_meta()
        if not options.dry_run:  # deletions applied: as the receiver does
            queue_purge_if_due(client, Queue(QUEUE_NAME, connection=job.connection), space)
    return {"space": space, "source": source, "rate": options.rate or 0, **report.as_dict()}
