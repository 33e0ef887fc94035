"""Operator actions on STATE that need no HTTP: Mavera's pause, GDPR forget and the purge of forgotten log entries."""

from __future__ import annotations

from collections.abc import Iterable

import orjson
import redis

from service.config import Settings
from service.spec.bodies import BodyError, array_elements, deep_json, parse_json
from service.spec.clock import now_ms
from service.spec.events import Event, iso_ms, normalise
from service.spec.identity import IdentityRules
from service.spec.keys import MAVERA_PAUSED_KEY, TOMBSTONE, Keys
from service.state.archive import (
    CLOCK_SKEW_MS,
    Erased,
    belongs,
    erased_ids,
    erased_record,
    event_belongs,
    purge_archive,
)
from service.state.connect import state_client
from service.state.generations import other_generations
from service.state.replay import AUTHENTICATED_SOURCES, Options, dead_letter_records, resolve, run
from service.state.store import Outcome, SyncStore, delete_dead_letters, encode_raw, rewrite_dead_letters, state_keys


def paused(client: redis.Redis) -> dict | None:
    """Why Mavera syncing is paused (a 402: credits exhausted), or None."""
    raw = client.get(MAVERA_PAUSED_KEY)
    return orjson.loads(raw) if raw else None


def pause(client: redis.Redis, reason: str) -> None:
    client.set(MAVERA_PAUSED_KEY, orjson.dumps({"reason": reason, "at_ms": now_ms()}))


def resume(client: redis.Redis) -> bool:
    """``persona-sync resume``: clear the pause. True when there was one."""
    return bool(client.delete(MAVERA_PAUSED_KEY))


class NotFound(LookupError):
    """The identifier resolves to no profile."""


class NotAnIdentifier(ValueError):
    """The identifier is empty, or a blocked placeholder ('null', 'anonymous', '0'): no profile can have it."""


def user_deletion(user_id: str, at_ms: int, message_id: str, rules: IdentityRules) -> tuple[Event, bytes]:
    """A Segment ``delete`` of ``user_id`` at ``at_ms``, ready for ``SyncStore.apply`` (``forget``, and a rebuild
    erasing again the users deleted while it ran)."""
    raw = {"type": "delete", "userId": user_id, "messageId": message_id, "timestamp": iso_ms(at_ms)}
    return normalise(raw, at_ms, rules), encode_raw(raw)


def profile_erasure(pid: str, at_ms: int, message_id: str) -> tuple[Event, bytes]:
    """The erasure of profile ``pid`` (a profile without a userId: nothing to suppress), ready for
    ``SyncStore.apply``: ``forget``, and a rebuild erasing again the profiles erased while it ran."""
    raw = {"type": "delete", "erase": pid, "messageId": message_id}
    return Event("delete", message_id, at_ms, None, (), erase=pid, received=at_ms), encode_raw(raw)


def forget(client: redis.Redis, settings: Settings, space: str, identifier: str,
           purge: bool = True) -> tuple[Outcome, str | None]:
    """GDPR: erase the profile ``identifier`` (``TYPE:VALUE``, or a bare userId) resolves to, exactly as a Segment
    ``delete`` does, and purge its logged and archived events now (``purge=False``: the caller queues the purge
    job, as the receiver does). Returns the outcome and the userId whose events up to now are suppressed (None for
    a profile without one). Raises ``NotFound``, or ``NotAnIdentifier`` for an empty value or a placeholder."""
    rules = IdentityRules.from_settings(settings)
    kind, value, pid = resolve(client, rules, space, identifier)
    if not rules.prepare([(kind.strip().lower(), value)]):  # erasing it would suppress every sender of it
        raise NotAnIdentifier(f"{identifier[:100]!r} identifies nobody: it is empty, or a blocked placeholder "
                              "(IDENTITY_BLOCKED); nothing was erased")
    if pid is None and ":" not in identifier and resolve(client, rules, space, f"segment_id:{value}")[2]:
        # a bare value is a userId, but this one is nobody's userId and a profile's id, as the console and the
        # Profile API show them: erasing would only suppress a userId nobody has, and say it was done
        raise NotAnIdentifier(f"{value!r} is no userId here but a profile's id: send segment_id:{value} to erase "
                              f"that profile (or user_id:{value} to suppress a userId of that name); nothing was "
                              "erased")
    user_id = value if kind == "user_id" else None
    if pid is not None and user_id is None:  # erase by another identifier: suppress the profile's userId, if any
        fields = client.hkeys(state_keys(client, space).profile(pid))
        ids = [f.decode()[len("x:user_id:"):] for f in fields if f.startswith(b"x:user_id:")]
        user_id = ids[0] if ids else None
    if pid is None and user_id is None:
        raise NotFound(f"no profile has {kind}:{value} in space {space}")
    now = now_ms()
    if user_id is not None:
        item = user_deletion(user_id, now, f"forget-{user_id}-{now}", rules)
    else:
        assert pid is not None
        item = profile_erasure(pid, now, f"forget-{pid}-{now}")
    outcome = SyncStore(client, settings).apply(space, [item])[0]
    if purge:
        purge_erased(client, settings, space)
    return outcome, user_id


