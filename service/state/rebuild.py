"""Rebuild: recompute a space's whole profile state from its history under the current rules, while live ingest
goes on, then switch to it at once.

A space's profile state (profiles, identifier index, merges, counter, accounts) lives in a generation
(``Keys.gen``: ``""``, ``"g1:"``, ...; the current one is ``Keys.generation_key``). A rebuild:

1. checks that history reaches back far enough: a profile created before the first archived or logged event
   would lose data, so the rebuild refuses and says how many, unless forced;
2. applies the archive files older than the log (``EVENT_ARCHIVE_DIR``), then the log, into a new generation
   (``reapply``: not deduplicated, not logged again, no dirty marks), while live events go on to the current one;
3. catches up with what was logged meanwhile until little is left, switches the current generation with one
   ``SET`` (the apply script resolves it per event, atomically), and applies the last entries again into the new
   one: an event applied live in the old generation just before the switch is in the log, and applying an event
   twice changes nothing, so nothing that arrived during the rebuild is lost or counted twice;
4. leaves the old generation in place until ``drop_old`` (``persona-sync rebuild --drop-old``); a GDPR erasure
   reaches it too (``ops.erase_in_other_generations``).

Deletions are not logged events: the space's deletion times (``Keys.deleted``) are shared by the generations and
keep suppressing what came before a delete. GDPR erasures must not come back with the new generation: those whose
purge job has not run are purged before any history is read, and those made while the rebuild runs are done again
in the new generation after the switch (a userId's as of its deletion time, recorded in ``Keys.rebuild_deleted``
whatever that time is; a profile without one by the identifiers its erasure recorded, ``Keys.rebuild_erased``).
Profile ids are new in the new generation (numbering continues after the old one's); aggregates are recomputed by a
full recompute queued after the switch.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis

from service.config import Settings
from service.spec.clock import now_ms
from service.spec.identity import IdentityRules
from service.spec.keys import TOMBSTONE, Keys
from service.state.archive import archive_files, erased_record
from service.state.connect import scan_space
from service.state.generations import drop_generation, generations, next_generation
from service.state.locks import held_lock
from service.state.ops import erase_identified, purge_erased, user_deletion
from service.state.replay import Options, Report, file_records, log_records, run
from service.state.store import SyncStore, state_keys

CATCH_UP_TAIL = 1000  # switch once fewer log entries than this are left to apply
CLOCK_MARGIN_MS = 300_000  # profiles are stamped by the web's clock, log entries by Redis's: allow for skew


LOCK_TTL = 10.0  # seconds a killed rebuild's lock outlives it (renewed every third of that while it runs)
STATUS_TTL = 3600  # seconds the rebuild's status (and record of erasures) outlives its last write (apply.lua too)
STATUS_EVERY_MS = 1000  # at most one write of the status a second while events are applied


class Recorder:
    """The rebuild's progress in Redis (``Keys.rebuild_status``), where every web process's console reads it.

    ``updated_ms`` moves at least once a second while events are applied: a running record that stops moving is a
    rebuild that was stopped (its command killed), which the console says."""

    def __init__(self, client: redis.Redis, space: str, generation: str, previous: str) -> None:
        k = Keys(space)
        self.client, self.key, self.erased = client, k.rebuild_status, (k.rebuild_erased, k.rebuild_deleted)
        self.events, self.last = 0, 0
        self.client.delete(self.key, *self.erased)  # the erasures a killed rebuild recorded are not this one's
        self.write(state="running", phase="starting", generation=generation, previous=previous or "(original)",
                   started_ms=now_ms(), events=0)

    def write(self, **fields: object) -> None:
        self.last = now_ms()
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.key, mapping={**{k: str(v) for k, v in fields.items()}, "updated_ms": str(self.last)})
        pipe.expire(self.key, STATUS_TTL)
        for key in self.erased:  # the deletions and erasures recorded meanwhile (apply.lua) last as long
            pipe.expire(key, STATUS_TTL)
        pipe.execute()

    def applied(self, n: int) -> None:
        self.events += n
        if now_ms() - self.last >= STATUS_EVERY_MS:
            self.write(events=self.events)

    def phase(self, text: str) -> None:
        self.write(phase=text, events=self.events)

    def end(self, state: str, **fields: object) -> None:
        self.write(state=state, events=self.events, ended_ms=now_ms(), **fields)


class RebuildRefused(Exception):
    """History does not reach back to every profile's first event; the message says how many would lose data."""


@dataclass
class Coverage:
    starts_ms: int | None  # the oldest receipt time history holds (archive hour or log entry), None: no history
    profiles: int
    older: int  # profiles created before that


