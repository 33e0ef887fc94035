"""``rq cron`` configuration: the scheduled jobs. Exactly one ``persona-sync cron`` runs per deployment."""

from __future__ import annotations

import os

from rq import cron

QUEUE = "persona-sync"

# The full recompute (ages windows out, rebuilds every aggregate). Its job holds a Redis lock, so an overlap
# with a slow previous run is harmless.
cron.register("workers.jobs.full_recompute", QUEUE, cron=os.environ.get("FULL_RECOMPUTE_CRON", "0 * * * *"),
              name="full-recompute")
