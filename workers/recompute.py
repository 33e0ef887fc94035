"""Recompute: dirty profiles → features → cluster and channel pattern → per-group aggregates → summaries.

``refresh`` reads only the profiles marked dirty since the last run and moves each one's stored contribution from
its old cluster / pattern aggregate to its new one, so its cost grows with the changes. ``full_recompute`` rebuilds
everything from every profile (ages 30-day windows out, corrects drift) in this worker, forking one process per
core; ``workers/mapreduce.py`` does the same rebuild shared out as RQ jobs (``RECOMPUTE_MODE=jobs``), through the
same pieces: ``begin_full``, ``chunk_result`` and ``stage`` per chunk, ``finish_full``. All hold the space's
recompute lock, so they never overlap, and all write through ``publish`` so they produce identical summaries from
identical data.

Each cluster's exact median spend comes from its spend index (a sorted set of member -> spend, ``Keys.cluster_spend``)
by rank, so neither path keeps a histogram that grows with the distinct spend values: a refresh's fixed cost stays
a handful of small reads whatever the size of the space. A refresh checks each index's size against its aggregate
and rebuilds everything if they disagree.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import orjson
import redis
from redis.cluster import RedisCluster
from redis.exceptions import LockNotOwnedError
from redis.lock import Lock

from service.config import Settings
from service.spec import clock
from service.spec.keys import DAY_MS, Keys
from service.spec.kpis import InsightRule
from service.spec.profile import Profile, decode_profile
from service.state.connect import is_cluster, scan_space
from service.state.locks import held_lock
from service.state.store import state_keys
from workers.compute import aggregates as A
from workers.compute.channels import channel_pattern, pattern_summaries
from workers.compute.clusters import Rules, assign_cluster, label, load_rules
from workers.compute.features import TRAITS_USED, compute_features
from workers.cpus import usable_cpus

CHUNK = 500
PARALLEL_FROM = 20_000  # profiles from which the full recompute forks one process per core
PARALLEL_REFRESH_FROM = 2_000  # dirty profiles from which a refresh does the same
LOCK_TTL = 10.0  # seconds a dead holder's recompute lock outlives it (a live holder renews it every third of that)
LOCK_WAIT = 30.0  # seconds a recompute waits for another to finish before it gives up (``Busy``)


class Busy(RuntimeError):
    """Another recompute of this space holds the lock."""


@contextmanager
def space_lock(client: redis.Redis, space: str, wait: float | None = None) -> Iterator[Lock]:
    """The space's recompute lock: held for as long as the recompute runs (renewed every few seconds), lapsing
    within ``LOCK_TTL`` seconds of a holder's death, so a crashed worker never freezes refreshes for long."""
    with held_lock(client, Keys(space).recompute_lock, LOCK_TTL, LOCK_WAIT if wait is None else wait) as lock:
        if lock is None:
            raise Busy(f"recompute of {space} is already running")
        yield lock


def _take(client: redis.Redis, into: str, sources: list[str]) -> None:
    """Move the dirty marks of ``sources`` into ``into`` (adding to what it holds) in one transaction: the web's
    apply script adds marks at any moment, and one added between a union and a separate delete would be lost."""
    with client.pipeline(transaction=True) as pipe:
        # commands, not methods: redis-py's Cluster pipeline refuses multi-key methods, though these keys share a slot
        pipe.execute_command("SUNIONSTORE", into, into, *sources)
        pipe.execute_command("DEL", *sources)
        pipe.execute()


def _members_of_changed_accounts(client: redis.Redis, keys: Keys, work: str) -> None:
    """Add to ``work`` the members of the accounts whose traits changed (``Keys.dirty_accounts``, taken as the
    dirty marks are): their contributions carry the account's traits."""
    _take(client, keys.dirty_accounts_work, [keys.dirty_accounts])
    for group in client.smembers(keys.dirty_accounts_work):
        members = client.zrange(keys.account_users(group.decode()), 0, -1)
        for i in range(0, len(members), 10_000):
            client.sadd(work, *members[i:i + 10_000])


