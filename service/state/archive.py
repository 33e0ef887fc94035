"""The event archive: events leave the Redis log for gzip NDJSON files before the log trims them, laid out as
Segment's own S3 destination lays out its logs (https://segment.com/docs/connections/storage/catalog/amazon-s3/):

    EVENT_ARCHIVE_DIR/segment-logs/<space>/<received day, epoch ms>/<received hour, epoch ms>.gz

one event per line, as received, by the hour its entry was logged. With an archive, the archiver owns the log's
trimming (the apply script no longer trims): it appends what the log holds past its cursor to the hour files,
makes them durable (fsync), moves the cursor, and only then trims the log to ``EVENT_LOG_RETENTION``, never past
the cursor. A crash between writing and moving the cursor archives some events twice; archive replays apply
events again idempotently (``reapply``), so a line written twice changes nothing.

A GDPR deletion removes the user's events from the files too: the apply script records the erased userIds and
anonymousIds, and ``purge_archive`` rewrites the files that hold their events (to a temporary file, fsynced,
renamed over the old one).
"""

from __future__ import annotations

import gzip
import os
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import orjson
import redis

from service.config import Settings
from service.spec.bodies import BodyError, Unparsed, item, object_members, parse_json
from service.spec.clock import now_ms
from service.spec.events import InvalidEvent, effective_ms, iso_ms, normalise, parse_timestamp
from service.spec.identity import IdentityRules
from service.spec.keys import DAY_MS, Keys

HOUR_MS = 3_600_000
READ = 5000  # log entries per read
LOCK_TTL_MS = 120_000


def space_dir(root: str | Path, space: str) -> Path:
    return Path(root) / "segment-logs" / space


def hour_file(root: str | Path, space: str, entry_ms: int) -> Path:
    day = entry_ms - entry_ms % DAY_MS
    hour = entry_ms - entry_ms % HOUR_MS
    return space_dir(root, space) / str(day) / f"{hour}.gz"


def archive_files(root: str | Path, space: str, since_ms: int | None = None,
                  until_ms: int | None = None) -> list[Path]:
    """The space's archive files in time order, those of hours that overlap [since, until]."""
    out = []
    base = space_dir(root, space)
    if not base.is_dir():
        return []
    for day in sorted((d for d in base.iterdir() if d.name.isdigit()), key=lambda d: int(d.name)):
        for f in sorted((f for f in day.iterdir() if f.name.endswith(".gz") and f.name[:-3].isdigit()),
                        key=lambda f: int(f.name[:-3])):
            hour = int(f.name[:-3])
            if (since_ms is None or hour + HOUR_MS > since_ms) and (until_ms is None or hour <= until_ms):
                out.append(f)
    return out


def _lock(client: redis.Redis, space: str) -> str | None:
    token = uuid.uuid4().hex
    return token if client.set(Keys(space).archive_lock, token, nx=True, px=LOCK_TTL_MS) else None


def _unlock(client: redis.Redis, space: str, token: str) -> None:
    key = Keys(space).archive_lock
    if client.get(key) == token.encode():
        client.delete(key)


def archive_space(client: redis.Redis, settings: Settings, space: str) -> dict[str, int]:
    """Move what the log holds past the cursor into the hour files, then trim the log (never past the cursor)."""
    root = settings.event_archive_dir
    if not root:
        return {"archived": 0, "trimmed": 0}
    token = _lock(client, space)
    if token is None:
        return {"archived": 0, "trimmed": 0, "busy": 1}
    k = Keys(space)
    archived = 0
    try:
        cursor = (client.get(k.archive_cursor) or b"0-0").decode()
        while True:
            rows = client.xrange(k.log, min=f"({cursor}", max="+", count=READ)
            if not rows:
                break
            by_hour: dict[Path, list[bytes]] = defaultdict(list)
            for entry_id, fields in rows:
                ms = int(entry_id.split(b"-")[0])
                by_hour[hour_file(root, space, ms)].append(with_receipt(fields.get(b"e", b"{}"), ms))
            for path, lines in by_hour.items():
                _append(client, space, path, lines)
            cursor = rows[-1][0].decode()
            client.set(k.archive_cursor, cursor)  # only once the lines are on disk
            client.pexpire(k.archive_lock, LOCK_TTL_MS)
            archived += len(rows)
            if len(rows) < READ:
                break
        # the log keeps EVENT_LOG_RETENTION, and nothing that is not archived yet: MINID keeps the cursor's entry
        # and every later one (an entry of the cursor's millisecond logged after the read is not archived yet).
        # Not while a rebuild runs: it reads the files up to the log's first entry, then the log, and what a trim
        # moved in between would be in neither.
        retained = now_ms() - int(settings.event_log_retention * 1000)
        minid = str(retained) if retained < int(cursor.split("-")[0]) else cursor
        trimmed = 0
        if cursor != "0-0" and not client.exists(k.rebuild_lock):
            trimmed = client.xtrim(k.log, minid=minid, approximate=False)
    finally:
        _unlock(client, space, token)
    return {"archived": archived, "trimmed": int(trimmed)}


