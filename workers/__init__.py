"""RQ jobs and what they compute: ``compute`` (pure features, clusters, aggregates, channel patterns), ``mavera``
(client, rate limiter, sync), and at the top the job entry points, the cron schedule, the recompute and its locks.
"""
