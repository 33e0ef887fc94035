"""How many cores this process may use: the ones it may run on, capped by its container's CPU limit.

``os.cpu_count()`` is the machine's: a worker pod limited to one CPU on a 16-core node would fork four recompute
processes, each throttled to a quarter core and each holding its share of the profiles in memory. Kubernetes and
Docker set the limit as a CFS quota in the cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def quota_cores(quota: str, period: str) -> int | None:
    """Whole cores a CFS quota allows (rounded up: 1.5 CPUs run two processes well), None when unlimited
    (``max`` or ``-1``) or unreadable."""
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    if q <= 0 or p <= 0:
        return None
    return max(1, math.ceil(q / p))


def limit_cores(root: Path = CGROUP) -> int | None:
    """The container's CPU limit in whole cores, None without one (cgroup v2, then v1)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return quota_cores(quota, period)
    except (OSError, ValueError):
        pass
    try:
        return quota_cores((root / "cpu" / "cpu.cfs_quota_us").read_text().strip(),
                           (root / "cpu" / "cpu.cfs_period_us").read_text().strip())
    except OSError:
        return None


def usable_cpus() -> int:
    """Cores this process may run on (its affinity), capped by the container's CPU limit."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = limit_cores()
    return max(1, min(cores, limit) if limit else cores)
