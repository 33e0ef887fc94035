"""The full recompute shared out as RQ jobs (``RECOMPUTE_MODE=jobs``), so that workers on many machines compute it.

A run has one owner at a time: the process holding the space's recompute lock (``recompute.space_lock``: renewed
while its holder lives, lapsing ``LOCK_TTL`` seconds after it dies), so no refresh overlaps the run, exactly as with
the local recompute. The owner takes the dirty marks over, scans the profile ids once (``recompute.profile_ids``),
cuts them into chunks stored with the run (``Keys.recompute_run``, ``Keys.recompute_plan``), queues one chunk job per
chunk and then computes chunks itself, from the last one backwards, while the chunk jobs take them from the first.
So a run never waits for a free worker, and one worker alone does it all.

One process computes a chunk at a time, under a lease (``Keys.recompute_claim``), and writes the chunk's staged
contributions and its partial aggregates (``Keys.recompute_part``) in one transaction that is refused unless the
run is still the current one and the part is not there yet: a chunk done twice counts once, and a process of a
run that was given up writes nothing. With every part in, the owner merges them and publishes exactly as the local
recompute does (``recompute.finish_full``), deleting the run.

A chunk job whose worker dies leaves its lease to lapse (``CLAIM_TTL``); the owner then computes that chunk (RQ also
retries the abandoned job later: the retry finds the part and does nothing). An owner that dies leaves its lock to
lapse; the next process of the run that finds the lock free takes the run over and resumes it with the same dirty
snapshot and clock, computing only the missing chunks (``resume``): a chunk job still queued, or the refresh that a
worker's watchdog queues for a space whose run has no owner. A run whose owner died before the plan was complete,
or that was taken over ``MAX_RESUMES`` times, is given up instead: that refresh merges its dirty marks back, and the
next scheduled recompute starts afresh.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import orjson
import redis
from redis.lock import Lock
from rq import get_current_job

from service.config import Settings
from service.spec import clock
from service.spec.keys import Keys
from service.state.holders import clear_if_gone
from service.state.locks import held_lock
from service.state.store import state_keys
from workers import recompute as R
from workers.compute import aggregates as A

CLAIM_TTL = 10.0  # seconds a dead process's lease on a chunk outlives it (renewed every third of that)
RUN_TTL = 6 * 3600  # seconds a run's plan and parts are kept: more than a run and its takeovers take
CHUNK_IDS = 5000  # profiles per chunk: ~0.5 s of work, far more than the few ms a chunk costs to hand out
MAX_RESUMES = 3
POLL = 0.05  # seconds between the owner's looks at chunks other processes hold

# (space, run id, chunk indexes) -> queue a chunk job for each (``workers.jobs`` owns the queue)
Submit = Callable[[str, str, list[int]], None]


@dataclass(frozen=True)
class Run:
    id: str
    now_ms: int
    gen: str  # the profiles' generation the plan is scanned in: every chunk reads that one
    reason: str
    resumes: int
    chunks: int  # chunks planned so far
    planned: bool  # the scan is over: ``chunks`` is final and ``sizes`` known
    sizes: tuple[int, ...] = ()  # profile ids per chunk
    basis: str = ""  # the rules and day as the run read them at its start (``recompute.basis``); "": an older run's

    @classmethod
    def load(cls, client: redis.Redis, keys: Keys) -> Run | None:
        raw = {k.decode(): v.decode() for k, v in client.hgetall(keys.recompute_run).items()}
        if "now_ms" not in raw:
            return None
        return cls(raw["id"], int(raw["now_ms"]), raw["gen"], raw["reason"], int(raw["resumes"]),
                   int(client.hlen(keys.recompute_plan(raw["id"]))), raw["state"] == "mapping",
                   tuple(orjson.loads(raw.get("sizes", "[]"))), raw.get("basis", ""))


def full_recompute(client: redis.Redis, settings: Settings, space: str, submit: Submit, now_ms: int | None = None,
                   progress: Callable[[int], None] | None = None, reason: str = "scheduled") -> dict:
    """Rebuild every contribution and aggregate from every profile, as ``recompute.full_recompute`` does, with the
    chunks shared out as jobs (``submit``) and computed by this process too."""
    started, now_ms = time.perf_counter(), R.as_of(now_ms or clock.now_ms())
    with R.space_lock(client, space) as lock:
        keys = state_keys(client, space)
        R.begin_full(client, settings, keys)  # gives up any earlier run, takes the dirty marks, empties staging
        run_id = uuid.uuid4().hex
        run_basis = R.basis(settings, now_ms, keys.gen)
        client.hset(keys.recompute_run, mapping={"id": run_id, "state": "planning", "now_ms": now_ms, "gen": keys.gen,
                                                 "reason": reason, "resumes": 0, "basis": run_basis})
        client.expire(keys.recompute_run, RUN_TTL)
        sizes = _plan(client, keys, run_id, lambda index: _submit(submit, space, run_id, [index]))
        client.hset(keys.recompute_run, mapping={"state": "mapping", "sizes": orjson.dumps(sizes)})
        planned = time.perf_counter() - started  # the serial start: snapshot and scan (chunk jobs start meanwhile)
        run = Run(run_id, now_ms, keys.gen, reason, 0, len(sizes), True, sizes, run_basis)
        report = _drive(client, settings, Keys(space), run, lock, started, progress)
        return report | {"plan_seconds": round(planned, 3)}


def _plan(client: redis.Redis, keys: Keys, run_id: str, queue: Callable[[int], None]) -> tuple[int, ...]:
    """Scan the profile ids into chunks of ``CHUNK_IDS``, each stored with the run and queued (``queue``) as soon as
    it is complete, so that chunk jobs compute while the scan goes on; returns the chunks' sizes."""
    plan = keys.recompute_plan(run_id)
    sizes: list[int] = []

    def store(chunk: list[str]) -> None:
        client.pipeline(transaction=False).hset(plan, str(len(sizes)), orjson.dumps(chunk)).expire(plan, RUN_TTL) \
            .execute()
        sizes.append(len(chunk))
        queue(len(sizes) - 1)

    pending: list[str] = []
    for batch in R.profile_ids(client, keys):
        pending += batch
        while len(pending) >= CHUNK_IDS:
            store(pending[:CHUNK_IDS])
            pending = pending[CHUNK_IDS:]
    if pending:
        store(pending)
    return tuple(sizes)


