"""The recompute's process count follows the container's CPU limit, not the machine's core count."""

from __future__ import annotations

from pathlib import Path

from workers.cpus import limit_cores, quota_cores, usable_cpus


def test_a_cfs_quota_in_whole_cores() -> None:
    assert quota_cores("100000", "100000") == 1
    assert quota_cores("150000", "100000") == 2  # 1.5 CPUs: two processes use them
    assert quota_cores("50000", "100000") == 1
    assert quota_cores("max", "100000") is None and quota_cores("-1", "100000") is None
    assert quota_cores("", "100000") is None and quota_cores("100000", "0") is None


def test_the_limit_is_read_from_cgroup_v2_then_v1(tmp_path: Path) -> None:
    assert limit_cores(tmp_path) is None  # neither: no limit
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert limit_cores(tmp_path) == 2  # v1
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert limit_cores(tmp_path) == 1  # v2 first
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert limit_cores(tmp_path) is None


def test_usable_cpus_never_exceeds_the_affinity() -> None:
    import os

    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
