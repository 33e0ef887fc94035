"""``rq cron`` configuration: the scheduled jobs. Exactly one ``persona-sync cron`` runs per deployment.

The full recompute holds each space's recompute lock, so a slow run never overlaps the next or a refresh.
"""

from __future__ import annotations

from rq import cron

from service.config import Settings
from service.state.queue import QUEUE_NAME
from workers.jobs import full_recompute

cron.register(full_recompute, QUEUE_NAME, cron=Settings.from_env().full_recompute_cron, name="full-recompute",
              job_timeout=3600)
