"""Thin RQ entry points. Each reads settings and the STATE Redis from the environment, as the worker gets them."""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid

import redis
from rq import Queue, Retry, get_current_job
from rq.exceptions import DuplicateJobError
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.timeouts import BaseTimeoutException

from service.config import Settings
from service.logs import event as log_event
from service.spec.keys import Keys
from service.state.connect import queue_client, state_client
from service.state.locks import held_lock
from service.state.queue import FULL_RECOMPUTE_JOB, QUEUE_NAME, RECOMPUTE_CHUNK_JOB
from service.state.refresh import REFRESH_TIMEOUT, queue_sync, schedule_refresh
from service.state.status import spaces
from workers import mapreduce, recompute

log = logging.getLogger("jobs")
# seconds a refresh waits for another recompute before it steps aside: the holder queues a refresh when it is done,
# and the watchdog one when a dead holder's lock has lapsed
REFRESH_LOCK_WAIT = 1.0
REFRESH_BACKOFF, REFRESH_BACKOFF_MAX = 5, 300  # seconds the watchdog waits after a failed refresh: doubling, capped
RETRY_PENDING = 60  # seconds before another sync of clusters that only needed time
SYNC_LOCK_TTL = 60.0  # renewed while the sync runs; a killed worker's lapses within this
CHUNK_RESULT_TTL = 60  # seconds a chunk job's result is kept: a run has hundreds of them


def _state() -> redis.Redis:
    return state_client(Settings.from_env())


def _queue() -> Queue:
    return Queue(QUEUE_NAME, connection=queue_client(Settings.from_env()))


def refresh(space: str, marker: str | None = None) -> dict:
    """Debounced refresh of the dirty profiles; enqueues a sync when a cluster summary changed.

    It starts only once its debounce marker (``marker``, the token the receiver set) has expired: web processes
    stay quiet until the marker expires, trusting this refresh to read what they dirtied. A newer marker is the
    next refresh's business, not this one's. If another recompute holds the space, it steps aside: the holder
    queues a refresh when it is done if profiles are still dirty, and if the holder dies instead, its lock lapses
    within seconds and a worker's watchdog queues one (``service.state.refresh.RefreshWatchdog``)."""
    settings = Settings.from_env()
    client = _state()
    keys = Keys(space)
    deadline = time.monotonic() + settings.refresh_debounce + 5
    while marker and time.monotonic() < deadline:
        with client.pipeline(transaction=True) as pipe:
            current, ttl_ms = pipe.get(keys.refresh_pending).pttl(keys.refresh_pending).execute()
        if current is None or current.decode() != marker or ttl_ms <= 0:
            break
        time.sleep(ttl_ms / 1000 + 0.005)
    try:  # a shared full recompute whose owner died is finished first (see workers/mapreduce.py)
        resumed = mapreduce.resume(client, settings, space, _chunk_queuer(), lock_wait=REFRESH_LOCK_WAIT)
        shared = settings.recompute_mode == "jobs"
        report = resumed or recompute.refresh(client, settings, space, lock_wait=REFRESH_LOCK_WAIT,
                                              full_here=not shared)
        if "basis_moved" in report:  # a new day or new rules, in jobs mode: the full recompute is shared out too
            resumed = mapreduce.full_recompute(client, settings, space, _chunk_queuer(), reason=report["basis_moved"])
    except recompute.Busy as exc:
        log_event(log, "refresh stepped aside", space=space, reason=str(exc))
        return {"space": space, "deferred": str(exc)}
    except Exception:  # RQ keeps the failed job; the watchdog waits longer after each failure
        failures = client.incr(keys.refresh_failures)
        client.set(keys.refresh_backoff, failures, ex=min(REFRESH_BACKOFF_MAX, REFRESH_BACKOFF * 2 ** (failures - 1)))
        raise
    client.delete(keys.refresh_failures, keys.refresh_backoff)
    if resumed:
        _after_full(client, settings, resumed)
        return resumed
    log_event(log, "refresh", space=space, profiles=report["profiles"], changed=len(report["changed_clusters"]),
              seconds=report["seconds"], full=bool(report.get("full")), reason=report.get("reason"))
    _warn_if_rules_moved(space, report)
    if report["changed_clusters"] or report["profiles"]:
        queue_sync(_queue(), space, settings.mave_chat_timeout)
    _refresh_if_dirty(client, settings, space)
    return report


