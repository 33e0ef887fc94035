"""Per-minute buckets → rates over the last minute and hour (pure)."""

from __future__ import annotations

import pytest

from service.spec.rates import MINUTE_MS, OUTCOMES, minutes_back, rates, series, window

M = 29_000_000  # a minute number; M * MINUTE_MS is its first millisecond


def test_the_oldest_bucket_counts_for_the_part_of_it_the_window_covers() -> None:
    buckets = {M - 1: {"accepted": 60}, M: {"accepted": 30, "rejected": 3}}
    now = M * MINUTE_MS + 30_000  # half-way through minute M: the last minute is half of M-1 and all of M so far
    assert window(buckets, now, 1) == {"accepted": 60.0, "duplicate": 0.0, "rejected": 3.0, "suppressed": 0.0}
    out = rates(buckets, now)
    assert out["last_minute"]["accepted"] == 60 and out["last_minute_per_second"]["accepted"] == 1.0
    assert out["last_hour"]["accepted"] == 90 and out["last_hour_per_second"]["accepted"] == 0.025
    at_start = rates(buckets, M * MINUTE_MS)  # at a minute's first ms the previous minute is still whole
    assert at_start["last_minute"]["accepted"] == 90


def test_an_hour_takes_sixty_whole_minutes_and_a_share_of_the_sixty_first() -> None:
    buckets = {M - 60: {"duplicate": 300}, M - 59: {"duplicate": 1}, M - 61: {"duplicate": 10_000}}
    now = M * MINUTE_MS + 40_000  # two thirds into M: minute M-60 is covered for its last third
    assert window(buckets, now, 60)["duplicate"] == pytest.approx(100 + 1)
    assert rates(buckets, now)["last_minute"]["duplicate"] == 0


def test_replays_count_apart_and_the_series_is_one_row_a_minute() -> None:
    buckets = {M: {"accepted": 2, "replay:accepted": 500}, M - 3: {"suppressed": 4}}
    now = M * MINUTE_MS + 1
    assert window(buckets, now, 60)["accepted"] == 2
    assert window(buckets, now, 60, prefix="replay:")["accepted"] == 500
    rows = series(buckets, now)
    assert len(rows) == 60 and rows[-1] == {"minute_ms": M * MINUTE_MS, "accepted": 2, "duplicate": 0,
                                            "rejected": 0, "suppressed": 0}
    assert rows[-4]["suppressed"] == 4 and [r["minute_ms"] for r in rows] == sorted(r["minute_ms"] for r in rows)
    assert len(minutes_back(now)) == 61 and set(OUTCOMES) == {"accepted", "duplicate", "rejected", "suppressed"}