def _submit(submit: Submit, space: str, run_id: str, chunks: list[int]) -> None:
    """Queue the chunk jobs; without a queue the owner still computes every chunk itself."""
    if not chunks:
        return
    try:
        submit(space, run_id, chunks)
    except redis.RedisError:
        pass


def run_chunk(client: redis.Redis, settings: Settings, space: str, run_id: str, index: int, submit: Submit) -> dict:
    """A chunk job: compute chunk ``index`` of run ``run_id``, and the chunks after it, skipping those done or held,
    until none is left or the run is over (a job costs a process and its imports, ~0.1 s: one job takes on as many
    chunks as it can, and the owner drops the jobs nobody started). Then, if the run has lost its owner, take it
    over and finish it (the report of that is under "resumed")."""
    keys = Keys(space)
    run = Run.load(client, keys)
    if run is None or run.id != run_id:
        return {"space": space, "chunk": index, "skipped": "the run is over"}
    out: dict = {"space": space, "chunk": index, "computed": []}
    decoded = R.connect_decoded(client)
    try:
        i = index
        while run is not None and run.id == run_id and i < run.chunks:
            if compute_chunk(client, decoded, settings, keys, run, i):
                out["computed"].append(i)
            elif not client.exists(keys.recompute_plan(run.id)):  # the run published (or was given up)
                break
            i += 1
            if i == run.chunks and not run.planned:  # the owner may have planned more since
                run = Run.load(client, keys)
    finally:
        decoded.close()
    if clear_if_gone(client, keys.recompute_lock) or not client.exists(keys.recompute_lock):
        try:
            if (report := resume(client, settings, space, submit, lock_wait=0)) is not None:
                out["resumed"] = report
        except R.Busy:  # another process of the run took it over first
            pass
    return out


def resume(client: redis.Redis, settings: Settings, space: str, submit: Submit, lock_wait: float,
           progress: Callable[[int], None] | None = None) -> dict | None:
    """Take over and finish the space's run if it has no owner; None when there is no run to resume (none, one
    never fully planned, or one taken over too often: the caller's refresh gives it up). ``Busy`` if the space is
    locked."""
    keys = Keys(space)
    if not client.exists(keys.recompute_run):
        return None
    started = time.perf_counter()
    with R.space_lock(client, space, lock_wait) as lock:
        run = Run.load(client, keys)
        if run is None or not run.planned or run.resumes >= MAX_RESUMES:
            return None
        run = replace(run, resumes=int(client.hincrby(keys.recompute_run, "resumes", 1)))
        done = _done(client, keys, run, range(len(run.sizes)))
        _submit(submit, space, run.id, [i for i in range(len(run.sizes)) if i not in done])
        return _drive(client, settings, keys, run, lock, started, progress)


def compute_chunk(client: redis.Redis, decoded: redis.Redis, settings: Settings, keys: Keys, run: Run,
                  index: int) -> bool:
    """Compute and store one chunk under its lease; False when it is done, held by another process, or the run is
    over. ``decoded`` reads the profiles (``recompute.connect_decoded``), ``client`` writes."""
    if client.exists(keys.recompute_part(run.id, index)):
        return False
    with held_lock(client, keys.recompute_claim(run.id, index), CLAIM_TTL) as claim:
        if claim is None:
            return False
        raw = client.hget(keys.recompute_plan(run.id), str(index))
        if raw is None:
            return False
        news = R.chunk_entries(decoded, keys.of(run.gen), orjson.loads(raw), R.rules_for(settings), settings,
                               run.now_ms)
        return store_chunk(client, keys, run.id, index, *R.chunk_result(news))