def _warn_if_rules_moved(space: str, report: dict) -> None:
    """A refresh that found other rules than the last recompute's recomputed everything. Meant once, after an
    operator changed them; at every refresh it means workers run with different settings, each undoing the other's
    work at the cost of a full recompute."""
    if report.get("reason") == recompute.RULES_MOVED:
        log_event(log, "recompute rules changed: every profile was recomputed; if this repeats, the workers run "
                  "with different CLUSTER_RULES_FILE, ANALYSIS_WINDOW_DAYS or INSIGHT_* settings: give them the same",
                  level=logging.WARNING, space=space)


def _refresh_if_dirty(client: redis.Redis, settings: Settings, space: str) -> None:
    """After a recompute released the space: profiles dirtied meanwhile (or left by a refresh that stepped aside
    for it) get their refresh now, debounced like the receiver's."""
    if client.scard(Keys(space).dirty):
        schedule_refresh(client, _queue(), space, settings.refresh_debounce)


def full_recompute(only: str | None = None) -> list[dict]:
    """Scheduled by `rq cron` (and queued by `persona-sync recompute`): rebuild every space's aggregates (or
    ``only`` that one), then sync. A space that another recompute holds is skipped (the others still run).
    Progress (profiles done) is kept in the job's meta for the operator command to show."""
    settings = Settings.from_env()
    client = _state()
    reports = []
    job = get_current_job()
    done, saved = 0, time.monotonic()

    def progress(n: int) -> None:
        nonlocal done, saved
        done += n
        if job and time.monotonic() - saved > 0.5:
            job.meta["profiles"], saved = done, time.monotonic()
            job.save_meta()

    for space in [only] if only else spaces(client):
        try:
            if settings.recompute_mode == "jobs":
                report = mapreduce.full_recompute(client, settings, space, _chunk_queuer(), progress=progress)
            else:
                report = recompute.full_recompute(client, settings, space, progress=progress)
        except recompute.Busy as exc:
            log_event(log, "full recompute skipped", logging.WARNING, space=space, reason=str(exc))
            reports.append({"space": space, "skipped": str(exc)})
            continue
        reports.append(report)
        _after_full(client, settings, report)
    return reports


def full_recompute_each_space() -> list[str]:
    """Scheduled by `rq cron`: one full-recompute job per space, so that each space has a job timeout of its own
    and workers share the spaces. One job for every space ran them in turn, and a deployment whose spaces took
    longer in all than the job's hour never reached its last ones. A space whose job of an earlier tick still
    waits or runs is not queued again (a failed one stays in the failed jobs, for the operator). Returns the
    spaces queued."""
    queue = _queue()
    waiting = queue.get_job_ids() + StartedJobRegistry(queue=queue).get_job_ids()
    queued = []
    for space in spaces(_state()):
        prefix = _full_job_prefix(space)
        if any(job_id.startswith(prefix) for job_id in waiting):
            continue
        queue.enqueue(FULL_RECOMPUTE_JOB, space, job_id=prefix + uuid.uuid4().hex[:12], job_timeout=REFRESH_TIMEOUT,
                      description=f"scheduled full recompute of {space}")
        queued.append(space)
    return queued


