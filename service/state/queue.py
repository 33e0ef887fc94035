"""The one place for the RQ queue's name and the jobs' dotted paths.

``service/`` never imports ``workers/``: jobs are queued by their dotted path, and these strings are the whole of
that contract (``tests/test_layout.py`` checks that each one resolves to a function). ``persona-sync cron`` hands
``CRON_CONFIG`` to ``rq cron``.
"""

from __future__ import annotations

from typing import Any

QUEUE_NAME = "persona-sync"

REFRESH_JOB = "workers.jobs.refresh"
FULL_RECOMPUTE_JOB = "workers.jobs.full_recompute"
RECOMPUTE_CHUNK_JOB = "workers.jobs.recompute_chunk"  # one chunk of a full recompute shared out as jobs
SYNC_JOB = "workers.jobs.sync"
PURGE_JOB = "service.state.ops.purge_job"
REPLAY_JOB = "service.state.replay.replay_job"
ARCHIVE_JOB = "service.state.archive.archive_job"
JOBS = (REFRESH_JOB, FULL_RECOMPUTE_JOB, RECOMPUTE_CHUNK_JOB, SYNC_JOB, PURGE_JOB, REPLAY_JOB, ARCHIVE_JOB)

CRON_CONFIG = "workers.cron"  # the module that registers the scheduled jobs with rq's cron


def queue_purge_if_due(client: Any, queue: Any, space: str) -> bool:
    """``queue_purge`` when deletions an import or a replay applied left erased ids waiting (``Keys.forgotten_ids``);
    whether it did. ``client``: the STATE Redis."""
    from service.spec.keys import Keys

    if not client.scard(Keys(space).forgotten_ids):
        return False
    queue_purge(queue, space)
    return True


def queue_purge(queue: Any, space: str) -> None:
    """After deletions: the job that purges the erased users' events from the log, the dead letters and the archive
    (retried for hours: the archive's lock may be held meanwhile). ``queue``: an rq ``Queue``."""
    from rq import Retry

    queue.enqueue(PURGE_JOB, space, description=f"purge forgotten ({space})",
                  retry=Retry(max=10, interval=[30, 60, 300, 900, 3600]))
