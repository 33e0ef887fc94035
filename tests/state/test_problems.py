"""Which states of a space are problems, and what the line says to run (pure: a status row in, lines out)."""

from __future__ import annotations

from typing import Any

from service.config import Settings
from service.spec.rates import OUTCOMES
from service.state.problems import problems

NOW = 1_800_000_000_000  # 2027-01-15 08:00:00 UTC, on the hour
HOUR = 3_600_000
QUIET = {"mavera": {"paused": False, "reason": None, "since_ms": None},
         "refusals": {"logged": 0, "last_hour": 0, "last_hour_by_status": {}},
         "redis": {"used_bytes": 10, "max_bytes": None, "policy": "noeviction", "used_pct": None}}


def row(**changes: Any) -> dict[str, Any]:
    zero = dict.fromkeys(OUTCOMES, 0)
    base = {"space": "s1", "events": {"last_hour": zero}, "profiles": 10, "profiles_created": 10, "dirty_profiles": 0,
            "recompute_running": False, "last_refresh": {"at_ms": NOW - 1000}, "refresh_failures_in_a_row": 0,
            "last_full_recompute": {"at_ms": NOW - 10 * 60_000}, "personas": {}, "narrative": None,
            "dead_letters": 0, "dead_letter_bytes": 0, "event_log": {"entries": 1, "oldest_ms": NOW - 30 * 86400_000}}
    return base | changes


def lines(*rows: dict[str, Any], queue: dict[str, Any] | None = None) -> list[str]:
    return [f"{p['problem']}: {p['next']}" for p in problems(list(rows), QUIET, queue, Settings(), NOW)]


def test_a_healthy_space_has_no_problem() -> None:
    assert lines(row(), queue={"queued": 3, "running": 1, "scheduled": 0, "deferred": 0, "failed": 0,
                               "workers": 2}) == []


def test_dirty_profiles_nobody_refreshes() -> None:
    stuck = row(dirty_profiles=7, last_refresh={"at_ms": NOW - HOUR}, last_full_recompute={"at_ms": NOW - HOUR})
    [line] = lines(stuck)
    assert line.startswith("7 dirty profile(s) of s1 and no refresh since 1 h ago") and "worker-alive" in line
    assert lines(stuck | {"recompute_running": True}) == []  # a recompute is on them
    assert lines(row(dirty_profiles=7)) == []  # the last refresh was a second ago: one is surely coming


def test_a_full_recompute_the_schedule_missed() -> None:
    [line] = lines(row(last_full_recompute={"at_ms": NOW - 2 * HOUR - 1}))  # hourly: missed the run an hour ago
    assert "no full recompute of s1 since 2 h ago" in line and "`persona-sync cron`" in line
    assert "`persona-sync recompute --space s1`" in line
    assert lines(row(last_full_recompute={"at_ms": NOW - HOUR + 60_000})) == []  # the on-the-hour run is running
    [never] = lines(row(last_full_recompute=None))
    assert never.startswith("no full recompute of s1 yet")
    assert lines(row(last_full_recompute=None, event_log={"entries": 1, "oldest_ms": NOW - 60_000})) == []


def test_personas_and_the_narrative() -> None:
    personas = {"a": {"state": "outbox"}, "b": {"state": "outbox"}, "c": {"state": "failed", "error": "x" * 500},
                "d": {"state": "pending", "error": "rate limited"}}
    found = lines(row(personas=personas, narrative={"state": "failed", "error": "timeout"}))
    assert found[0] == ("persona c of s1 failed: " + "x" * 200 + ": run `persona-sync jobs` for Mavera's answer; "
                        "once fixed, `persona-sync requeue --function workers.jobs.sync`")
    assert found[1].startswith("the channel narrative of s1 failed: timeout: run `persona-sync jobs`")
    assert found[2].startswith("2 persona(s) of s1 wait in the outbox (a, b): set MAVERA_API_KEY")
    assert len(found) == 3  # pending retries on its own


def test_the_queue() -> None:
    assert lines(row(), queue={"unreachable": "ConnectionError: refused"})[0].startswith(
        "the queue Redis is unreachable (ConnectionError: refused): check QUEUE_REDIS_URL")
    idle = {"queued": 0, "running": 0, "scheduled": 2, "deferred": 0, "failed": 3, "workers": 0}
    assert lines(row(), queue=idle) == [
        "3 failed job(s): run `persona-sync jobs` to see why, then `persona-sync requeue --all` once fixed",
        "2 job(s) wait and no worker is running: start one: `persona-sync worker` (`make run` starts one; "
        "`persona-sync worker-alive` checks a host's)"]
