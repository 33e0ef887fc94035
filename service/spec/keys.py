"""Every Redis key of a space, defined once.

All keys of a space carry the hash tag ``{<space>}`` so that a space lives on one Redis Cluster shard and one
Lua script may touch all of them. The Lua script builds the same names from the prefix it is given
(``Keys.prefix``); ``service/state/lua/apply.lua`` documents the suffixes it uses and mirrors the methods below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Profile hash field prefixes (one hash per profile). Shared by the Lua script, the Profile API and the workers.
TRAIT = "t:"  # t:<name>   -> JSON text of the value
TRAIT_TS = "T:"  # T:<name>   -> "<effective ms>" or "<effective ms>+<received that much later>" of that value
TRAIT_CLASS = "c:"  # c:<name>   -> "audience" | "computed_trait" (Engage-made values only)
IDENT = "x:"  # x:<type>:<value> -> "<first seen ms>|<first messageId>"
IDENT_COUNT = "n:"  # n:<type>   -> how many values of that type the profile holds
ORDER = "o:"  # o:<order key> -> "<ms>|<revenue>|<category>\x1f<category>..."
REVERSED = "q:"  # q:<order key> -> "<ms>": the order was refunded or cancelled (in either arrival order)
ACTIVITY = "a:"  # a:<channel>:<day> -> 48-bit integer, one bit per 30-minute slot of that UTC day
GROUP = "g:"  # g:<groupId>  -> first-seen ms
ANCESTOR = "r:"  # r:<merged profile id> -> "1": profiles merged into this one
META = "m:"  # m:fs m:ls (first/last event ms), m:fm m:lm (their messageIds), m:ca m:ua (received ms), m:merges,
# m:ix (the period its /events index was last trimmed in: see lua/apply.lua)

TOMBSTONE = "!"  # index value of a deleted userId until a later event builds a new profile (see lua/apply.lua)

CHANNELS = ("web", "mobile", "email")
SLOT_MS = 30 * 60 * 1000
SLOTS_PER_DAY = 48
DAY_MS = 86_400_000


@dataclass(frozen=True)
class Keys:
    """Key names of one space."""

    space: str
    # The generation of the profile state (profiles, identifier index, merges, counter, accounts): "" or "g<n>:".
    # A rebuild writes a new one while events go on to the current one, then switches (``generation_key``).
    # Readers take the current one from Redis (``service.state.store.state_keys``).
    gen: str = ""

    @property
    def prefix(self) -> str:
        return f"sps:{{{self.space}}}:"

    @property
    def generation_key(self) -> str:
        """The space's current generation ("" when the key is absent)."""
        return f"{self.prefix}gen"

    @property
    def rebuild_lock(self) -> str:
        """Held (and renewed) by the one rebuild of the space that may run: two at once would build into the same
        generation, each dropping the other's work."""
        return f"{self.prefix}rebuild:lock"

    @property
    def rebuild_status(self) -> str:
        """The space's last rebuild as it goes: a hash (state, phase, events, started_ms, updated_ms, ...) that
        ``service/state/rebuild.py`` writes and the console shows; it expires an hour after its last write."""
        return f"{self.prefix}rebuild"

    def of(self, gen: str) -> Keys:
        return Keys(self.space, gen)

    def profile(self, pid: str) -> str:
        return f"{self.prefix}{self.gen}p:{pid}"

    def ident(self, kind: str, value: str) -> str:
        return f"{self.prefix}{self.gen}i:{kind}:{value}"

    def redirect(self, pid: str) -> str:
        return f"{self.prefix}{self.gen}mrg:{pid}"

    def account(self, group_id: str) -> str:
        return f"{self.prefix}{self.gen}acct:{group_id}"

    def account_users(self, group_id: str) -> str:
        """The account's users: a sorted set of live profile ids (score 0, read in id order; apply.lua moves a
        merged profile's membership to the survivor and removes an erased one's)."""
        return f"{self.prefix}{self.gen}au:{group_id}"

    def events_index(self, pid: str) -> str:
        """The profile's logged events for the Profile API's ``/events``: a sorted set of log entry ids prefixed
        with the call type's first letter, scored by event time (apply.lua)."""
        return f"{self.prefix}{self.gen}ev:{pid}"

    @property
    def seq(self) -> str:
        return f"{self.prefix}{self.gen}seq"

    @property
    def seq_base(self) -> str:
        """Where a rebuilt generation's profile counter started (a million past the previous one's, so that ids
        never repeat): the profiles it created are ``seq`` less this."""
        return f"{self.prefix}{self.gen}seq:base"

    @property
    def dirty(self) -> str:
        return f"{self.prefix}dirty"

    @property
    def dirty_work(self) -> str:
        """The dirty profiles a refresh took (left behind if it crashed; the next refresh merges them back)."""
        return f"{self.prefix}dirty:work"

    @property
    def dirty_accounts(self) -> str:
        """Accounts whose traits changed since the last refresh: it recomputes every member (their contributions
        carry the account's traits)."""
        return f"{self.prefix}dirty:accounts"

    @property
    def dirty_accounts_work(self) -> str:
        """The changed accounts a refresh took (left behind if it crashed; the next refresh merges them back)."""
        return f"{self.prefix}dirty:accounts:work"

    @property
    def dirty_full(self) -> str:
        """The dirty marks a running full recompute took over (likewise merged back after a crash)."""
        return f"{self.prefix}dirty:full"

    @property
    def log(self) -> str:
        return f"{self.prefix}log"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}dlq"

    @property
    def dead_letter_bytes(self) -> str:
        """How many bytes the dead letters hold (their 'n' fields), kept by ``store.DLQ_ADD`` / ``DLQ_DELETE``."""
        return f"{self.prefix}dlq:bytes"

    @property
    def suppressed(self) -> str:
        return f"{self.prefix}suppressed"

    @property
    def deleted(self) -> str:
        """userId -> effective time (ms) of its latest deletion: its events at or before it are suppressed."""
        return f"{self.prefix}deleted"

    @property
    def erased(self) -> str:
        """'type:value' -> 'time|userId': the other identifiers of erased profiles, the effective time (ms) of their
        latest erasure and the userId whose deletion erased them ('' for an erasure by profile id). Events at or
        before it lose that identifier, and are suppressed when nothing else identifies them or when it was their
        first identifier by priority."""
        return f"{self.prefix}erased"

    @property
    def deletions_latest(self) -> str:
        """The effective time (ms) of the space's latest deletion or erasure: events after it are not looked up in
        ``deleted`` and ``erased``. Worked out again by the apply script from those two when it is missing."""
        return f"{self.prefix}deletions:latest"

    @property
    def forgotten_ids(self) -> str:
        """userIds, anonymousIds and emails of erased profiles whose events the log, the dead letters and the archive
        files may still hold."""
        return f"{self.prefix}forgotten:ids"

    @property
    def forgotten_at(self) -> str:
        """id of ``forgotten_ids`` -> when (received ms) a profile holding it was last erased: the purge removes the
        events naming it received until then, as the profile was erased as it stood (apply.lua)."""
        return f"{self.prefix}forgotten:at"

    @property
    def forgotten_until(self) -> str:
        """id -> the time (ms) up to which the purge removes its events, for ids of ``forgotten_ids`` whose
        deletion or erasure record was lifted before the purge ran (the record gave that time)."""
        return f"{self.prefix}forgotten:until"

    @property
    def rebuild_erased(self) -> str:
        """The identifiers ('type:value') of profiles erased by profile id while a rebuild of the space runs: the
        rebuild erases them again in its new generation once it has switched (``service/state/rebuild.py``)."""
        return f"{self.prefix}rebuild:erased"

    @property
    def rebuild_deleted(self) -> str:
        """The userIds deleted while a rebuild of the space runs, whatever their deletion's time: the rebuild
        deletes them again in its new generation once it has switched (``service/state/rebuild.py``)."""
        return f"{self.prefix}rebuild:deleted"

    @property
    def archive_cursor(self) -> str:
        """The last log entry id written to the archive files (``service/state/archive.py``)."""
        return f"{self.prefix}archive:cursor"

    @property
    def archive_lock(self) -> str:
        return f"{self.prefix}archive:lock"

    @property
    def archive_sizes(self) -> str:
        """Archive file ('day/hour.gz') -> its size once last written whole and made durable: a longer file has the
        torn tail of a write that was killed, cut off before the file is written or read again."""
        return f"{self.prefix}archive:sizes"

    @property
    def forgotten_profiles(self) -> str:
        """Profile ids erased by GDPR deletion whose log entries still await purging."""
        return f"{self.prefix}forgotten"

    @property
    def refresh_pending(self) -> str:
        return f"{self.prefix}refresh:pending"

    @property
    def refresh_queued(self) -> str:
        """The id of the refresh job queued last: while that job waits or runs, the watchdog leaves the dirty
        profiles to it; once it finished, failed or was lost, dirty profiles left waiting get another."""
        return f"{self.prefix}refresh:queued"

    @property
    def refresh_failures(self) -> str:
        """How many refreshes in a row failed (reset by one that succeeds)."""
        return f"{self.prefix}refresh:failures"

    @property
    def refresh_backoff(self) -> str:
        """Set after a failed refresh, expiring after a delay that doubles with each failure in a row: the watchdog
        does not queue another refresh meanwhile."""
        return f"{self.prefix}refresh:backoff"

    def dedupe(self, bucket: int, shard: int) -> str:
        """set of the dedupe ids (``dedupe_digest``) first seen in the bucket, one of ``DEDUPE_SHARDS``."""
        return f"{self.prefix}ds:{bucket}:{shard:x}"

    def legacy_dedupe(self, bucket: int, shard: int) -> str:
        """hash of 8-byte fields: an older version's dedupe records, read until they leave the window."""
        return f"{self.prefix}dd:{bucket}:{shard:x}"

    @property
    def dedupe_sets_since(self) -> str:
        """the first dedupe bucket kept as sets ('-': a space that never had the older hashes)."""
        return f"{self.prefix}dd:sets"

    # --- written by the workers (recompute and sync), read by the /api routes ---------------------------------
    @property
    def contributions(self) -> str:
        """hash pid -> JSON {"cluster", "pattern", "contribution"}: what each profile adds to the aggregates."""
        return f"{self.prefix}w:contrib"

    @property
    def cluster_aggregates(self) -> str:
        """hash cluster -> JSON GroupAggregate without its spend histogram (see ``cluster_spend``)."""
        return f"{self.prefix}w:cagg"

    def cluster_spend(self, cluster: str) -> str:
        """sorted set pid -> spend in cents of one cluster's members: the exact median by rank, O(log n)."""
        return f"{self.prefix}w:spend:{cluster}"

    @property
    def pattern_aggregates(self) -> str:
        """hash pattern -> JSON GroupAggregate without its spend histogram (patterns need no median)."""
        return f"{self.prefix}w:pagg"

    @property
    def clusters(self) -> str:
        """hash cluster -> JSON {"cluster", "label", "n", "summary", "kpi"}: what the API and the sync read."""
        return f"{self.prefix}w:clusters"

    @property
    def patterns(self) -> str:
        """hash pattern -> JSON pattern summary."""
        return f"{self.prefix}w:patterns"

    @property
    def changed_clusters(self) -> str:
        """set of clusters whose summary changed since the last sync."""
        return f"{self.prefix}w:changed"

    @property
    def personas(self) -> str:
        """hash cluster -> JSON {"mavera_id", "name", "hash", "payload", "last_sync_ms", "state", "error"}."""
        return f"{self.prefix}w:personas"

    def persona_lock(self, cluster: str) -> str:
        return f"{self.prefix}w:plock:{cluster}"

    @property
    def sync_lock(self) -> str:
        """One sync of a space at a time (``workers.jobs.sync``)."""
        return f"{self.prefix}w:sync-lock"

    @property
    def sync_resumed(self) -> str:
        """Set (``SET NX PX``) by the worker watchdog that queues a sync no live sync holds: one at a time."""
        return f"{self.prefix}w:sync-resumed"

    @property
    def sync_wanted(self) -> str:
        """A counter every sync job increments; the one holding ``sync_lock`` runs again while it is set, and
        deletes it after a round only if no job incremented it meanwhile (``workers.jobs.sync``)."""
        return f"{self.prefix}w:sync-wanted"

    @property
    def narrative(self) -> str:
        """hash: content, thread_id, at_ms, patterns (JSON of the patterns it answered), state, error."""
        return f"{self.prefix}w:narrative"

    @property
    def recompute_lock(self) -> str:
        return f"{self.prefix}w:lock"

    @property
    def recompute_run(self) -> str:
        """hash of the full recompute run shared out as RQ jobs (``workers/mapreduce.py``): id, state, now_ms, gen,
        reason, sizes, resumes. Changed only by the holder of ``recompute_lock``; deleted when the run publishes
        or is given up, so a chunk job that finds another id (or none) does nothing."""
        return f"{self.prefix}w:run"

    def recompute_plan(self, run: str) -> str:
        """hash chunk index -> JSON list of the profile ids of that chunk, for the run ``run`` (expires)."""
        return f"{self.prefix}w:run:{run}:plan"

    def recompute_part(self, run: str, index: int) -> str:
        """JSON partial aggregates of one chunk of the run ``run``, written with its staged contributions in one
        transaction (expires)."""
        return f"{self.prefix}w:run:{run}:part:{index}"

    def recompute_claim(self, run: str, index: int) -> str:
        """Lease on one chunk of the run ``run`` while a process computes it (renewed; lapses when it dies)."""
        return f"{self.prefix}w:run:{run}:claim:{index}"

    @property
    def recompute_basis(self) -> str:
        """string "day:digest": the UTC day and the rules and settings the stored contributions were computed under
        (``workers/recompute.py`` ``basis``), written with each recompute's result; a refresh under another basis
        runs a full recompute instead."""
        return f"{self.prefix}w:basis"

    @property
    def recompute_runs(self) -> str:
        """hash "refresh" | "full" -> JSON {"at_ms", "seconds", "profiles", "changed_clusters", "reason"} of the
        last one that published, written with its result (``workers/recompute.py``); read by the status."""
        return f"{self.prefix}w:runs"

    def rates(self, minute: int) -> str:
        """hash outcome -> events counted in one minute (epoch ms // 60,000), by every web process and replay;
        expires a little over an hour after its last write (``service/state/rates.py``)."""
        return f"{self.prefix}rate:{minute}"