def _erased_identifiers(client: redis.Redis, space: str) -> dict[tuple[str, int], list[str]]:
    """The identifiers erased with a profile (``Keys.erased``), by (deleted userId or '', erasure time)."""
    out: dict[tuple[str, int], list[str]] = {}
    for ident, record in client.hscan_iter(Keys(space).erased, count=1000):
        at, uid = erased_record(record)
        out.setdefault((uid, at), []).append(ident.decode())
    return out


def suppressions(client: redis.Redis, space: str) -> list[dict]:
    """Suppressed userIds with the time up to which their events are dropped (0: for ever, an older version's),
    and the other identifiers erased with each profile, whose events up to then are dropped too (``user_id``
    None: a profile without a userId, erased by ``forget``)."""
    k = Keys(space)
    times = {uid.decode(): int(ms) for uid, ms in client.hgetall(k.deleted).items()}
    legacy = {uid.decode() for uid in client.smembers(k.suppressed)} - set(times)
    erased = _erased_identifiers(client, space)
    by_user: dict[str, list[str]] = {}
    for (uid, _), idents in erased.items():
        if uid:
            by_user.setdefault(uid, []).extend(idents)
    rows: list[dict] = [{"user_id": uid, "until_ms": times.get(uid, 0), "identifiers": sorted(by_user.get(uid, []))}
                        for uid in sorted(set(times) | legacy)]
    rows += [{"user_id": None, "until_ms": at, "identifiers": sorted(idents)}
             for (uid, at), idents in sorted(erased.items(), key=lambda item: item[0][1]) if not uid]
    return rows


def lift_suppression(client: redis.Redis, space: str, user_id: str) -> bool:
    """Stop suppressing ``user_id`` and the identifiers erased with it (their events apply again from now on), or,
    given an identifier (``TYPE:VALUE``) of a profile without a userId that was erased, every identifier erased with
    that profile. False if it was not suppressed. An empty one raises ``NotAnIdentifier``: erasures by profile id
    record an empty userId, and lifting "" would lift them all."""
    if not user_id.strip():
        raise NotAnIdentifier("an empty userId names nobody; nothing was lifted")
    k = Keys(space)
    mine = [ident for ident, record in client.hscan_iter(k.erased, count=1000) if erased_record(record)[1] == user_id]
    _keep_purge_bounds(client, k, mine, user_id)
    found = bool(client.hdel(k.deleted, user_id)) | bool(client.srem(k.suppressed, user_id))
    if mine:
        found = bool(client.hdel(k.erased, *mine)) or found
    index = state_keys(client, space).ident("user_id", user_id)
    if client.get(index) == TOMBSTONE.encode():
        client.delete(index)
        found = True
    return found or _lift_erasure(client, k, user_id)


def _lift_erasure(client: redis.Redis, k: Keys, ident: str) -> bool:
    """``TYPE:VALUE`` of a profile without a userId that ``forget`` erased (``suppressions list`` shows it): lift
    every identifier erased with it. One erased with a userId is lifted with that userId."""
    record = client.hget(k.erased, ident)
    if record is None:
        return False
    at, uid = erased_record(record)
    if uid:
        raise NotAnIdentifier(f"{ident} was erased with userId {uid}: lift {uid}, which lifts it too")
    group = [i for i, r in client.hscan_iter(k.erased, count=1000) if erased_record(r) == (at, "")]
    _keep_purge_bounds(client, k, group)
    return bool(client.hdel(k.erased, *group))


def _keep_purge_bounds(client: redis.Redis, k: Keys, idents: list[bytes], user_id: str | None = None) -> None:
    """Before a lift removes deletion and erasure records: the times they gave the ids still waiting for the purge
    (``Keys.forgotten_until``), so that it removes their events up to the erasure, not the ones sent since the
    lift (``erased_ids``)."""
    if not client.scard(k.forgotten_ids):
        return
    times: dict[str, int] = {}
    records = client.hmget(k.erased, idents) if idents else []
    for ident, record in zip(idents, records, strict=True):
        if record is not None:
            times[ident.decode().partition(":")[2]] = erased_record(record)[0]
    if user_id is not None:
        at = client.hget(k.deleted, user_id)
        if at is not None:
            times[user_id] = max(times.get(user_id, 0), int(float(at)))
    pending = [v for v, on in zip(times, client.smismember(k.forgotten_ids, list(times)), strict=True) if on] \
        if times else []
    for value in pending:
        known = client.hget(k.forgotten_until, value)
        if known is None or int(known) < times[value]:
            client.hset(k.forgotten_until, value, times[value])