def _publish_if_held(lock: Lock, pipe: redis.client.Pipeline) -> None:
    """Write the recompute's result (queued on ``pipe``) only while its lock is still ours, renewed for another
    ``LOCK_TTL`` first: a holder cut off from Redis for longer than that may have been replaced, and its result
    must not overwrite the newer one; the write that follows has the whole TTL to land."""
    try:
        lock.reacquire()
    except LockNotOwnedError:
        pipe.reset()
        raise Busy("the recompute lock lapsed before the result was written; the next refresh does the work") from None
    pipe.execute()


def rules_for(settings: Settings) -> Rules:
    return load_rules(settings.cluster_rules_file or None)


def insight_rule(settings: Settings) -> InsightRule:
    return InsightRule(min_share_pct=settings.insight_min_share_pct,
                       require_above_mean=settings.insight_require_above_mean)


def as_of(now_ms: int) -> int:
    """The moment features are computed at: the last millisecond of ``now_ms``'s UTC day. Churn, the 30-day
    sessions and the spend window move with time for every profile, changed or not; held for a day, they are the
    same in every recompute of that day, so a refresh of the changed profiles equals a full recompute."""
    return (now_ms // DAY_MS + 1) * DAY_MS - 1


def basis(settings: Settings, now_ms: int, gen: str = "") -> str:
    """What stored contributions and cards were computed under: the UTC day of ``now_ms``, a digest of the cluster
    rules and the settings features and cards depend on, and the generation of profiles read (``Keys.gen``; named
    only past the first, so that a basis recorded before it was part of one still holds) (``Keys.recompute_basis``)."""
    used = repr((rules_for(settings), settings.analysis_window_days, insight_rule(settings)))
    out = f"{now_ms // DAY_MS}:{hashlib.sha1(used.encode()).hexdigest()[:16]}"
    return f"{out}:{gen.rstrip(':')}" if gen else out


RULES_MOVED = "the cluster rules or the feature settings changed"


def _basis_moved(client: redis.Redis, keys: Keys, stored: str | None, current: str) -> str | None:
    """Why the stored contributions (computed under ``stored``, the recorded basis) no longer hold under
    ``current`` (None: they do)."""
    if stored is None:  # nothing computed yet holds under any basis; else an older version's result
        return "contributions without a recorded basis" if client.exists(keys.contributions) else None
    (day, digest, gen), (now_day, now_digest, now_gen) = _basis_parts(stored), _basis_parts(current)
    if day != now_day:
        return "a new UTC day: churn, 30-day sessions and the spend window moved for every profile"
    if digest != now_digest:
        return RULES_MOVED
    if gen != now_gen:  # the contributions are of the other generation's profile ids
        return "a rebuild switched the space to another generation of profiles"
    return None


def _basis_parts(b: str) -> tuple[str, str, str]:
    """(day, digest, generation) of a basis (``basis``); "" for a part it leaves out."""
    day, digest, gen = (b.split(":", 2) + ["", ""])[:3]
    return day, digest, gen


Entry = tuple[str, str | None, A.Contribution]  # (cluster, pattern, contribution) of one profile


def _contributions(client: redis.Redis, keys: Keys, pids: list[str], rules: Rules, settings: Settings,
                   now_ms: int) -> dict[str, Entry | None]:
    """pid -> (cluster, pattern, contribution) for live profiles, None for erased or merged-away ones."""
    pipe = client.pipeline(transaction=False)
    for pid in pids:
        pipe.hgetall(keys.profile(pid))
    raws = pipe.execute()
    profiles = {pid: decode_profile(pid, raw, TRAITS_USED, detail=False)
                for pid, raw in zip(pids, raws, strict=True) if raw}
    groups = sorted({g for p in profiles.values() for g in p.groups})
    accounts: dict[str, dict[str, Any]] = {}
    if groups:
        pipe = client.pipeline(transaction=False)
        for g in groups:
            pipe.hgetall(keys.account(g))
        for g, raw in zip(groups, pipe.execute(), strict=True):
            accounts[g] = decode_profile(g, raw, TRAITS_USED, detail=False).trait_values()
    out: dict[str, Entry | None] = {pid: None for pid in pids}
    for pid, p in profiles.items():
        out[pid] = entry_of(p, accounts, rules, settings, now_ms)
    return out


def entry_of(p: Profile, accounts: dict[str, dict[str, Any]], rules: Rules, settings: Settings,
             now_ms: int) -> Entry:
    """Pure: one decoded profile (and the traits of the accounts it belongs to) → cluster, pattern, contribution."""
    account: dict[str, Any] = {}
    for g in sorted(p.groups):  # several accounts: the first group id wins, deterministically
        for k, v in accounts.get(g, {}).items():
            account.setdefault(k, v)
    f = compute_features(p, account, now_ms, settings.analysis_window_days)
    return assign_cluster(f, rules), channel_pattern(f), A.contribution_from_features(f)


def _encode(entry: Entry) -> bytes:
    """orjson writes the Contribution dataclass itself (fields in order, categories as a list): ``to_dict``'s form."""
    return orjson.dumps({"cluster": entry[0], "pattern": entry[1], "contribution": entry[2]})


def _decode(raw: bytes | None) -> Entry | None:
    """A stored entry; anything malformed is an ``AggregateError``, so the refresh rebuilds instead of failing."""
    if not raw:
        return None
    try:
        d = orjson.loads(raw)
        cluster, pattern, contribution = d["cluster"], d["pattern"], d["contribution"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise A.AggregateError("stored contribution is not an entry") from None
    if not isinstance(cluster, str) or not (pattern is None or isinstance(pattern, str)):
        raise A.AggregateError("stored contribution names no cluster")
    return cluster, pattern, A.Contribution.from_dict(contribution)


def _load_groups(client: redis.Redis, key: str) -> dict[str, A.GroupAggregate]:
    """Every group's stored aggregate (without spend histogram: medians come from ``_medians``)."""
    try:
        return {k.decode(): A.GroupAggregate.from_dict(orjson.loads(v), histogram=False)
                for k, v in client.hgetall(key).items()}
    except orjson.JSONDecodeError:
        raise A.AggregateError(f"a stored aggregate in {key} is not JSON") from None


def _spend_by_cluster(entries: dict[str, Entry | None]) -> dict[str, dict[str, int]]:
    """cluster -> {pid: spend in cents}: what the clusters' spend indexes hold for ``entries``."""
    members: dict[str, dict[str, int]] = {}
    for pid, entry in entries.items():
        if entry:
            members.setdefault(entry[0], {})[pid] = entry[2].spend_cents
    return members


def _index_spend(pipe: redis.client.Pipeline, keys: Keys, entries: dict[str, Entry | None],
                 names: set[str]) -> None:
    """Queue the spend-index writes for ``entries``: each profile in its cluster's sorted set and out of every
    other one of ``names``. Idempotent, so a refresh that crashed after it and runs again converges."""
    members = _spend_by_cluster(entries)
    for name in sorted(names | set(members)):
        mine = members.get(name, {})
        others = [pid for pid in entries if pid not in mine]
        for i in range(0, len(others), CHUNK):
            pipe.zrem(keys.cluster_spend(name), *others[i:i + CHUNK])
        if mine:
            pipe.zadd(keys.cluster_spend(name), mine)


def _medians(client: redis.Redis, keys: Keys, names: list[str], staged: bool = False) -> dict[str, tuple[int, int]]:
    """cluster -> (members, twice the median spend in cents), by rank in the cluster's spend index (``staged``: the
    one a full recompute is building)."""
    index = [_staging(keys.cluster_spend(name)) if staged else keys.cluster_spend(name) for name in names]
    pipe = client.pipeline(transaction=False)
    for key in index:
        pipe.zcard(key)
    sizes = pipe.execute()
    for key, size in zip(index, sizes, strict=True):
        pipe.zrange(key, max(0, (size - 1) // 2), size // 2, withscores=True)
    return {name: (size, int(middle[0][1]) + int(middle[-1][1]) if size else 0)
            for name, size, middle in zip(names, sizes, pipe.execute(), strict=True)}


def set_staged_medians(client: redis.Redis, keys: Keys, clusters: dict[str, A.GroupAggregate]) -> None:
    """Give aggregates merged without their spend histograms the median of the spend indexes staged beside them."""
    for name, (size, median_x2) in _medians(client, keys, sorted(clusters), staged=True).items():
        if size != clusters[name].n:
            raise A.AggregateError(f"staged spend index of {name!r} disagrees with its aggregate")
        clusters[name].median_x2 = median_x2


def publish(client: redis.Redis, settings: Settings, space: str, clusters: dict[str, A.GroupAggregate],
            patterns: dict[str, A.GroupAggregate], pipe: redis.client.Pipeline,
            touched: tuple[set, set] | None = None) -> list[str]:
    """Queue the summaries, KPI cards and aggregates on ``pipe``; return the clusters whose summary changed.

    ``touched`` (clusters, patterns) limits which aggregates are written back: a refresh rewrites only the groups
    its profiles moved between (an aggregate can be large), the full recompute writes them all."""
    keys = Keys(space)
    rules = rules_for(settings)
    cards = {c["cluster_id"]: c for c in A.kpi_cards(clusters, insight_rule(settings))["cluster_profiles"]}
    docs = {}
    for name in rules.clusters + sorted(set(clusters) - set(rules.clusters)):
        if name in clusters and clusters[name].n > 0:
            docs[name] = {"cluster": name, "label": label(name),
                          "n": clusters[name].n, "summary": clusters[name].cluster_summary(name),
                          "kpi": cards[name]}
    old = {k.decode(): v for k, v in client.hgetall(keys.clusters).items()}
    new = {k: orjson.dumps(v, option=orjson.OPT_SORT_KEYS) for k, v in docs.items()}
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    pipe.execute_command("DEL", keys.clusters, keys.patterns)  # a Cluster pipeline's delete() takes one key
    if new:
        pipe.hset(keys.clusters, mapping=new)
    summaries = pattern_summaries(patterns)
    if summaries:
        pipe.hset(keys.patterns, mapping={k: orjson.dumps(v) for k, v in summaries.items()})
    if touched is None:
        pipe.execute_command("DEL", keys.cluster_aggregates, keys.pattern_aggregates)
        touched = (set(clusters), set(patterns))
    for key, groups, names in ((keys.cluster_aggregates, clusters, touched[0]),
                               (keys.pattern_aggregates, patterns, touched[1])):
        live = {n: orjson.dumps(groups[n].to_dict(histogram=False)) for n in names if n in groups}
        gone = [n for n in names if n not in groups]
        if live:
            pipe.hset(key, mapping=live)
        if gone:
            pipe.hdel(key, *gone)
    if changed:
        pipe.sadd(keys.changed_clusters, *changed)
    return changed


def refresh(client: redis.Redis, settings: Settings, space: str, now_ms: int | None = None,
            lock_wait: float | None = None, full_here: bool = True) -> dict:
    """Apply the dirty profiles' changes to the aggregates. Falls back to a full recompute if they disagree, or
    were computed on another day or under other rules (``basis``). ``full_here=False``: for the latter, return
    ``{"basis_moved": reason}`` at once instead, for the caller to run the full recompute its way (shared out as
    jobs)."""
    now_ms = as_of(now_ms or clock.now_ms())
    keys = state_keys(client, space)
    work = keys.dirty_work
    started = time.perf_counter()
    with space_lock(client, space, lock_wait) as lock:
        # never back in time: a clock behind the last recompute's (a lock wait over midnight, another host's
        # clock) computes as of that recompute's day, rather than redo everything for the day before
        recorded = client.get(keys.recompute_basis)
        stored = recorded.decode() if recorded is not None else None
        stored_day = _basis_parts(stored or "")[0]
        if stored_day.isdigit():
            now_ms = max(now_ms, as_of(int(stored_day) * DAY_MS))
        current = basis(settings, now_ms, keys.gen)
        moved = _basis_moved(client, keys, stored, current)
        if moved and not full_here:
            return {"space": space, "basis_moved": moved}
        if moved:
            return _full(client, settings, space, now_ms, started, lock, reason=moved)
        # A crashed refresh left `work`, a crashed full recompute its snapshot: merge, never lose a dirty mark. A
        # shared run that lost its owner is given up first: its chunks were read before what this refresh applies.
        discard_run(client, keys)
        _take(client, work, [keys.dirty, keys.dirty_full])
        _members_of_changed_accounts(client, keys, work)
        pids = sorted(m.decode() for m in client.smembers(work))
        if not pids:
            client.delete(keys.dirty_accounts_work)  # accounts without a member left
            return {"space": space, "profiles": 0, "changed_clusters": [], "seconds": 0.0}
        rules = rules_for(settings)
        news = _entries(client, settings, space, now_ms, pids)
        pipe = client.pipeline(transaction=True)
        try:  # stored state that does not add up (or does not parse) means: rebuild everything
            olds: dict[str, Entry | None] = {}
            for i in range(0, len(pids), CHUNK):
                chunk = pids[i:i + CHUNK]
                olds.update(zip(chunk, map(_decode, client.hmget(keys.contributions, chunk)), strict=True))
            touched: tuple[set, set] = (set(), set())
            for entry in (*olds.values(), *news.values()):
                if entry:
                    touched[0].add(entry[0])
                    if entry[1]:
                        touched[1].add(entry[1])
            clusters = _load_groups(client, keys.cluster_aggregates)
            patterns = _load_groups(client, keys.pattern_aggregates)
            indexed = set(clusters) | touched[0] | set(rules.clusters)  # every cluster a profile can be in
            for pid in pids:
                new = news[pid]
                _move(clusters, patterns, olds[pid], new)
                if new is None:
                    pipe.hdel(keys.contributions, pid)
                else:
                    pipe.hset(keys.contributions, pid, _encode(new))
            index = client.pipeline(transaction=True)
            _index_spend(index, keys, news, indexed)
            _publish_if_held(lock, index)
            medians = _medians(client, keys, sorted(indexed))
            for name, (size, median_x2) in medians.items():
                if size != (clusters[name].n if name in clusters else 0):
                    raise A.AggregateError(f"spend index of {name!r} disagrees with its aggregate")
                if name in clusters:
                    clusters[name].median_x2 = median_x2
        except A.AggregateError as e:
            pipe.reset()
            _take(client, keys.dirty, [work])
            return _full(client, settings, space, now_ms, started, lock, reason=str(e))
        changed = publish(client, settings, space, clusters, patterns, pipe, touched)
        pipe.execute_command("DEL", work, keys.dirty_accounts_work)  # a Cluster pipeline's delete() takes one
        report = {"space": space, "profiles": len(pids), "changed_clusters": changed,
                  "seconds": round(time.perf_counter() - started, 3), "basis": current}
        _record(pipe, keys, "refresh", report)
        _publish_if_held(lock, pipe)
    return report


def _entries(client: redis.Redis, settings: Settings, space: str, now_ms: int,
             pids: list[str]) -> dict[str, Entry | None]:
    """Features → entries of ``pids``; many dirty profiles are computed by one process per core."""
    procs = min(usable_cpus(), 4) if len(pids) >= PARALLEL_REFRESH_FROM else 1
    chunks = (pids[i:i + CHUNK] for i in range(0, len(pids), CHUNK))
    out: dict[str, Entry | None] = {}
    with _chunk_map(_entries_chunk, chunks, (_pool_args(client), settings, space, now_ms), procs) as parts:
        for part in parts:
            out.update(part)
    return out


@contextmanager
def _chunk_map(fn: Callable[[list[str]], Any], chunks: Iterable[list[str]], job: tuple,
               procs: int) -> Iterator[Iterator[Any]]:
    """``fn`` over ``chunks`` of profile ids in this process, or in ``procs`` forked ones that each take the next
    chunk when free (a shared host slows one core at a time). ``job`` sets every process up (``_start_child``)."""
    if procs == 1:
        _start_child(*job)
        try:
            yield map(fn, chunks)
        finally:
            client = _child.pop("client")
            client.close() if is_cluster(client) else client.connection_pool.disconnect()
    else:
        with multiprocessing.get_context("fork").Pool(procs, initializer=_start_forked, initargs=job) as pool:
            yield pool.imap_unordered(fn, chunks)


def _pool_args(client: redis.Redis) -> tuple:
    """What a forked child needs to open its own connection (never share a socket across processes); for a
    Cluster, a node to read the topology from."""
    if is_cluster(client):
        cluster = cast(RedisCluster, client)
        node = cluster.get_default_node()
        kwargs = {k: v for k, v in cluster.nodes_manager.connection_kwargs.items()
                  if k not in ("host", "port", "db") and (_plain(v) or k in _CARRIED)}
        return None, {**kwargs, "host": node.host, "port": node.port}
    kwargs = {k: v for k, v in client.connection_pool.connection_kwargs.items() if _plain(v) or k in _CARRIED}
    return client.connection_pool.connection_class, kwargs


# objects a child's connection needs as they are: the connection's class (``rediss://`` makes it an SSL one, which
# a Cluster's settings hold only here) and a credential provider (token-based auth)
_CARRIED = ("connection_class", "credential_provider")


def _plain(value: object) -> bool:
    return isinstance(value, str | int | float | bool) or value is None


def connect_decoded(client: redis.Redis) -> redis.Redis:
    """A client of ``client``'s server whose replies come decoded: what ``chunk_entries`` reads fastest with."""
    return _connect(_pool_args(client))


def chunk_entries(client: redis.Redis, keys: Keys, pids: list[str], rules: Rules, settings: Settings,
                  now_ms: int) -> dict[str, Entry | None]:
    """The entries of ``pids``, read in pipelines of ``CHUNK`` profiles (``client`` from ``connect_decoded``)."""
    out: dict[str, Entry | None] = {}
    for i in range(0, len(pids), CHUNK):
        out.update(_contributions(client, keys, pids[i:i + CHUNK], rules, settings, now_ms))
    return out


def _connect(pool_args: tuple) -> redis.Redis:
    """A connection of this process's own; replies come decoded (``decode_profile`` then skips that step)."""
    connection_class, kwargs = pool_args
    kwargs = {**kwargs, "decode_responses": True, "encoding_errors": "replace"}
    if connection_class is None:
        # through a URL, as the worker's own client was made: only then do the nodes' connections take the
        # carried connection class (RedisCluster hands it to each node's pool, not to ``Redis``)
        host, port = kwargs.pop("host"), kwargs.pop("port")
        host = f"[{host}]" if ":" in str(host) else host
        return cast(redis.Redis, RedisCluster(url=f"redis://{host}:{port}", **kwargs))
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=connection_class, **kwargs))


def _move(clusters: dict, patterns: dict, old: Entry | None, new: Entry | None) -> None:
    A.move(clusters, (old[0], old[2]) if old else None, (new[0], new[2]) if new else None)
    A.move(patterns, (old[1], old[2]) if old and old[1] else None, (new[1], new[2]) if new and new[1] else None)


def full_recompute(client: redis.Redis, settings: Settings, space: str, now_ms: int | None = None,
                   processes: int | None = None, progress: Callable[[int], None] | None = None) -> dict:
    """Rebuild every contribution and aggregate from every profile (one process per core for large spaces)."""
    now_ms = as_of(now_ms or clock.now_ms())
    with space_lock(client, space) as lock:
        return _full(client, settings, space, now_ms, time.perf_counter(), lock, processes=processes,
                     progress=progress)


def profile_ids(client: redis.Redis, keys: Keys) -> Iterator[list[str]]:
    """Every profile id of a space once, in chunks (SCAN never blocks Redis, but may return a key twice)."""
    prefix = keys.profile("")
    seen: set[str] = set()
    batch: list[str] = []
    for key in scan_space(client, keys.log, prefix + "*"):
        pid = key.decode()[len(prefix):]
        if pid in seen:
            continue
        seen.add(pid)
        batch.append(pid)
        if len(batch) >= CHUNK:
            yield batch
            batch = []
    if batch:
        yield batch


Part = tuple[int, dict[str, A.GroupAggregate], dict[str, A.GroupAggregate]]  # profiles, clusters, patterns


def _full(client: redis.Redis, settings: Settings, space: str, now_ms: int, started: float, lock: Lock,
          reason: str = "scheduled", processes: int | None = None,
          progress: Callable[[int], None] | None = None) -> dict:
    keys = state_keys(client, space)
    run_basis = basis(settings, now_ms, keys.gen)  # the rules as this run reads them, not as they may be when it ends
    begin_full(client, settings, keys)
    chunks = profile_ids(client, keys)
    head: list[list[str]] = []  # scan far enough to tell a small space (one process) from a large one
    scanned = 0
    while scanned < PARALLEL_FROM and (chunk := next(chunks, None)) is not None:
        head.append(chunk)
        scanned += len(chunk)
    procs = processes or (min(usable_cpus(), 4) if scanned >= PARALLEL_FROM else 1)
    clusters: dict[str, A.GroupAggregate] = {}
    patterns: dict[str, A.GroupAggregate] = {}
    with _chunk_map(_full_chunk, itertools.chain(head, chunks), (_pool_args(client), settings, space, now_ms),
                    procs) as parts:  # the scan goes on while the chunks already found are worked on
        total = join_parts(parts, clusters, patterns, progress)
    return finish_full(client, settings, keys, lock, clusters, patterns, {
        "space": space, "profiles": total, "full": True, "reason": reason, "processes": procs,
        "basis": run_basis}, started)


def begin_full(client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """Start a full recompute (the lock held): give up any shared run, take the dirty marks over as its snapshot
    (changes from now on stay dirty for the next refresh) and empty the staging keys it fills."""
    discard_run(client, keys)
    _take(client, keys.dirty_full, [keys.dirty])
    _take(client, keys.dirty_accounts_work, [keys.dirty_accounts])  # the full run reads every member anyway
    indexed = _indexed(client, settings, keys)
    client.delete(_staging(keys.contributions), *(_staging(keys.cluster_spend(name)) for name in indexed))


def _indexed(client: redis.Redis, settings: Settings, keys: Keys) -> set[str]:
    """Every cluster that has (or may get) a spend index: stable while the recompute lock is held."""
    return {k.decode() for k in client.hkeys(keys.cluster_aggregates)} | set(rules_for(settings).clusters)


def finish_full(client: redis.Redis, settings: Settings, keys: Keys, lock: Lock, clusters: dict[str, A.GroupAggregate],
                patterns: dict[str, A.GroupAggregate], report: dict, started: float,
                drop: Iterable[str] = ()) -> dict:
    """Publish a full recompute whose contributions and spend indexes are staged: summaries, aggregates, the staged
    keys swapped in, the snapshot of dirty marks dropped (and ``drop``), all in one transaction, only while the lock
    is still ours. ``report`` gets the changed clusters and the time."""
    pipe = client.pipeline(transaction=True)
    report["changed_clusters"] = publish(client, settings, keys.space, clusters, patterns, pipe)
    if report["profiles"]:
        pipe.execute_command("RENAME", _staging(keys.contributions), keys.contributions)  # blocked on a Cluster pipe
    else:
        pipe.delete(keys.contributions)
    for name in sorted(_indexed(client, settings, keys) | set(clusters)):  # swap in the spend indexes
        if name in clusters:
            pipe.execute_command("RENAME", _staging(keys.cluster_spend(name)), keys.cluster_spend(name))
        else:
            pipe.delete(keys.cluster_spend(name))
    # a command, not delete(): a Cluster pipeline's delete() takes one key
    pipe.execute_command("DEL", keys.dirty_full, keys.dirty_work, keys.dirty_accounts_work, *drop)
    report["seconds"] = round(time.perf_counter() - started, 3)
    _record(pipe, keys, "full", report)
    _publish_if_held(lock, pipe)
    return report


def discard_run(client: redis.Redis, keys: Keys) -> None:
    """Give up the shared full recompute (``workers/mapreduce.py``) that no one owns any more, with its plan and
    partial results, before another recompute takes the space. Called by the lock holder only; chunk jobs still
    running for it then find no run and write nothing (their writes are fenced on its id)."""
    run_id = client.hget(keys.recompute_run, "id")
    if run_id is None:
        return
    plan = keys.recompute_plan(run_id.decode())
    parts = (keys.recompute_part(run_id.decode(), i) for i in range(client.hlen(plan)))
    client.delete(keys.recompute_run, plan, *parts)


def _record(pipe: redis.client.Pipeline, keys: Keys, kind: str, report: dict) -> None:
    """Keep the run for `persona-sync status` (when, how long, how many), in the transaction that publishes its
    result: the status never shows a run whose result was not written."""
    pipe.hset(keys.recompute_runs, kind, orjson.dumps({
        "at_ms": clock.now_ms(), "seconds": report["seconds"], "profiles": report["profiles"],
        "changed_clusters": len(report["changed_clusters"]), "reason": report.get("reason")}))
    pipe.set(keys.recompute_basis, report["basis"])


def join_parts(parts: Iterable[Part], clusters: dict[str, A.GroupAggregate],
          patterns: dict[str, A.GroupAggregate], progress: Callable[[int], None] | None = None) -> int:
    """Merge the chunks' partial aggregates into ``clusters`` / ``patterns``; return the number of profiles."""
    total = 0
    for n, part_clusters, part_patterns in parts:
        total += n
        if progress:
            progress(n)
        for target, part in ((clusters, part_clusters), (patterns, part_patterns)):
            for name, agg in part.items():
                if name in target:
                    target[name].merge(agg)
                else:
                    target[name] = agg
    return total


_child: dict[str, Any] = {}  # one full recompute's connection and settings, per process (see ``_start_child``)


def _start_child(pool_args: tuple, settings: Settings, space: str, now_ms: int) -> None:
    client = _connect(pool_args)
    _child.update(client=client, settings=settings, keys=state_keys(client, space), now_ms=now_ms,
                  rules=rules_for(settings))


def _start_forked(*job: Any) -> None:
    """A forked worker's set-up. A Pool whose initializer raises starts another process in its place for ever, and
    the recompute waits for ever: the failure (Redis gone, say) is kept for the worker's first chunk to raise, which
    ends the recompute with it."""
    try:
        _start_child(*job)
    except Exception as exc:  # noqa: BLE001 - raised again by the first chunk, in the parent
        _child["failed"] = exc


def _ready() -> None:
    """Raise the failure of this worker's set-up (``_start_forked``), if any."""
    if "failed" in _child:
        raise _child["failed"]


def _entries_chunk(pids: list[str]) -> dict[str, Entry | None]:
    _ready()
    return _contributions(_child["client"], _child["keys"], pids, _child["rules"], _child["settings"],
                          _child["now_ms"])


def _full_chunk(pids: list[str]) -> Part:
    """One chunk of a full recompute: contributions and spend to the staging keys, partial aggregates back."""
    _ready()
    client, keys = _child["client"], _child["keys"]
    part, mapping, spend = chunk_result(_entries_chunk(pids))
    if mapping:
        pipe = client.pipeline(transaction=False)
        stage(pipe, keys, mapping, spend)
        pipe.execute()
    return part


def chunk_result(news: dict[str, Entry | None]) -> tuple[Part, dict[str, bytes], dict[str, dict[str, int]]]:
    """Pure: the entries of one chunk → its partial aggregates, its encoded contributions and its spend by cluster."""
    clusters: dict[str, A.GroupAggregate] = {}
    patterns: dict[str, A.GroupAggregate] = {}
    mapping: dict[str, bytes] = {}
    for pid, new in news.items():
        if new is not None:
            _move(clusters, patterns, None, new)
            mapping[pid] = _encode(new)
    return (len(mapping), clusters, patterns), mapping, _spend_by_cluster(news)


def stage(pipe: redis.client.Pipeline, keys: Keys, mapping: dict[str, bytes], spend: dict[str, dict[str, int]]) -> None:
    """Queue a chunk's contributions and spend-index members on the staging keys (idempotent: same values)."""
    if mapping:
        pipe.hset(_staging(keys.contributions), mapping=mapping)
    for name, members in spend.items():
        pipe.zadd(_staging(keys.cluster_spend(name)), members)


def _staging(key: str) -> str:
    return key + ":staging"
