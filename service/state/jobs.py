"""RQ jobs as an operator sees them: failed ones with their error, requeueing, and what is running with its progress.

Shared by ``persona-sync jobs`` / ``requeue``, ``GET /admin/jobs/{id}`` and the console, so that all three say the
same about a job. Reads go straight to RQ's registries (bounded ranges, no clean-up, which writes).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rq import Queue
from rq.job import Job, JobStatus

from service.state.queue import FULL_RECOMPUTE_JOB, REPLAY_JOB

WATCHED = (REPLAY_JOB, FULL_RECOMPUTE_JOB)  # long jobs an operator follows: progress in their meta


def last_error(job: Job) -> str | None:
    """The last line of a failed job's traceback (a failed sync's is Mavera's message), or None."""
    result = job.latest_result()
    text = (result.exc_string if result else None) or ""
    return text.strip().splitlines()[-1] if text.strip() else None


def ended(job: Job, now: datetime | None = None) -> datetime:
    """When the job ended, as an aware UTC time (RQ keeps naive UTC times; not ended: now)."""
    at = job.ended_at or now or datetime.now(UTC)
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def progress(job: Job) -> dict[str, Any]:
    """``done`` / ``total`` of a replay, ``profiles`` of a full recompute, ``stopped`` of a cancelled replay."""
    return {k: job.meta[k] for k in ("done", "total", "profiles", "stopped") if k in job.meta}


def failed(queue: Queue, limit: int = 200) -> list[Job]:
    """Failed jobs that have not expired, newest first (at most ``limit``)."""
    ids = queue.failed_job_registry.get_job_ids()
    jobs = [j for j in Job.fetch_many(ids, connection=queue.connection) if j is not None]
    jobs.sort(key=ended, reverse=True)
    return jobs[:limit]


def requeue(queue: Queue, job_ids: set[str]) -> tuple[list[str], list[str]]:
    """Run failed jobs again: (requeued, not failed or unknown)."""
    failed_ids = set(queue.failed_job_registry.get_job_ids())
    chosen, missing = sorted(job_ids & failed_ids), sorted(job_ids - failed_ids)
    for job_id in chosen:
        queue.failed_job_registry.requeue(job_id)
    return chosen, missing


def watched(queue: Queue, recent: int = 10) -> list[Job]:
    """Replays and full recomputes waiting or running, then the ``recent`` last ones that ended."""
    conn = queue.connection
    live = [*queue.get_job_ids(0, 499), *queue.started_job_registry.get_job_ids()]
    done_ids = [*queue.finished_job_registry.get_job_ids(), *queue.failed_job_registry.get_job_ids()]
    jobs = [j for j in Job.fetch_many(live, connection=conn) if j is not None and j.func_name in WATCHED]
    over = [j for j in Job.fetch_many(done_ids[-200:], connection=conn) if j is not None and j.func_name in WATCHED]
    over.sort(key=ended, reverse=True)
    return jobs + over[:recent]


def status_of(job: Job) -> str:
    status = job.get_status(refresh=False)
    return str(status.value) if isinstance(status, JobStatus) else "unknown"