# Keys of the deployment rather than of one space share a hash tag of their own, ``{~}`` ("~" is never in a space
# id), so that on a Redis Cluster they sit in one slot together: a script may touch several of them.
GLOBAL_PREFIX = "sps:{~}:"
SPACES_KEY = GLOBAL_PREFIX + "spaces"  # set of every space that has received data
# Requests refused before they were authenticated: metadata only (time, space claimed, route, status, reason, size,
# peer address), never any of the body. One capped stream for the deployment, not one per space: the space of an
# unauthenticated request is itself a claim, and a key per claimed space would let anyone create keys.
REFUSALS_KEY = GLOBAL_PREFIX + "refusals"
# Mavera is one account per deployment: its limiter and pause switch are global, not per space.
MAVERA_RATE_KEY = GLOBAL_PREFIX + "mavera:rate"  # sorted set of request timestamps (sliding 60 s window)
MAVERA_BLOCKED_KEY = GLOBAL_PREFIX + "mavera:blocked-until"  # epoch ms before which no worker calls Mavera
MAVERA_PAUSED_KEY = GLOBAL_PREFIX + "mavera:paused"  # JSON {"reason", "at_ms"} while syncing is paused (402)
MAVE_CHAT_SLOTS_KEY = GLOBAL_PREFIX + "mavera:chat"  # sorted set of in-flight Mave chat calls (token -> expiry ms)
# Requests refused before authentication, counted per minute (field: HTTP status) for the deployment, like the
# refusal log and for the same reason: the space they claim is itself a claim.
REFUSAL_RATES_PREFIX = GLOBAL_PREFIX + "refusals:rate:"
# Names these keys had before they were tagged, renamed once by ``service.state.upgrade`` (a standalone Redis only:
# a Cluster deployment never had them).
LEGACY_GLOBAL_KEYS = {"sps:spaces": SPACES_KEY, "sps:refusals": REFUSALS_KEY, "sps:mavera:rate": MAVERA_RATE_KEY,
                      "sps:mavera:blocked-until": MAVERA_BLOCKED_KEY, "sps:mavera:paused": MAVERA_PAUSED_KEY,
                      "sps:mavera:chat": MAVE_CHAT_SLOTS_KEY}


