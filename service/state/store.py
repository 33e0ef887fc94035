"""Apply events to Redis: one EVALSHA of ``lua/apply.lua`` per ``EVENTS_PER_CALL`` events, pipelined across a batch.

The argument building is pure (``Applier.call_args``); ``AsyncStore`` serves the web receiver and ``SyncStore`` the
workers and operator commands, so both paths apply an event through the very same script.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TypeVar

import orjson
import redis
import redis.asyncio as aredis
from redis.exceptions import ClusterError, RedisClusterException, TryAgainError

from service.config import Settings
from service.spec.clock import now_ms
from service.spec.events import Event, InvalidEvent, dedupe_digest, parse_timestamp
from service.spec.identity import IdentityRules
from service.spec.keys import REFUSALS_KEY, SPACES_KEY, Keys

SCRIPT = resources.files("service.state").joinpath("lua/apply.lua").read_text()
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
Pipe = TypeVar("Pipe", redis.client.Pipeline, aredis.client.Pipeline)
DEDUPE_BUCKETS = 2  # the window is split in 2 buckets: memory at most 1.5 x the window's ids, 3 lookups an event
DLQ_RAW_LIMIT = 1024 * 1024
BATCH_WAIT_FACTOR = 10  # a replay or import chunk waits this many STATE_WAIT_TIMEOUTs for its replicas
INDEX_PERIOD_MS = 3_600_000  # the longest period between two trims of a profile's /events index

# Dead letters are capped per space in entries (DEAD_LETTER_MAX) and in bytes (DEAD_LETTER_MAX_BYTES), oldest
# trimmed first. Each entry records its size in 'n'; KEYS[2] holds the sum. Sizes of entries written before 'n'
# existed are what their values hold, counted once when the sum is missing.
_DLQ_SIZE = """
local function size_of(fields)
  local n = 0
  for i = 1, #fields, 2 do
    if fields[i] == 'n' then return tonumber(fields[i + 1]) end
    n = n + #fields[i + 1]
  end
  return n
end
"""
# KEYS: stream, byte sum, the space's deleted userIds and erased identifiers (apply.lua). ARGV: most entries, most
# bytes, then reason, source, at, raw, userId, anonymousId, time (ms; '' unknown) for each entry. An entry of a
# deleted userId or an erased anonymousId at or before its deletion (or of no known time) is not kept: the purge
# of that person's data has run, and would never reach it.
DLQ_ADD = _DLQ_SIZE + """
local maxlen, maxbytes = tonumber(ARGV[1]), tonumber(ARGV[2])
local function erased(uid, aid, ts)
  local at = uid ~= '' and redis.call('HGET', KEYS[3], uid)
  if not at and aid ~= '' then
    at = redis.call('HGET', KEYS[4], 'anonymous_id:' .. aid)
    at = at and string.match(at, '^[^|]*')
  end
  return at and (ts == '' or tonumber(ts) <= tonumber(at))
end
local total = tonumber(redis.call('GET', KEYS[2]) or '')
if total == nil then
  total = 0
  local from = '-'
  while true do
    local rows = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', 100)
    for _, row in ipairs(rows) do total = total + size_of(row[2]) end
    if #rows < 100 then break end
    from = '(' .. rows[#rows][1]
  end
end
for i = 3, #ARGV, 7 do
  if not erased(ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]) then
    local n = #ARGV[i] + #ARGV[i + 1] + #ARGV[i + 2] + #ARGV[i + 3]
    redis.call('XADD', KEYS[1], '*', 'reason', ARGV[i], 'source', ARGV[i + 1], 'at', ARGV[i + 2], 'raw',
               ARGV[i + 3], 'n', n)
    total = total + n
  end
end
local len = redis.call('XLEN', KEYS[1])
while len > 0 and (len > maxlen or (total > maxbytes and len > 1)) do  -- the newest entry always stays
  local row = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
  redis.call('XDEL', KEYS[1], row[1])
  total = total - size_of(row[2])
  len = len - 1