def with_receipt(raw: bytes, entry_ms: int) -> bytes:
    """An archived line carries its receipt time, as the log entry's id does: an event logged without
    ``receivedAt`` (an import of an event with no time, by an older version) gets the entry's, so that a replay of
    the archive applies it as of then, not as of the replay."""
    try:
        obj = parse_json(raw)
    except BodyError:
        return raw
    if not isinstance(obj, dict) or obj.get("receivedAt") is not None:  # at the top: a nested one is not it
        return raw
    return item(obj, None, iso_ms(entry_ms)).raw


def _append(client: redis.Redis, space: str, path: Path, lines: list[bytes]) -> None:
    """Append one gzip member (concatenated members are one gzip stream) and make it durable. A failed append
    (disk full, an exception) is cut off again, so that the file stays readable to its end; one that no code saw
    fail (SIGKILL, a lost machine) is cut off before the next write (``_repair``), by the size recorded after
    each durable write (``Keys.archive_sizes``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair(client, space, path)
    with open(path, "ab") as raw:
        size = raw.tell()
        try:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
                gz.write(b"\n".join(lines) + b"\n")
            raw.flush()
            os.fsync(raw.fileno())
        except BaseException:
            raw.truncate(size)
            raise
        _written(client, space, path, raw.tell())


def _file_key(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def _written(client: redis.Redis, space: str, path: Path, size: int) -> None:
    client.hset(Keys(space).archive_sizes, _file_key(path), size)


def _repair(client: redis.Redis, space: str, path: Path) -> None:
    """Cut off the torn tail a killed write left past the file's last recorded whole size (under the archive lock)."""
    known = client.hget(Keys(space).archive_sizes, _file_key(path))
    if known is not None and path.exists() and path.stat().st_size > int(known):
        with open(path, "r+b") as raw:
            raw.truncate(int(known))
            os.fsync(raw.fileno())


def archive_job() -> dict[str, dict[str, int]]:
    """RQ entry point, every minute from ``persona-sync cron``: archive every space."""
    from service.state.connect import state_client
    from service.state.status import spaces

    settings = Settings.from_env()
    client = state_client(settings)
    return {space: archive_space(client, settings, space) for space in spaces(client)}


def archived_lines(path: Path) -> Iterator[bytes]:
    with gzip.open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield line.rstrip(b"\n")


# Forget the erased ids a purge is done with, unless erased again since it read them (their time moved): a
# deletion applied while the purge ran keeps its ids for its own purge job. KEYS: forgotten:ids, forgotten:at,
# forgotten:until; ARGV: id, the erasure time read ('' for none), ...
FORGET_DONE = """
for i = 1, #ARGV, 2 do
  if (redis.call('HGET', KEYS[2], ARGV[i]) or '') == ARGV[i + 1] then
    redis.call('SREM', KEYS[1], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
    redis.call('HDEL', KEYS[3], ARGV[i])
  end
end
"""


def forget_done(client: redis.Redis, space: str, ids: Erased) -> None:
    """The purge of ``ids`` (as ``erased_ids`` read them) is done: they leave ``Keys.forgotten_ids``, but for those
    erased again meanwhile."""
    k = Keys(space)
    args: list[str] = []
    for value, erasure in ids.items():
        args += [value, "" if erasure.applied_text is None else erasure.applied_text]
    for i in range(0, len(args), 2000):
        client.eval(FORGET_DONE, 3, k.forgotten_ids, k.forgotten_at, k.forgotten_until, *args[i:i + 2000])


def purge_archive(client: redis.Redis, settings: Settings, space: str, wanted: Erased | None = None) -> int:
    """Rewrite the archive files that hold events of erased users (``wanted``, else ``erased_ids``); returns lines
    removed. Then the ids are forgotten (``forget_done``), the purge of the log and dead letters done before it.

    Runs in the purge job after a deletion, under the archiver's lock so that no file changes under it."""
    root = settings.event_archive_dir
    wanted = erased_ids(client, space) if wanted is None else wanted
    if not wanted:
        return 0
    if not root:  # no archive: nothing more to purge
        forget_done(client, space, wanted)
        return 0
    rules = IdentityRules.from_settings(settings)
    token = None
    deadline = time.monotonic() + LOCK_TTL_MS / 1000
    while token is None:
        token = _lock(client, space)
        if token is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the archiver of {space} holds its lock; the purge runs again with the next job")
            time.sleep(0.2)
    removed = 0
    try:
        for path in archive_files(root, space):
            _renew(client, space, token)
            _repair(client, space, path)
            kept, dropped = [], 0
            hour = int(path.name[:-3])  # the file's lines were logged within its hour
            for line in archived_lines(path):
                if belongs(line, wanted, hour + HOUR_MS, hour, rules, CLOCK_SKEW_MS):
                    dropped += 1
                else:
                    kept.append(line)
            if not dropped:
                continue
            tmp = path.with_suffix(".gz.tmp")
            with open(tmp, "wb") as raw:
                with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
                    if kept:
                        gz.write(b"\n".join(kept) + b"\n")
                raw.flush()
                os.fsync(raw.fileno())
            _renew(client, space, token)  # still ours: the archiver cannot have appended since we read the file
            os.replace(tmp, path)
            _written(client, space, path, path.stat().st_size)
            removed += dropped
        forget_done(client, space, wanted)
    finally:
        _unlock(client, space, token)
    return removed