def purge_forgotten(client: redis.Redis, space: str, chunk: int = 2000, settings: Settings | None = None,
                    ids: Erased | None = None) -> int:
    """Delete the logged events of erased profiles (and of profiles merged into them), and those from before the
    erasure that name an erased userId, anonymousId or email (``erased_ids``: entries logged before a rebuild carry
    the previous generation's profile ids). Returns entries removed.

    Runs as a job after a delete: scanning the log does not belong in the request path. The erased ids stay for
    the archive's purge, which runs next (``purge_job``).
    """
    k = Keys(space)
    forgotten = {m for m in client.smembers(k.forgotten_profiles)}
    ids = erased_ids(client, space) if ids is None else ids
    if not forgotten and not ids:
        return 0
    rules = IdentityRules.from_settings(settings or Settings())
    removed, start = 0, "-"
    while True:
        rows = client.xrange(k.log, min=start, max="+", count=chunk)
        if not rows:
            break
        doomed = [eid for eid, fields in rows if fields.get(b"p") in forgotten
                  or (ids and belongs(fields.get(b"e", b""), ids, int(eid.split(b"-")[0]), rules=rules))]
        if doomed:
            removed += client.xdel(k.log, *doomed)
        last = rows[-1][0].decode()
        ms, _, seq = last.partition("-")
        start = f"{ms}-{int(seq) + 1}"
        if len(rows) < chunk:
            break
    if forgotten:
        client.srem(k.forgotten_profiles, *forgotten)
    return removed


def purge_erased(client: redis.Redis, settings: Settings, space: str) -> int:
    """After an erasure: the erased users' profiles in the generations a rebuild left (or is building), then their
    events out of the log, the dead letters and the archive files (whose purge forgets the erased ids); returns
    profiles, entries and lines erased, removed or rewritten."""
    ids = erased_ids(client, space)
    return (erase_in_other_generations(client, settings, space, set(ids))
            + purge_forgotten(client, space, settings=settings, ids=ids)
            + purge_dead_letters(client, settings, space, ids) + purge_archive(client, settings, space, ids))


def erase_in_other_generations(client: redis.Redis, settings: Settings, space: str, ids: set[str]) -> int:
    """GDPR: an erasure applies to the space's current generation, but a rebuild leaves the previous ones in place
    until ``rebuild --drop-old``, holding the same people (and one being built may hold them already): their
    profiles there are erased too, found by the erased users' ``ids`` (userIds and anonymousIds). Returns
    profiles erased."""
    if not ids:
        return 0
    identifiers = [(kind, value) for value in sorted(ids) for kind in ("user_id", "anonymous_id")]
    return sum(erase_identified(client, settings, space, identifiers, gen) for gen in other_generations(client, space))


def erase_identified(client: redis.Redis, settings: Settings, space: str, identifiers: Iterable[tuple[str, str]],
                     generation: str | None = None, at_ms: int | None = None) -> int:
    """Erase, in ``generation`` (None: the current one), every profile one of ``identifiers`` (type, value) points
    to, by profile id, as of ``at_ms`` (None: now; a follow-up passes the erasure's own time, which the erased
    identifiers keep in ``Keys.erased``); returns profiles erased (a rebuild's and an erasure's follow-ups in other
    generations)."""
    k = state_keys(client, space) if generation is None else Keys(space, generation)
    pids: list[str] = []
    for kind, value in identifiers:
        pid = (client.get(k.ident(kind, value)) or b"").decode()
        if pid and pid != TOMBSTONE and pid not in pids:
            pids.append(pid)
    if pids:
        now = now_ms()
        at = now if at_ms is None else min(at_ms, now)
        SyncStore(client, settings).apply(space, [profile_erasure(pid, at, f"erase-{k.gen}{pid}-{now}")
                                                  for pid in pids], now=now, generation=generation)
    return len(pids)