def _full_job_prefix(space: str) -> str:
    """RQ takes only letters, digits, '_' and '-' in a job id; a space id may hold '.' too, hence the digest."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", space)
    return f"full-recompute-{safe}-{hashlib.sha1(space.encode()).hexdigest()[:8]}-"


def _after_full(client: redis.Redis, settings: Settings, report: dict) -> None:
    """A full recompute published: log it, sync its personas, refresh what changed meanwhile, and drop the chunk
    jobs of a shared run that are still queued (they would only find the run over)."""
    space = report["space"]
    log_event(log, "full recompute", space=space, profiles=report["profiles"], seconds=report["seconds"],
              mode=report.get("mode", "local"), processes=report.get("processes"), workers=report.get("workers"),
              reason=report.get("reason"))
    _warn_if_rules_moved(space, report)
    if "run" in report:
        _drop_chunk_jobs(report["run"], report["chunks"])
    queue_sync(_queue(), space, settings.mave_chat_timeout)
    _refresh_if_dirty(client, settings, space)


def recompute_chunk(space: str, run: str, index: int) -> dict:
    """One chunk of a shared full recompute (``workers.mapreduce.run_chunk``); queued by the run's owner. If the
    owner died, this job takes the run over and finishes it."""
    settings = Settings.from_env()
    client = _state()
    out = mapreduce.run_chunk(client, settings, space, run, index, _chunk_queuer())
    if "resumed" in out:
        _after_full(client, settings, out["resumed"])
    return out


def _chunk_job_id(run: str, index: int) -> str:
    return f"recompute-{run}-{index}"


def _chunk_queuer() -> mapreduce.Submit:
    """What a run's owner queues its chunk jobs with (one queue connection for the run's hundreds of jobs).

    One job per chunk; the id names the run and the chunk, so a chunk is queued once however often a takeover
    asks (``unique``). RQ retries a failed job, and one whose worker died once it notices (the worker's heartbeat
    lapsed): at once the first time (the chunk's lease lapsed long before), 30 s later the second; a retry whose
    chunk was done meanwhile does nothing."""
    queue = _queue()

    def submit(space: str, run: str, chunks: list[int]) -> None:
        for index in chunks:
            try:
                queue.enqueue(RECOMPUTE_CHUNK_JOB, space, run, index, job_id=_chunk_job_id(run, index), unique=True,
                              job_timeout=REFRESH_TIMEOUT, result_ttl=CHUNK_RESULT_TTL,
                              retry=Retry(max=2, interval=[0, 30]),
                              description=f"full recompute of {space}: chunk {index}")
            except DuplicateJobError:
                continue

    return submit


def _drop_chunk_jobs(run: str, chunks: int) -> None:
    """Take the run's chunk jobs that no worker started off the queue (the owner did their chunks)."""
    queue = _queue()
    ids = [_chunk_job_id(run, i) for i in range(chunks)]
    with queue.connection.pipeline() as pipe:
        for job_id in ids:
            pipe.lrem(queue.key, 0, job_id)
        removed = pipe.execute()
        gone = [Job.key_for(job_id) for job_id, n in zip(ids, removed, strict=True) if n]
        if gone:
            pipe.delete(*gone).execute()


_DELETE_IF_EQUAL = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def sync(space: str) -> dict:
    """Push changed cluster personas to Mavera (or the outbox) and refresh the channel narrative.

    One sync of a space runs at a time (two could each miss the other's create): a job that finds another running
    leaves it a note (``sync_wanted``, a counter) and returns; the running one goes round again while the note is
    there. The note is taken away only after a round, and only if nobody added to it meanwhile: a sync killed
    mid-round leaves it, and the worker's watchdog queues the sync again once the dead one's lock lapsed
    (``RefreshWatchdog.check_syncs``). Both steps always run; if either failed, the job fails afterwards with
    both reasons, so RQ keeps it for requeue, and what only needs time (a rate limit, Mavera's 5xx, a create to
    settle) gets another sync queued for later."""
    settings = Settings.from_env()
    client = _state()
    keys = Keys(space)
    client.incr(keys.sync_wanted)
    out: dict = {"space": space, "coalesced": True}
    failure: Exception | None = None
    while True:
        with held_lock(client, keys.sync_lock, SYNC_LOCK_TTL) as lock:
            if lock is None:
                return out  # the running sync sees the note and goes round again
            while (wanted := client.get(keys.sync_wanted)) is not None:
                try:
                    out, failure = _sync_once(client, settings, space), None
                except BaseTimeoutException:  # RQ's job timeout: stop, leaving the note; the next sync continues
                    raise
                except Exception as exc:  # a later round may still succeed; raised at the end
                    failure = exc
                client.eval(_DELETE_IF_EQUAL, 1, keys.sync_wanted, wanted)  # kept if a job asked meanwhile
        if not client.exists(keys.sync_wanted):  # a note left while we released: take the lock again
            break
    if failure is not None:
        raise failure
    return out


def _sync_once(client: redis.Redis, settings: Settings, space: str) -> dict:
    from workers.mavera.client import MaveraClient
    from workers.mavera.sync import SyncFailed, narrate_space, sync_space, transient

    mavera = MaveraClient(settings, client) if settings.mavera_api_key else None
    job = get_current_job()
    out: dict = {"space": space}
    errors, retry = [], False
    job_id = job.id if job else None
    steps = (("personas", lambda c, s, sp, m: sync_space(c, s, sp, m, job_id=job_id)), ("narrative", narrate_space))
    try:
        for name, step in steps:
            try:
                out[name] = step(client, settings, space, mavera)
            except BaseTimeoutException:  # RQ's job timeout: stop here, the next sync continues
                raise
            except Exception as exc:  # reported below, after the other step ran
                errors.append(f"{name}: {exc}")
                retry = retry or bool(isinstance(exc, SyncFailed) and exc.retry) or transient(exc)
    finally:
        if mavera:
            mavera.close()
    if retry:  # a create to settle, a rate limit or a 5xx to pass: without this a quiet space would wait an hour
        delay = max(RETRY_PENDING, 2 * settings.mavera_timeout + 5)
        queue_sync(_queue(), space, settings.mave_chat_timeout, delay=delay)
    if errors:
        raise RuntimeError("; ".join(errors))
    return out