end
if total < 0 or len == 0 then total = 0 end
redis.call('SET', KEYS[2], total)
return total
"""
# KEYS: stream, byte sum. ARGV: entry ids. Returns the bytes freed.
DLQ_DELETE = _DLQ_SIZE + """
local freed = 0
for _, id in ipairs(ARGV) do
  local rows = redis.call('XRANGE', KEYS[1], id, id)
  if #rows == 1 then
    redis.call('XDEL', KEYS[1], id)
    freed = freed + size_of(rows[1][2])
  end
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  local left = redis.call('DECRBY', KEYS[2], freed)
  if left < 0 or redis.call('XLEN', KEYS[1]) == 0 then redis.call('SET', KEYS[2], 0) end
end
return freed
"""


@dataclass(frozen=True)
class Outcome:
    status: str  # ok | duplicate | suppressed | deleted
    profile_id: str = ""  # suppressed: a profile the event linked to its deleted userId, erased with it (or "")
    created: bool = False
    merged: int = 0

    @property
    def erased(self) -> bool:
        """A suppressed event that erased what it linked to its deleted userId: the log and archive need a purge."""
        return self.status == "suppressed" and bool(self.profile_id)


class StoreUnavailable(RuntimeError):
    """Redis could not be reached or refused the write: answer 503 so Segment retries."""


class NotReplicated(StoreUnavailable):
    """The events are applied on the primary, but fewer replicas than STATE_WAIT_REPLICAS acknowledged them within
    STATE_WAIT_TIMEOUT: the receiver answers 503, and Segment's retry finds them duplicates (answered 200 once the
    replicas have them, or applied afresh if a failover lost them). ``outcomes`` are what the primary did."""

    def __init__(self, outcomes: list[Outcome], acknowledged: int, wanted: int) -> None:
        super().__init__(f"applied on the primary; {acknowledged} of {wanted} replica(s) acknowledged in time")
        self.outcomes = outcomes
        self.acknowledged = acknowledged


# Redis unreachable or not serving (a Cluster without a primary for the slot, a resharding's TRYAGAIN, a Sentinel
# with no primary to name): the request is refused with 503 and Segment retries it.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, redis.ReadOnlyError, OSError,
              ClusterError, RedisClusterException, TryAgainError)


class Applier:
    """Builds the script arguments for one space from the settings (pure)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rules = IdentityRules.from_settings(settings)
        self.rules_json = self.rules.script_rules()
        self.bucket_width = max(1, math.ceil(settings.dedupe_window / DEDUPE_BUCKETS))

    def call_args(self, keys: Keys, events: Sequence[tuple[Event, bytes, str | None]], now_ms: int,
                  reapply: bool = False, generation: str | None = None) -> Call:
        """KEYS and ARGV of one call of the apply script for (event, raw, logged_as) in order. ``reapply``: a
        replay of the event log (no dedupe, not logged again); ``generation``: another than the space's current
        one (None), which a rebuild writes or an erasure reaches ("" is the original one); ``logged_as``: in a
        replay, the log entry the event is (its profile's event index points there). See apply.lua's header."""
        bucket = now_ms // 1000 // self.bucket_width
        # with an archive, the archiver trims the log once events are in its files (service/state/archive.py)
        retention_ms = int(self.settings.event_log_retention * 1000)
        minid = 0 if self.settings.event_archive_dir else max(0, now_ms - retention_ms)
        older = ",".join(str(b) for b in range(bucket - DEDUPE_BUCKETS, bucket))
        expiry = (bucket + DEDUPE_BUCKETS + 1) * self.bucket_width  # the current bucket's ids outlive the window
        # a profile's /events index is trimmed and its expiry moved once per period (a sixteenth of the retention,
        # at most an hour): it keeps the events since the period's start less the retention, until its end plus
        # the retention, so that every event of one period would set the same bounds
        period = max(1000, min(INDEX_PERIOD_MS, retention_ms // 16))
        start = now_ms // period * period
        gen = "-" if generation is None else generation
        args: list = [f"{keys.prefix}\t{bucket}\t{now_ms}\t{minid}\t"
                      f"{'reapply' if reapply else 'live'}\t{gen}\t{retention_ms}\t"
                      f"{older}\t{expiry}\t({start - retention_ms}\t{start + period + retention_ms}\t{start}",
                      self.rules_json]
        shards = self.settings.dedupe_shards
        for event, raw, logged_as in events:
            shard, dedupe_id = dedupe_digest(event.message_id)
            args += [f"{shard % shards:x}", str(dedupe_id), event.script_payload(), raw]
            if reapply:
                args.append(logged_as or "-")
        return [keys.log], args

    def dead_letter_args(self, keys: Keys, entries: Sequence[tuple[str, bytes]], source: str,
                         now_ms: int) -> tuple[list[str], list]:
        """KEYS and ARGV of ``DLQ_ADD`` for (reason, raw) entries; a body is kept up to 1 MiB (and the byte cap)."""
        cap = min(DLQ_RAW_LIMIT, self.settings.dead_letter_max_bytes)
        args: list = [self.settings.dead_letter_max, self.settings.dead_letter_max_bytes]
        for reason, raw in entries:
            args += [reason[:500], source, now_ms, raw[:cap], *author(raw)]
        return dead_letter_keys(keys), args


def dead_letter_keys(keys: Keys) -> list[str]:
    """KEYS of ``DLQ_ADD``."""
    return [keys.dead_letters, keys.dead_letter_bytes, keys.deleted, keys.erased]


def author(raw: bytes) -> tuple[str, str, str]:
    """The userId, anonymousId and time (ms, as text; '' where unknown) of a dead letter that is one event, for
    ``DLQ_ADD`` to leave out those of deleted people. The time is the event's own, never later than its receipt."""
    if not raw.lstrip().startswith(b"{"):
        return "", "", ""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "", "", ""
    if not isinstance(obj, dict):
        return "", "", ""
    received = _time_of(obj.get("receivedAt"))
    own = obj.get("timestamp")
    if own is None:  # no time of its own: its receipt's
        ts = received
    else:  # unreadable: unknown, which a deleted person's entry is not kept with
        ts = _time_of(own)
        if ts is not None and received is not None:
            ts = min(ts, received)
    return _ident(obj.get("userId")), _ident(obj.get("anonymousId")), "" if ts is None else str(ts)


def _time_of(value: object) -> int | None:
    try:
        return parse_timestamp(value)
    except (InvalidEvent, ValueError, OverflowError):
        return None


def _ident(value: object) -> str:
    return f"{value}".strip() if isinstance(value, str | int) and not isinstance(value, bool) else ""


def _outcome(line: str) -> Outcome:
    """An event's outcome line: 'status \t profile id \t created \t merged', or 'error \t message'."""
    status, _, rest = line.partition("\t")
    if status == "error":  # the script's pcall caught it
        return Outcome("error", f"store error: {rest}"[:300])
    pid, _, rest = rest.partition("\t")
    created, _, merged = rest.partition("\t")
    return Outcome(status, pid, created == "1", int(merged) if merged else 0)


def _outcomes(replies: Sequence, sizes: Sequence[int]) -> list[Outcome]:
    """One outcome per event, from one reply per call (of ``sizes[i]`` events). A script error is reported per
    event (status "error"), and an error of a whole call for each of its events: the receiver keeps those events
    as dead letters for replay once the cause is fixed (what did apply is then dropped as a duplicate)."""
    out = []
    for r, n in zip(replies, sizes, strict=True):
        if isinstance(r, REDIS_DOWN) or _refused_for_now(r):
            raise StoreUnavailable(str(r))
        if isinstance(r, Exception):
            out += [Outcome("error", f"store error: {r}"[:300])] * n
        else:
            text = r.decode(errors="replace") if isinstance(r, bytes) else str(r)  # one line per event
            out += [_outcome(line) for line in text.split("\n")] if n else []
    return out


def _refused_for_now(reply: object) -> bool:
    """Redis refuses the call for a while, not the events: maxmemory reached under noeviction (until memory is
    freed); BUSY, another script running past ``lua-time-limit`` (``persona-sync move-space`` of a large space);
    READONLY, a primary demoted to a replica under its clients by a failover; NOREPLICAS, min-replicas-to-write
    not met; "non local key", a Cluster slot being migrated (``persona-sync move-space``, ``redis-cli --cluster
    reshard``) holding only some of the keys a script needs. Answer 503 so that Segment retries, rather than keeping
    good events as dead letters. apply.lua re-raises these when a script meets them, so that they refuse the whole
    call."""
    if not isinstance(reply, redis.ResponseError):  # a script's reply (its events' outcomes), never turned to text
        return False
    text = str(reply)
    return isinstance(reply, redis.exceptions.OutOfMemoryError) or text.startswith("BUSY ") or any(
        m in text for m in _REFUSALS)


_REFUSALS = ("OOM command not allowed", "READONLY You can't write", "NOREPLICAS Not enough good replicas",
             "non local key in a cluster node")


Call = tuple[list[str], list]  # (keys, args) of one EVALSHA of the apply script
EVENTS_PER_CALL = 100  # events per script call: fewer calls to parse and run, while one call stays short (~3 ms)


def _calls(applier: Applier, keys: Keys, items: Sequence[tuple[Event, bytes]], now: int, reapply: bool = False,
           generation: str | None = None,
           logged_as: Sequence[str | None] | None = None) -> tuple[list[Call], list[int]]:
    """The script calls for ``items`` in order, ``EVENTS_PER_CALL`` events each, and how many events each holds."""
    entries = [(e, raw, logged_as[i] if logged_as is not None else None) for i, (e, raw) in enumerate(items)]
    calls, sizes = [], []
    for i in range(0, len(entries), EVENTS_PER_CALL):
        group = entries[i:i + EVENTS_PER_CALL]
        calls.append(applier.call_args(keys, group, now, reapply, generation))
        sizes.append(len(group))
    return calls, sizes


def _queue(pipe: Pipe, calls: Sequence[Call], which: Sequence[int] | None = None) -> Pipe:
    """Queue the apply script for ``calls`` (or only those at the indexes ``which``) on a sync or async pipeline."""
    for i in range(len(calls)) if which is None else which:
        keys, args = calls[i]
        # the command rather than ``pipe.evalsha``: redis-py's Cluster pipeline blocks that method (it cannot know
        # a script's keys in general), yet routes the command by its declared keys, which is what we need
        pipe.execute_command("EVALSHA", SCRIPT_SHA, len(keys), *keys, *args)
    return pipe


def _noscript(replies: Sequence) -> list[int]:
    """Which calls of a pipeline met NOSCRIPT (the script cache is empty after a Redis restart or failover).

    Only those are re-run: another process may load the script while a pipeline runs, and the calls after that
    point have then been applied; running them again would report them as duplicates."""
    return [i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)]


@dataclass
class _Waiting:
    """A request's events queued for the next round trip of its space, and where its outcomes go."""

    items: Sequence[tuple[Event, bytes]]
    now: int
    done: asyncio.Future[list[Outcome]]


class AsyncStore:
    """The receiver's handle on STATE (redis.asyncio).

    Small requests (fewer events than a script call takes) of one space that arrive while its previous round trip
    to Redis is under way share the next one: their events go in the same script calls, each request's in its
    order, and each request gets its own outcomes (or the error of the round trip). At 30 concurrent single-event
    requests that is a few calls where there were 30: the script's per-call cost and redis-py's per-command cost
    (~180 µs of web CPU for a round trip on the benchmark machine) are shared, and no request waits longer than
    the round trip before its own. Larger requests go at once, as they fill calls of their own: making them wait
    would leave Redis idle between round trips."""

    def __init__(self, client: aredis.Redis, settings: Settings) -> None:
        self.client = client
        self.applier = Applier(settings)
        self._spaces: set[str] = set()
        self._dlq_add = client.register_script(DLQ_ADD)
        self._waiting: dict[str, list[_Waiting]] = {}  # space -> requests for its next round trip
        self._draining: set[str] = set()  # spaces with a round trip under way
        self._tasks: set[asyncio.Future[None]] = set()

    async def apply(self, space: str, items: Sequence[tuple[Event, bytes]], now: int | None = None) -> list[Outcome]:
        """Apply ``items`` in order, in the space's next round trip (shared with the requests that arrive
        meanwhile). With STATE_WAIT_REPLICAS, the pipeline ends with ``WAIT`` (on the same connection, so it covers
        these writes) and ``NotReplicated`` is raised when fewer replicas acknowledged."""
        if not items:
            return []
        now = now_ms() if now is None else now
        if len(items) >= EVENTS_PER_CALL:  # fills its own calls: sent at once, beside any round trip under way
            return await self._apply_now(space, items, now)
        waiting = _Waiting(items, now, asyncio.get_running_loop().create_future())
        self._waiting.setdefault(space, []).append(waiting)
        if space not in self._draining:
            self._draining.add(space)
            task = asyncio.ensure_future(self._drain(space))
            self._tasks.add(task)  # held until done: the loop keeps only weak references to tasks
            task.add_done_callback(self._tasks.discard)
        return await waiting.done

    async def _drain(self, space: str) -> None:
        """Round trips for ``space`` while requests wait for one, each taking every request queued so far."""
        try:
            while batch := self._waiting.pop(space, None):
                await self._round_trip(space, batch)
        finally:
            self._draining.discard(space)

    async def _round_trip(self, space: str, batch: list[_Waiting]) -> None:
        items = [item for w in batch for item in w.items]
        try:
            outcomes = await self._apply_now(space, items, max(w.now for w in batch))
        except NotReplicated as exc:  # each request learns its own outcomes, all of them not yet replicated
            for w, part in _shares(batch, exc.outcomes):
                _settle(w.done, error=NotReplicated(part, exc.acknowledged, self.applier.settings.state_wait_replicas))
            return
        except BaseException as exc:  # Redis down, refused, or unexpected: every request of the round trip fails
            for w in batch:
                _settle(w.done, error=exc)
            if not isinstance(exc, Exception):
                raise
            return
        for w, part in _shares(batch, outcomes):
            _settle(w.done, part)

    async def _apply_now(self, space: str, items: Sequence[tuple[Event, bytes]], now: int) -> list[Outcome]:
        """One round trip: the script calls for ``items`` in one pipeline (or one call)."""
        keys = Keys(space)
        calls, sizes = _calls(self.applier, keys, items, now)
        wait = self.applier.settings.state_wait_replicas
        new_space = space not in self._spaces
        acks: list[int] = []  # replicas that acknowledged, per WAIT
        try:
            if new_space and not wait:
                await self.client.sadd(SPACES_KEY, space)
            if len(calls) == 1 and not wait:  # one call: cheaper without a pipeline
                outcomes = _outcomes([await self._evalsha(*calls[0])], sizes)
                self._spaces.add(space)
                return outcomes
            pipe = self.client.pipeline(transaction=False)
            if new_space and wait:  # in the pipeline, so that its WAIT covers this write too
                pipe.sadd(SPACES_KEY, space)
            replies = await self._waited(_queue(pipe, calls), acks)
            if new_space and wait:
                replies.pop(0)
            if missing := _noscript(replies):  # Redis restarted: load the script, re-run only what did not run
                await self.client.script_load(SCRIPT)
                rerun = _queue(self.client.pipeline(transaction=False), calls, missing)
                for i, reply in zip(missing, await self._waited(rerun, acks), strict=True):
                    replies[i] = reply
            outcomes = _outcomes(replies, sizes)
        except REDIS_DOWN as exc:
            raise StoreUnavailable(str(exc)) from exc
        except redis.ResponseError as exc:  # OOM, BUSY, NOREPLICAS from the spaces SADD or a single call: 503 too
            if _refused_for_now(exc):
                raise StoreUnavailable(str(exc)) from exc
            raise
        self._spaces.add(space)
        return _replicated(outcomes, acks, wait)

    async def _waited(self, pipe: aredis.client.Pipeline, acks: list[int]) -> list:
        """Run ``pipe`` with a ``WAIT`` at its end when STATE_WAIT_REPLICAS asks for one; its count (0 when it
        failed: a primary that cannot WAIT has no replica to count on) goes to ``acks``, the replies are returned."""
        if not _add_wait(pipe, self.applier.settings, 1):
            return await pipe.execute(raise_on_error=False)
        return _take_ack(await pipe.execute(raise_on_error=False), acks)

    async def _evalsha(self, keys: list[str], args: list) -> object:
        try:
            return await self.client.evalsha(SCRIPT_SHA, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            await self.client.script_load(SCRIPT)
            return await self.client.evalsha(SCRIPT_SHA, len(keys), *keys, *args)
        except redis.ResponseError as exc:
            if isinstance(exc, REDIS_DOWN):
                raise
            return exc

    async def dead_letter(self, space: str, reason: str, raw: bytes, source: str) -> None:
        """Keep an authenticated body we refused where an operator can see and replay it (never anything that
        failed authentication: that is ``refusal``'s, metadata only)."""
        await self.dead_letters(space, [(reason, raw)], source)

    async def refusal(self, space: str, route: str, status: int, reason: str, size: int, addr: str) -> None:
        """Log a request refused before it was authenticated: metadata only, never a byte of its body.

        Nothing in it can be replayed; the log is capped (REFUSAL_LOG_MAX) and shared by every space."""
        fields = {"at": now_ms(), "space": space[:64], "route": route[:100], "status": status, "reason": reason[:200],
                  "bytes": size, "addr": addr[:64]}
        try:
            await self.client.xadd(REFUSALS_KEY, fields, maxlen=self.applier.settings.refusal_log_max,
                                   approximate=True)
        except (*REDIS_DOWN, redis.RedisError) as exc:  # OOM under noeviction too: the refusal stands regardless
            raise StoreUnavailable(str(exc)) from exc

    async def dead_letters(self, space: str, items: Sequence[tuple[str, bytes]], source: str) -> None:
        """Add dead letters in one script call, trimming the oldest past DEAD_LETTER_MAX or DEAD_LETTER_MAX_BYTES."""
        if not items:
            return
        keys, args = self.applier.dead_letter_args(Keys(space), items, source, now_ms())
        try:
            await self._dlq_add(keys=keys, args=args)
            if space not in self._spaces:  # a space whose every event so far was refused is still one to show
                await self.client.sadd(SPACES_KEY, space)
                self._spaces.add(space)
        except REDIS_DOWN as exc:
            raise StoreUnavailable(str(exc)) from exc
        except redis.ResponseError as exc:
            if _refused_for_now(exc):  # maxmemory, BUSY, a replica, NOREPLICAS: nothing kept, ask for a retry (503)
                raise StoreUnavailable(str(exc)) from exc
            raise


class SyncStore:
    """The same applier for workers and operator commands (blocking redis-py)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.applier = Applier(settings)

    def apply(self, space: str, items: Sequence[tuple[Event, bytes]], now: int | None = None,
              reapply: bool = False, generation: str | None = None,
              logged_as: Sequence[str | None] | None = None) -> list[Outcome]:
        """``logged_as``: for a replay of the log, each event's log entry id (see ``Applier.call_args``).

        With STATE_WAIT_REPLICAS, as the receiver does, each pipeline ends with ``WAIT``; a batch job waits ten
        times STATE_WAIT_TIMEOUT (``BATCH_WAIT_FACTOR``: it floods the replicas, and nobody waits on its answer)
        and raises ``NotReplicated`` when fewer replicas have the events: a replay or import then stops there,
        resumable, rather than report as done what a failover could lose."""
        if not items:
            return []
        now = now_ms() if now is None else now
        keys = Keys(space)
        calls, sizes = _calls(self.applier, keys, items, now, reapply, generation, logged_as)
        acks: list[int] = []
        pipe = _queue(self.client.pipeline(transaction=False), calls)
        pipe.sadd(SPACES_KEY, space)
        replies = self._waited(pipe, acks)[: len(calls)]
        if missing := _noscript(replies):  # as in ``AsyncStore.apply``: re-run only what did not run
            self.client.script_load(SCRIPT)
            rerun = _queue(self.client.pipeline(transaction=False), calls, missing)
            for i, reply in zip(missing, self._waited(rerun, acks), strict=True):
                replies[i] = reply
        return _replicated(_outcomes(replies, sizes), acks, self.applier.settings.state_wait_replicas)

    def _waited(self, pipe: redis.client.Pipeline, acks: list[int]) -> list:
        """``AsyncStore._waited`` for a batch job: ``WAIT`` (on the pipeline's connection, so that it covers its
        writes) up to ``BATCH_WAIT_FACTOR`` times STATE_WAIT_TIMEOUT; the count goes to ``acks``."""
        if not _add_wait(pipe, self.applier.settings, BATCH_WAIT_FACTOR):
            return pipe.execute(raise_on_error=False)
        return _take_ack(pipe.execute(raise_on_error=False), acks)


    def dead_letters(self, space: str, items: Sequence[tuple[str, bytes]], source: str) -> None:
        """As ``AsyncStore.dead_letters``: one script call, capped by DEAD_LETTER_MAX and DEAD_LETTER_MAX_BYTES."""
        if not items:
            return
        keys, args = self.applier.dead_letter_args(Keys(space), items, source, now_ms())
        self.client.register_script(DLQ_ADD)(keys=keys, args=args)
        self.client.sadd(SPACES_KEY, space)  # listed by status and the console, even with nothing applied


def _add_wait(pipe: Pipe, settings: Settings, factor: int) -> bool:
    """End ``pipe`` with ``WAIT`` for STATE_WAIT_REPLICAS replicas, up to ``factor`` times STATE_WAIT_TIMEOUT (on the
    pipeline's connection, so that it covers the pipeline's writes); False when no replica is asked for."""
    if not settings.state_wait_replicas:
        return False
    timeout_ms = max(1, int(settings.state_wait_timeout * factor * 1000))
    pipe.execute_command("WAIT", settings.state_wait_replicas, timeout_ms)
    return True


def _take_ack(replies: list, acks: list[int]) -> list:
    """The replies of a pipeline ended by ``_add_wait``, its WAIT's count (0 when it failed: a primary that cannot
    WAIT has no replica to count on) moved to ``acks``."""
    acked = replies.pop()
    if isinstance(acked, REDIS_DOWN):
        raise acked
    acks.append(acked if isinstance(acked, int) else 0)
    return replies


def _replicated(outcomes: list[Outcome], acks: list[int], wanted: int) -> list[Outcome]:
    """``outcomes``, once every ``WAIT`` of their round trip counted ``wanted`` replicas; else ``NotReplicated``."""
    if acks and min(acks) < wanted:
        raise NotReplicated(outcomes, min(acks), wanted)
    return outcomes


def _shares(batch: list[_Waiting], outcomes: list[Outcome]) -> Iterator[tuple[_Waiting, list[Outcome]]]:
    """Each request of a shared round trip with its own outcomes: its events' share, in order."""
    start = 0
    for w in batch:
        yield w, outcomes[start:start + len(w.items)]
        start += len(w.items)


def _settle(done: asyncio.Future[list[Outcome]], outcomes: list[Outcome] | None = None,
            error: BaseException | None = None) -> None:
    if done.done():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(outcomes or [])


def state_keys(client: redis.Redis, space: str) -> Keys:
    """The space's keys in its current generation (profiles, identifiers, merges, accounts). ``client`` may
    decode replies to text (the recompute's forked workers do)."""
    gen = client.get(Keys(space).generation_key)
    return Keys(space, (gen if isinstance(gen, str) else gen.decode()) if gen else "")


async def state_keys_async(client: aredis.Redis, space: str) -> Keys:
    gen = await client.get(Keys(space).generation_key)
    return Keys(space, gen.decode() if gen else "")


def rewrite_dead_letters(client: redis.Redis, settings: Settings, space: str, entry_ids: Sequence[bytes | str],
                         bodies: Sequence[tuple[str, str, str, bytes]]) -> None:
    """Replace dead letters by new ones (reason, source, received ms, raw): the old are deleted, the new added at
    the end of the stream, the byte sum kept right (the GDPR purge of an erased user's events)."""
    delete_dead_letters(client, space, entry_ids)
    if bodies:
        args: list = [settings.dead_letter_max, settings.dead_letter_max_bytes]
        for reason, source, at, raw in bodies:  # what the purge kept: nobody's to drop
            args += [reason, source, at, raw, "", "", ""]
        client.register_script(DLQ_ADD)(keys=dead_letter_keys(Keys(space)), args=args)


def delete_dead_letters(client: redis.Redis, space: str, entry_ids: Sequence[bytes | str]) -> int:
    """Delete dead letters (replayed, or dropped by the operator) and their bytes from the sum; returns bytes freed."""
    if not entry_ids:
        return 0
    keys = Keys(space)
    return int(client.register_script(DLQ_DELETE)(keys=[keys.dead_letters, keys.dead_letter_bytes],
                                                  args=list(entry_ids)))


def encode_raw(obj: object) -> bytes:
    """The bytes logged for an event that arrived inside a larger body."""
    return orjson.dumps(obj)