def coverage(client: redis.Redis, settings: Settings, space: str) -> Coverage:
    """How far back history (archive, then log) reaches, against when the current profiles were created."""
    k = state_keys(client, space)
    starts: list[int] = []
    first = client.xrange(k.log, count=1)
    if first:
        starts.append(int(first[0][0].split(b"-")[0]))
    if settings.event_archive_dir:
        files = archive_files(settings.event_archive_dir, space)
        if files:
            starts.append(int(files[0].name[:-3]))
    start = min(starts) if starts else None
    profiles = older = 0
    prefix = k.profile("")
    batch: list[bytes] = []

    def count(keys: list[bytes]) -> int:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, "m:ca")
        return sum(1 for created in pipe.execute()
                   if created is not None and (start is None or int(created) < start - CLOCK_MARGIN_MS))

    for key in scan_space(client, k.log, prefix + "*"):
        profiles += 1
        batch.append(key)
        if len(batch) >= 1000:
            older += count(batch)
            batch = []
    if batch:
        older += count(batch)
    return Coverage(start, profiles, older)


def drop_old(client: redis.Redis, space: str) -> dict[str, int]:
    """``rebuild --drop-old``: delete every generation but the current one (never while a rebuild builds one)."""
    with _alone(client, space, "dropping the old generations"):
        current = (client.get(Keys(space).generation_key) or b"").decode()
        return {gen or "(original)": drop_generation(client, space, gen)
                for gen in sorted(generations(client, space) - {current})}


def _deletions_since(client: redis.Redis, settings: Settings, space: str, since_ms: int) -> int:
    """Delete again, in the generation now current, the userIds deleted while the rebuild ran: those the apply
    script recorded as it deleted them (``Keys.rebuild_deleted``; a Segment delete stamped before the rebuild
    started may arrive during it), and any whose deletion's time is since ``since_ms``. Such a deletion erased the
    old generation only. It keeps its time, so events after it still build a new profile, as Segment's DELETE_ONLY
    does. Returns users erased."""
    k = Keys(space)
    deleted = {uid.decode(): int(float(t)) for uid, t in client.hgetall(k.deleted).items()}
    meanwhile = {uid.decode() for uid in client.smembers(k.rebuild_deleted)}
    recent = sorted((uid, t) for uid, t in deleted.items() if t >= since_ms or uid in meanwhile)
    client.delete(k.rebuild_deleted)
    if not recent:
        return 0
    rules = IdentityRules.from_settings(settings)
    now = now_ms()
    items = [user_deletion(uid, t, f"rebuild-delete-{uid}-{t}-{now}", rules) for uid, t in recent]
    SyncStore(client, settings).apply(space, items, now=now)
    return len(recent)


def _erasures_meanwhile(client: redis.Redis, settings: Settings, space: str) -> int:
    """Erase again, in the generation now current, the profiles that ``forget`` erased by profile id (a profile
    without a userId) while the rebuild ran: the old generation's erasure left the new one holding whatever of
    their events it had applied, or applied before the purge job removed them from the log. Their identifiers
    were recorded by the erasure (``Keys.rebuild_erased``); the record is deleted once used. The erasure is done
    as of its own time, so that events up to then stay suppressed (``Keys.erased``) and later ones build a new
    profile; those the new generation has already put on the erased profile are erased with it. Returns profiles
    erased."""
    k = Keys(space)
    recorded = sorted(m.decode() for m in client.smembers(k.rebuild_erased))
    by_time: dict[int | None, list[tuple[str, str]]] = {}  # as of each erasure's own time (``Keys.erased``)
    for ident, record in zip(recorded, client.hmget(k.erased, recorded) if recorded else [], strict=True):
        at = erased_record(record)[0] if record else None
        kind, _, value = ident.partition(":")
        by_time.setdefault(at, []).append((kind, value))
    erased = sum(erase_identified(client, settings, space, identifiers, at_ms=at)
                 for at, identifiers in by_time.items())
    if erased:
        purge_erased(client, settings, space)  # their entries logged under the new generation's ids
    client.delete(k.rebuild_erased)
    return erased


@contextlib.contextmanager
def _alone(client: redis.Redis, space: str, what: str) -> Iterator[None]:
    """The space's rebuild lock for the whole of ``what``, or RebuildRefused: two rebuilds at once would build into
    the same generation, each dropping what the other applied, and a drop of old generations would drop the one
    being built."""
    key = Keys(space).rebuild_lock
    with held_lock(client, key, LOCK_TTL) as lock:
        if lock is None:
            holder = (client.get(key) or b"?").decode(errors="replace")
            raise RebuildRefused(
                f"a rebuild of {space} is running (held by {holder}): {what} waits for it to end (`persona-sync "
                f"status` shows its progress); a rebuild whose process was killed lets go within {LOCK_TTL:.0f} s")
        yield


def rebuild(client: redis.Redis, settings: Settings, space: str, force: bool = False,
            progress: Callable[[int], None] | None = None, say: Callable[[str], None] = lambda _: None) -> dict:
    """Rebuild ``space`` into a new generation and switch to it (see the module's docstring)."""
    with _alone(client, space, "another rebuild"):
        return _locked_rebuild(client, settings, space, force, progress, say)


