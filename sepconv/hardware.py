"""What this process may run on: cores from the affinity mask and the cgroup CPU quota.

A container limited with ``docker --cpus 2`` or a Kubernetes CPU limit of 2 still sees every
host core in its affinity mask; only the CFS quota says it gets two cores' worth of time. Sizing
workers and threads from the mask alone would oversubscribe such a container many times over.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: cgroup v2 unified hierarchy, and v1's cpu controller (both as mounted in a container).
CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _affinity_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def cgroup_cpu_limit(
    v2: Path = CGROUP_V2_CPU_MAX,
    v1_quota: Path = CGROUP_V1_QUOTA,
    v1_period: Path = CGROUP_V1_PERIOD,
) -> float | None:
    """Cores' worth of CPU time the cgroup quota allows, or None when unlimited or unknown."""
    try:
        quota, period = v2.read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(v1_quota.read_text())
        period_us = int(v1_period.read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cores() -> int:
    """Cores this process may use: the affinity mask, capped by the cgroup CPU quota (rounded
    up, so a quota of 1.5 cores gives 2 threads rather than starving one)."""
    cores = _affinity_cores()
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return cores