def _renew(client: redis.Redis, space: str, token: str) -> None:
    """Extend the lock if it is still ours; else stop (the archiver may have appended to a file we rewrite)."""
    key = Keys(space).archive_lock
    if client.get(key) != token.encode() or not client.pexpire(key, LOCK_TTL_MS):
        raise RuntimeError(f"the archive lock of {space} lapsed during the purge; the job is retried")


class Erasure(NamedTuple):
    """What the purge removes of an erased id's events: those that took effect at or before ``until`` (its latest
    deletion or erasure time: the state suppresses them), and those received at or before ``applied`` (when a
    profile holding it was last erased, as it stood then, later events and all). None and None: every one."""

    until: int | None = None
    applied: int | None = None
    applied_text: str | None = None  # as stored: whether it changed when the purge is done


Erased = dict[str, Erasure]
"""Erased userIds, anonymousIds and emails (``Keys.forgotten_ids``), each with its ``Erasure``."""


def erased_record(record: bytes) -> tuple[int, str]:
    """An erased identifier's record in ``Keys.erased`` ('time|userId', written by apply.lua): the erasure's time
    (ms) and the deleted userId ('' for an erasure by profile id)."""
    at, _, uid = record.decode().partition("|")
    return int(at), uid


def erased_ids(client: redis.Redis, space: str) -> Erased:
    """The ids the purge removes events of, each with its ``Erasure``: up to its latest deletion as a userId
    (``Keys.deleted``) or erasure as an identifier (``Keys.erased``), and what was received until its profile was
    erased (``Keys.forgotten_at``). An event after both is a returning person's, which the state applied (only
    events at or before a deletion are suppressed), so the log, the dead letters and the archive keep it. A lift
    before the purge ran kept the time its records gave (``Keys.forgotten_until``); an id without any of these
    loses all its events."""
    k = Keys(space)
    ids = sorted(i.decode() for i in client.smembers(k.forgotten_ids))
    if not ids:
        return {}
    wanted, until = set(ids), dict[str, int]()

    def later(value: str, at: int) -> None:
        if value in wanted and at > until.get(value, -1):
            until[value] = at

    for value, at in zip(ids, client.hmget(k.deleted, ids), strict=True):
        if at is not None:
            later(value, int(float(at)))
    for ident, record in client.hscan_iter(k.erased, count=1000):
        kind, _, value = ident.decode().partition(":")
        if kind in ("user_id", "anonymous_id", "email"):
            later(value, erased_record(record)[0])
    for value, at in client.hgetall(k.forgotten_until).items():  # records lifted before the purge ran
        later(value.decode(), int(at))
    applied = {v.decode(): at.decode() for v, at in client.hgetall(k.forgotten_at).items()}
    return {i: Erasure(until.get(i), int(applied[i]) if i in applied else None, applied.get(i)) for i in ids}


def belongs(line: bytes, ids: Erased, received_ms: int, received_from: int | None = None,
            rules: IdentityRules | None = None, skew: int = 0) -> bool:
    """Whether a raw event (an archived line, a logged event received at ``received_ms``; for an archived line,
    received in [``received_from``, ``received_ms``]) is one of an erased user's (``event_belongs``)."""
    try:
        event = parse_json(line)
    except BodyError:
        return names(line, ids)  # unreadable: dropped if it names an erased id
    return event_belongs(event, ids, received_ms, received_from, rules, skew)


_NUMBER = re.compile(rb"-?[0-9]+")


_ID_FIELD = rb'"(?:userId|anonymousId|previousId|email|id)"\s*:\s*'


def names(raw: bytes, ids: Iterable[str]) -> bool:
    """Whether text that cannot be decoded names one of ``ids`` as an identifier: a userId, anonymousId,
    previousId, email or an external id's ``id``, as a JSON string or, for an id that is a number (a numeric
    userId, sent as ``"userId":4711``), as a bare value (a ``"quantity":4711`` is not an id)."""
    for i in ids:
        b = i.encode()
        if b'"%s"' % b not in raw and not _NUMBER.fullmatch(b):
            continue
        text = re.escape(b)
        if re.search(_ID_FIELD + rb'"' + text + rb'"', raw, re.IGNORECASE):
            return True
        if _NUMBER.fullmatch(b) and re.search(_ID_FIELD + text + rb"\s*[,}\]]", raw):
            return True
    return False