def store_chunk(client: redis.Redis, keys: Keys, run_id: str, index: int, part: R.Part, mapping: dict[str, bytes],
                spend: dict[str, dict[str, int]]) -> bool:
    """Stage a chunk's contributions and store its partial aggregates, in one transaction that is refused (False)
    unless ``run_id`` is still the space's run and the chunk has no part yet."""
    key = keys.recompute_part(run_id, index)
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(keys.recompute_run, key)
                if pipe.hget(keys.recompute_run, "id") != run_id.encode() or pipe.exists(key):
                    return False
                pipe.multi()
                R.stage(pipe, keys, mapping, spend)
                pipe.set(key, encode_part(part), ex=RUN_TTL)
                pipe.execute()
                return True
            except redis.WatchError:  # the run or the part changed meanwhile: look again
                continue


def _computer() -> str:
    """Who computes a chunk: the RQ worker (each job runs in a fresh process), else this process."""
    job = get_current_job()
    return job.worker_name if job and job.worker_name else f"{socket.gethostname()}:{os.getpid()}"


def encode_part(part: R.Part) -> bytes:
    n, clusters, patterns = part
    return orjson.dumps({"n": n, "by": _computer(),
                         # no spend histograms: the medians come from the spend indexes staged beside the parts
                         "clusters": {k: v.to_dict(histogram=False) for k, v in clusters.items()},
                         "patterns": {k: v.to_dict(histogram=False) for k, v in patterns.items()}})


def decode_part(raw: bytes) -> tuple[R.Part, str]:
    """A stored part and the process that computed it."""
    d = orjson.loads(raw)
    return (d["n"], {k: A.GroupAggregate.from_dict(v, histogram=False) for k, v in d["clusters"].items()},
            {k: A.GroupAggregate.from_dict(v, histogram=False) for k, v in d["patterns"].items()}), d["by"]


def _done(client: redis.Redis, keys: Keys, run: Run, chunks: Iterable[int]) -> set[int]:
    """Which of ``chunks`` have their part stored."""
    chunks = list(chunks)
    pipe = client.pipeline(transaction=False)
    for i in chunks:
        pipe.exists(keys.recompute_part(run.id, i))
    return {i for i, there in zip(chunks, pipe.execute(), strict=True) if there}


def _drive(client: redis.Redis, settings: Settings, keys: Keys, run: Run, lock: Lock, started: float,
           progress: Callable[[int], None] | None) -> dict:
    """As the run's owner: compute chunks from the last one backwards, then those whose lease lapsed, until every
    part is in; then merge the parts and publish."""
    todo = set(range(len(run.sizes)))
    here = 0

    def look() -> None:
        if not lock.owned():
            raise R.Busy("the recompute lock lapsed while the run went on; the next run does the work")
        for i in _done(client, keys, run, sorted(todo)):
            todo.discard(i)
            if progress:
                progress(run.sizes[i])

    decoded = R.connect_decoded(client)
    try:
        look()
        for i in sorted(todo, reverse=True):
            if i in todo and compute_chunk(client, decoded, settings, keys, run, i):
                here += 1
            look()
        while todo:  # the rest are held by other processes: wait, and take over any whose holder died
            for i in sorted(todo):
                clear_if_gone(client, keys.recompute_claim(run.id, i))  # a dead holder on this host: no need to wait
                if compute_chunk(client, decoded, settings, keys, run, i):
                    here += 1
            look()
            if todo:
                time.sleep(POLL)
    finally:
        decoded.close()
    return _reduce(client, settings, keys, run, lock, started, here)


def _reduce(client: redis.Redis, settings: Settings, keys: Keys, run: Run, lock: Lock, started: float,
            here: int) -> dict:
    """Merge every chunk's partial aggregates and publish them with the staged contributions; the run is deleted in
    the same transaction."""
    reducing = time.perf_counter()
    parts = [keys.recompute_part(run.id, i) for i in range(len(run.sizes))]
    raws: list[bytes | None] = []
    for i in range(0, len(parts), 50):
        raws += client.mget(parts[i:i + 50])
    if any(raw is None for raw in raws):
        raise RuntimeError(f"run {run.id}: a partial result expired before the reduce")
    decoded = [decode_part(raw) for raw in raws if raw is not None]
    clusters: dict[str, A.GroupAggregate] = {}
    patterns: dict[str, A.GroupAggregate] = {}
    total = R.join_parts((part for part, _ in decoded), clusters, patterns)
    R.set_staged_medians(client, keys, clusters)
    report = {"space": keys.space, "profiles": total, "full": True, "reason": run.reason, "mode": "jobs",
              "run": run.id, "now_ms": run.now_ms, "chunks": len(parts), "chunks_here": here,
              "workers": len({by for _, by in decoded}), "resumes": run.resumes,
              "basis": run.basis or R.basis(settings, run.now_ms, keys.gen)}
    R.finish_full(client, settings, keys, lock, clusters, patterns, report, started,
                  drop=[keys.recompute_run, keys.recompute_plan(run.id), *parts])
    return report | {"reduce_seconds": round(time.perf_counter() - reducing, 3)}  # the serial end