def purge_dead_letters(client: redis.Redis, settings: Settings, space: str, ids: Erased, chunk: int = 500) -> int:
    """GDPR: the dead letters lose the events of the erased users ``ids`` (by userId, anonymousId, previousId or
    email) from before their erasure (``erased_ids``).
    An entry that is one such event, or a body that cannot be read and names one of them, is deleted; a body of
    several events keeps the others, rewritten as a new entry (same reason, source and receipt time) at the end of
    the stream. Returns entries deleted or rewritten."""
    if not ids:
        return 0
    key = Keys(space).dead_letters
    rules = IdentityRules.from_settings(settings)
    changed: list[bytes] = []
    bodies: list[tuple[str, str, str, bytes]] = []
    start = "-"
    while True:
        rows = client.xrange(key, min=start, max="+", count=chunk)
        for entry_id, fields in rows:
            kept = _without_erased(fields.get(b"raw", b""), ids, _received(entry_id, fields), rules)
            if kept is None:
                continue
            changed.append(entry_id)
            if kept:
                bodies.append((fields.get(b"reason", b"").decode(errors="replace"),
                               fields.get(b"source", b"").decode(errors="replace"),
                               fields.get(b"at", b"0").decode(errors="replace"), kept))
        if len(rows) < chunk:
            break
        start = "(" + rows[-1][0].decode()
    if changed:
        rewrite_dead_letters(client, settings, space, changed, bodies)
    return len(changed)


def _received(entry_id: bytes, fields: dict[bytes, bytes]) -> int:
    """When a dead letter was received: its 'at' (ms), else its entry's time."""
    at = fields.get(b"at", b"")
    return int(at) if at.isdigit() else int(entry_id.split(b"-")[0])


def _without_erased(raw: bytes, ids: Erased, received_ms: int, rules: IdentityRules) -> bytes | None:
    """A dead letter's body without the erased users' events: None when it holds none of them, b"" when nothing
    is left of it (or it cannot be read and names one of them)."""
    try:
        doc = parse_json(raw)
    except BodyError:
        return b"" if belongs(raw, ids, received_ms, rules=rules, skew=CLOCK_SKEW_MS) else None
    if isinstance(doc, dict) and isinstance(doc.get("batch"), list):  # a Tracking API batch
        events: list = doc["batch"]
    elif isinstance(doc, list):  # a Webhooks (Actions) batch
        events = doc
    else:
        return b"" if event_belongs(doc, ids, received_ms, rules=rules, skew=CLOCK_SKEW_MS) else None
    keep = [not event_belongs(e, ids, received_ms, rules=rules, skew=CLOCK_SKEW_MS) for e in events]
    rest = [e for e, k in zip(events, keep, strict=True) if k]
    if len(rest) == len(events):
        return None
    if not rest:
        return b""
    if isinstance(doc, list):  # an Actions batch: the events kept stay as they were sent, however deep
        try:
            texts = array_elements(raw)
        except ValueError:
            texts = []
        if len(texts) == len(events):
            return b"[" + b",".join(t for t, k in zip(texts, keep, strict=True) if k) + b"]"
    kept = {**doc, "batch": rest} if isinstance(doc, dict) else rest
    try:
        return orjson.dumps(kept)
    except orjson.JSONEncodeError:  # nested past what orjson writes: the slower encoder, else nothing is kept
        return deep_json(kept)


def replay_dead_letters(client: redis.Redis, settings: Settings, space: str, progress=None,
                        drop_unauthenticated: bool = False) -> dict:
    """Apply the dead letters again (after a fix) with the replay engine; what applies is removed, the rest stays.

    An entry whose source is not known to have passed authentication (``AUTHENTICATED_SOURCES``: notably
    ``webhook-unsigned``, bodies that older versions kept after a failed signature check) is never applied and
    is counted as ``unauthenticated``: ``drop_unauthenticated`` deletes those entries."""
    k = Keys(space)
    entries = client.xlen(k.dead_letters)
    unauthenticated = [entry_id for entry_id, fields in client.xrange(k.dead_letters)
                       if fields.get(b"source", b"").decode(errors="replace") not in AUTHENTICATED_SOURCES]
    if unauthenticated and drop_unauthenticated:
        delete_dead_letters(client, space, unauthenticated)
    report = run(client, settings, space, dead_letter_records(client, space), Options(), "replay",
                 progress=progress)
    left = client.xlen(k.dead_letters)
    return {"entries": entries, "replayed": report.dead_letters_removed,
            "kept": left - (0 if drop_unauthenticated else len(unauthenticated)),
            "events_applied": report.outcome_totals().get("applied", 0), "unauthenticated": len(unauthenticated)}


def purge_job(space: str) -> int:
    """RQ entry point (enqueued by the receiver after a delete): ``purge_erased``."""
    settings = Settings.from_env()
    return purge_erased(state_client(settings), settings, space)
