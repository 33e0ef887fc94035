"""Which states of a space are problems, and what the line says to run (pure: a status row in, lines out)."""

from __future__ import annotations

from typing import Any

from service.config import Settings
from service.spec.rates import OUTCOMES
from service.state.problems import problems, replicas
from service.state.status import replication

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


def test_replication_read_from_info_replication() -> None:
    """``INFO replication`` as redis-py parses it: replicas connected and online, the furthest one behind; of a
    Cluster (one reply per primary), the primary with the fewest online."""
    info = {"role": "master", "connected_slaves": 2, "master_repl_offset": 5000,
            "slave0": {"ip": "10.0.0.2", "port": 6379, "state": "online", "offset": 4000, "lag": 1},
            "slave1": {"ip": "10.0.0.3", "port": 6379, "state": "wait_bgsave", "offset": 0, "lag": 0}}
    assert replication(info) == {"role": "primary", "replicas": 2, "online": 1, "lag_s": 1, "behind_bytes": 1000}
    assert replication({"role": "master", "connected_slaves": 0, "master_repl_offset": 0}) == {
        "role": "primary", "replicas": 0, "online": 0, "lag_s": None, "behind_bytes": None}
    assert replication({"role": "slave", "master_host": "10.0.0.1"})["role"] == "replica"
    cluster = {"10.0.0.1:7000": info, "10.0.0.4:7000": {"role": "master", "master_repl_offset": 9,
                                                        "slave0": {"state": "online", "offset": 9, "lag": 0}}}
    assert replication(cluster)["online"] == 1 and replication(cluster)["behind_bytes"] == 1000


def test_replicas_fewer_than_state_wait_replicas_a_silent_one_or_a_url_naming_a_replica() -> None:
    def found(repl: dict[str, Any], wait: int = 0) -> list[str]:
        deploy = QUIET | {"redis": QUIET["redis"] | {"replication": repl}}
        return [f"{p['problem']}: {p['next']}" for p in
                problems([], deploy, None, Settings(state_wait_replicas=wait), NOW)]

    one = {"role": "primary", "replicas": 1, "online": 1, "lag_s": 0, "behind_bytes": 0}
    assert found(one) == [] and found(one, wait=1) == []
    [short] = found(one, wait=2)
    assert short.startswith("STATE_WAIT_REPLICAS is 2 but the STATE primary has 1 replica(s) online: every "
                            "request is answered 503") and "lower STATE_WAIT_REPLICAS" in short
    [silent] = found(one | {"lag_s": 12, "behind_bytes": 3 << 20})
    assert silent.startswith("a STATE replica last acknowledged 12 s ago, 3.0 MB behind")
    [readonly] = found({"role": "replica", "replicas": 0, "online": 0, "lag_s": None, "behind_bytes": None})
    assert readonly.startswith("REDIS_URL names a replica") and "redis+sentinel://" in readonly
    assert found({"role": "primary", "replicas": 0, "online": 0, "lag_s": None, "behind_bytes": None}) == []
    assert replicas(one) == "1 of 1 online, last acknowledged 0 s ago, 0 B behind"
