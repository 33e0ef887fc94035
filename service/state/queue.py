"""The one place for the RQ queue's name and the jobs' dotted paths.

``service/`` never imports ``workers/``: jobs are queued by their dotted path, and these strings are the whole of
that contract (``tests/test_layout.py`` checks that each one resolves to a function). ``persona-sync cron`` hands
``CRON_CONFIG`` to ``rq cron``.
"""

from __future__ import annotations

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