def _locked_rebuild(client: redis.Redis, settings: Settings, space: str, force: bool,
                    progress: Callable[[int], None] | None, say: Callable[[str], None]) -> dict:
    k = Keys(space)
    cover = coverage(client, settings, space)
    if cover.older and not force:
        raise RebuildRefused(
            f"history starts at {cover.starts_ms} ms but {cover.older} of {cover.profiles} profiles were created "
            "before it (the log's retention trimmed their first events and no archive holds them): a rebuild "
            "would lose that data. Set EVENT_ARCHIVE_DIR to keep history from now on, or rebuild with --force.")
    started = now_ms()
    current = (client.get(k.generation_key) or b"").decode()
    new = next_generation(current)
    drop_generation(client, space, new)  # what an interrupted rebuild left
    target = Keys(space, new)
    base = int(client.get(Keys(space, current).seq) or 0) + 1_000_000
    client.set(target.seq, base)
    client.set(target.seq_base, base)
    legacy = [uid for uid in client.smembers(k.suppressed) if not client.hexists(k.deleted, uid)]
    for uid in legacy:  # deleted by a version that kept no deletion time: suppressed for ever, as before
        client.set(target.ident("user_id", uid.decode()), TOMBSTONE)
    options = Options(reapply=True, generation=new)
    total = Report()
    recorder = Recorder(client, space, new, current)

    def applied(n: int) -> None:  # the caller's progress bar, and the record
        recorder.applied(n)
        if progress:
            progress(n)

    def phase(text: str) -> None:
        recorder.phase(text)
        say(text)

    try:
        result = _rebuild(client, settings, space, k, cover, started, current, new, options, total, applied, phase)
    except BaseException as exc:
        with contextlib.suppress(redis.RedisError, OSError):  # Redis gone: the record goes stale, then away
            switched = (client.get(k.generation_key) or b"").decode() == new
            recorder.end("failed", error=f"{type(exc).__name__}: {exc}"[:300],
                         phase=f"{space} switched to generation {new} without catching up" if switched
                         else f"before the switch: {space} still uses its previous generation, unchanged")
        raise
    recorder.end("done", phase=f"switched to generation {new}")
    return result


def _first_entry(client: redis.Redis, k: Keys) -> str | None:
    """The id of the log's first entry (None: an empty log)."""
    first = client.xrange(k.log, count=1)
    return first[0][0].decode() if first else None


@contextlib.contextmanager
def _no_ctrl_c() -> Iterator[None]:
    """Ctrl-C is ignored (in the main thread; a job has no terminal) for the few seconds after the switch, which
    must finish, or the space would run on a generation missing the entries logged since the last catch-up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _rebuild(client: redis.Redis, settings: Settings, space: str, k: Keys, cover: Coverage, started: int,
             current: str, new: str, options: Options, total: Report, progress: Callable[[int], None],
             say: Callable[[str], None]) -> dict:
    """The rebuild once its generation is prepared: the archive, the log, the catch-up, the switch."""

    def add(report: Report) -> None:
        total.counts.update(report.counts)

    # erasures whose purge job has not run yet: their events are not to be applied to the new generation
    purge_erased(client, settings, space)
    first, since = _first_entry(client, k), None
    while settings.event_archive_dir:
        # the archive up to the log's first entry; again from there if that moved meanwhile: an archiver run under
        # way when the rebuild started may still trim (later ones leave the log alone while the rebuild holds its
        # lock, ``archive_space``), and what it trimmed is in neither what was read of the files nor the log
        log_start = int(first.split("-")[0]) if first else now_ms()
        files = [str(f) for f in archive_files(settings.event_archive_dir, space, since_ms=since, until_ms=log_start)]
        if files:
            say(f"applying {len(files)} archive file(s) older than the log")
            add(run(client, settings, space, file_records(files), options, "rebuild", progress=progress))
        moved = _first_entry(client, k)
        if moved == first:
            break
        first, since = moved, log_start
    last = None
    while True:  # the log, then what was logged meanwhile, until little is left
        tail = client.xrange(k.log, min=f"({last}" if last else "-", max="+", count=CATCH_UP_TAIL)
        if last is not None and len(tail) < CATCH_UP_TAIL:
            break
        end = client.xrevrange(k.log, count=1)
        if not end:
            break
        end_id = end[0][0].decode()
        say(f"applying the log {'from ' + last if last else 'from its start'} to {end_id}")
        add(run(client, settings, space, log_records(client, space, after=last, until_id=end_id),
                options, "rebuild", progress=progress))
        last = end_id
    with _no_ctrl_c():  # from the switch on, the new generation lacks the last entries until they are applied
        client.set(k.generation_key, new)  # the switch: every event from now on goes to the new generation
        say(f"switched {space} to generation {new}")
        add(run(client, settings, space, log_records(client, space, after=last), options, "rebuild",
                progress=progress))
        erased = _deletions_since(client, settings, space, started)
        if erased:
            say(f"erased again in {new} the {erased} user(s) deleted while it was built")
        erased = _erasures_meanwhile(client, settings, space)
        if erased:
            say(f"erased again in {new} the {erased} profile(s) erased by profile id while it was built")
    return {"space": space, "generation": new, "previous": current or "(original)", "events": total.total,
            "outcomes": total.outcome_totals(), "profiles_before": cover.profiles}
