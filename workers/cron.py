"""``rq cron`` configuration: the scheduled jobs. Exactly one ``persona-sync cron`` runs per deployment.

The full recompute runs as one job per space, each holding its space's recompute lock, so a slow run never
overlaps the next or a refresh.
"""

from __future__ import annotations

from rq import cron

from service.config import Settings
from service.state.archive import archive_job
from service.state.queue import QUEUE_NAME
from workers.jobs import full_recompute_each_space

settings = Settings.from_env()
# one short job that queues a full recompute per space (each with its own hour: workers/jobs.py)
cron.register(full_recompute_each_space, QUEUE_NAME, cron=settings.full_recompute_cron, name="full-recompute",
              job_timeout=300)
if settings.event_archive_dir:  # every minute: events go to the archive files, then the log is trimmed
    cron.register(archive_job, QUEUE_NAME, interval=60, name="archive", job_timeout=3600)