def profile_api_rate(token_digest: str, second: int) -> str:
    """Profile API requests of one token (by digest) in one second, shared by every web process."""
    return f"{GLOBAL_PREFIX}ratelimit:profile-api:{token_digest}:{second}"


def replay_cancel(job_id: str) -> str:
    """Set to ask a running replay job to stop."""
    return f"{GLOBAL_PREFIX}replay-cancel:{job_id}"


def refusal_rates(minute: int) -> str:
    return f"{REFUSAL_RATES_PREFIX}{minute}"


_ENTRY_ID = re.compile(r"^([0-9]{1,20})(?:-([0-9]{1,20}))?$")
_MAX_ID_PART = 2**64 - 1  # a stream id's parts are 64-bit: Redis refuses a greater one as an error


def valid_stream_bound(text: str) -> bool:
    """A bound of a stream range that Redis takes: an entry id, or a time alone ('ms', all of that millisecond)."""
    m = _ENTRY_ID.match(text)
    return m is not None and all(int(part) <= _MAX_ID_PART for part in m.groups() if part is not None)


def valid_entry_id(text: str) -> bool:
    """One stream entry's id, 'ms-seq' (1700000000000-0: how a log entry or a dead letter is named); 'ms' alone
    would name every entry of that millisecond."""
    return "-" in text and valid_stream_bound(text)