_TIMES = ("timestamp", "originalTimestamp", "receivedAt", "sentAt")


# An erasure's time is Redis's (``Keys.forgotten_at``), as are the log's entry ids; the receipt a dead letter or an
# archived line carries is a web host's: one stamped up to this long after the erasure counts as before it.
CLOCK_SKEW_MS = 1_000


def event_belongs(event: object, ids: Erased, received_ms: int, received_from: int | None = None,
                  rules: IdentityRules | None = None, skew: int = 0) -> bool:
    """Whether a decoded event, received at ``received_ms`` (or at some time from ``received_from`` on; by a clock
    up to ``skew`` ms off Redis's), is one of an erased user's, as the state judged it: it names an erased id (its
    userId, anonymousId, previousId or email) and either took effect at or before that id's erasure or was
    received before its profile was erased. One that the
    state gave someone else is theirs: its first identifier by priority (``rules``) is not an erased one (a shared
    device's anonymousId beside another person's userId or email; the state dropped the erased id from it). An
    event the state could not read, and an element of a batch too deep to decode (``Unparsed``: judged by its top
    level, or else by its text), go if they name an erased id."""
    if isinstance(event, Unparsed):  # its top level is read without decoding what lies deeper
        raw = event.raw
        try:
            members = object_members(raw)
            event = {f: orjson.loads(members[f]) for f in ("userId", "anonymousId", "previousId", *_TIMES)
                     if f in members}
        except (ValueError, orjson.JSONDecodeError):  # not even that: dropped if its text names an erased id
            return names(raw, ids)
    if not isinstance(event, dict):
        return False
    named = [f"{event[f]}".strip() for f in ("userId", "anonymousId", "previousId")
             if isinstance(event.get(f), str | int)]
    bounds = [ids[i] for i in (*named, *_emails(event), *_external_ids(event)) if i in ids]
    if not bounds:
        return False
    at = effective_ms(event, received_ms)
    if rules is not None:
        try:
            applied = normalise(event, received_ms, rules)
        except InvalidEvent:
            pass  # never applied: it goes if it names an erased id
        else:
            bounds += [ids[v] for _, v in applied.identifiers if v in ids]  # context.externalIds too
            lead = applied.identifiers[0] if applied.identifiers else None
            # the erased ids kept for the purge are userIds, anonymousIds and emails: a device's or a custom id
            # ahead of them may be the erased person's too, and the event goes
            if lead and lead[0] in _PURGED_TYPES and lead[1] not in ids:
                return False
            at = applied.ts
    if any(b.until is None and b.applied is None for b in bounds):
        return True
    first = received_ms if received_from is None else _received_from(event, received_from, received_ms)
    if any(b.applied is not None and first <= b.applied + skew for b in bounds):
        return True
    return at is None or any(b.until is not None and at <= b.until for b in bounds)


_PURGED_TYPES = ("user_id", "anonymous_id", "email")  # the identifier types apply.lua keeps in forgotten:ids


def _external_ids(event: dict) -> Iterator[str]:
    """The values of the event's ``context.externalIds`` of the types the purge keeps (as the state reads them)."""
    context = event.get("context")
    external = context.get("externalIds") if isinstance(context, dict) else None
    for entry in external if isinstance(external, list) else ():
        kind = str(entry.get("type", "")).strip().lower() if isinstance(entry, dict) else ""
        value = entry.get("id") if kind in _PURGED_TYPES else None
        if isinstance(value, str | int) and not isinstance(value, bool):
            text = f"{value}".strip()
            yield text.lower() if kind == "email" else text


def _received_from(event: dict, earliest: int, latest: int) -> int:
    """When an archived event was received at the earliest: its file's hour, or its ``receivedAt`` when later
    (ours, or Segment's, which came before ours)."""
    try:
        return max(earliest, min(parse_timestamp(event.get("receivedAt")), latest))
    except InvalidEvent:
        return earliest


def _emails(event: dict) -> Iterator[str]:
    """The emails an event identifies its person by, normalised as identity resolution does: an identify's
    traits and ``context.traits`` (not a group's traits, which are the account's, nor properties)."""
    context = event.get("context")
    holders = [context.get("traits") if isinstance(context, dict) else None]
    if str(event.get("type", "")).strip().lower() == "identify":
        holders.append(event.get("traits"))
    for holder in holders:
        email = holder.get("email") if isinstance(holder, dict) else None
        if isinstance(email, str) and email.strip():
            yield email.strip().lower()
