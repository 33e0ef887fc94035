"""What in a status needs a person, and what to run next (pure: the status report in, lines out).

Each problem is ``{"space", "problem", "next"}``: what is wrong, in numbers, and the command that shows more or
fixes it, so `persona-sync status` (and the console) can print ``problem: next`` and nothing needs looking up.
"""

from __future__ import annotations

import time
from typing import Any

from croniter import croniter

from service.config import Settings

MEMORY_WARN_PCT = 80.0  # of maxmemory: at 100 % (noeviction) every write fails and intake answers 503
REPLICA_LAG_WARN_S = 10  # a replica silent this long: a failover now loses what it has not acknowledged
STALE_MS = 10 * 60_000  # dirty profiles waiting this long with no refresh: nobody is refreshing them
ERROR_CHARS = 200

Problem = dict[str, Any]


def when(ms: int) -> str:
    """A stored time for a person: UTC, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


def ago(ms: int, now_ms: int) -> str:
    seconds = max(0.0, (now_ms - ms) / 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def replicas(repl: dict | None) -> str:
    """STATE's replication in a line: replicas online and how far behind the furthest is."""
    if not repl:
        return "unknown"
    if repl["role"] == "replica":
        return "REDIS_URL names a replica (read-only)"
    if not repl["replicas"]:
        return "none"
    line = f"{repl['online']} of {repl['replicas']} online"
    if repl["lag_s"] is not None:
        line += f", last acknowledged {repl['lag_s']} s ago, {size(repl['behind_bytes'] or 0)} behind"
    return line


def _line(space: str | None, problem: str, next_step: str) -> Problem:
    return {"space": space, "problem": problem, "next": next_step}


def problems(rows: list[dict], deploy: dict, queue: dict | None, settings: Settings, now_ms: int) -> list[Problem]:
    """Every problem of the deployment first, then each space's."""
    out = _deployment(deploy, queue) + _replication(deploy["redis"].get("replication"), settings)
    for row in rows:
        out += _space(row, settings, now_ms)
    return out


def _deployment(deploy: dict, queue: dict | None) -> list[Problem]:
    out: list[Problem] = []
    mavera = deploy["mavera"]
    if mavera["paused"]:
        since = f" since {when(mavera['since_ms'])}" if mavera.get("since_ms") else ""
        out.append(_line(None, f"Mavera sync PAUSED{since}: {mavera.get('reason') or '402'}",
                         "top up the Mavera credits, then run `persona-sync resume`"))
    if queue is not None and "unreachable" in queue:
        out.append(_line(None, f"the queue Redis is unreachable ({queue['unreachable']})",
                         "check QUEUE_REDIS_URL (or REDIS_URL) and that Redis runs; nothing is refreshed meanwhile"))
    elif queue is not None:
        if queue["failed"]:
            out.append(_line(None, f"{queue['failed']} failed job(s)",
                             "run `persona-sync jobs` to see why, then `persona-sync requeue --all` once fixed"))
        waiting = queue["queued"] + queue["scheduled"]
        if waiting and not queue["workers"]:
            out.append(_line(None, f"{waiting} job(s) wait and no worker is running",
                             "start one: `persona-sync worker` (`make run` starts one; `persona-sync worker-alive` "
                             "checks a host's)"))
    memory = deploy["redis"]
    if memory["used_pct"] is not None and memory["used_pct"] >= MEMORY_WARN_PCT:
        out.append(_line(None, f"Redis memory at {memory['used_pct']:.0f} % of maxmemory ({size(memory['used_bytes'])}"
                               f" of {size(memory['max_bytes'])})",
                         "raise maxmemory, or shorten EVENT_LOG_RETENTION; at the limit intake answers 503"))
    if memory["policy"] and memory["policy"] != "noeviction":
        out.append(_line(None, f"Redis may evict keys (maxmemory-policy {memory['policy']}): profiles and dedupe "
                               "marks would be lost", "set `maxmemory-policy noeviction` (see deploy/redis.conf)"))
    refused = deploy["refusals"]["last_hour"]
    if refused:
        codes = ", ".join(f"{n} with {code}" for code, n in sorted(deploy["refusals"]["last_hour_by_status"].items())
                          if n)
        out.append(_line(None, f"{refused} request(s) refused before authentication in the last hour ({codes})",
                         "see `GET /admin/refusals`; if they are Segment's, add its secret to SEGMENT_SHARED_SECRETS "
                         "or its write key to SEGMENT_WRITE_KEYS"))
    return out


def _replication(repl: dict | None, settings: Settings) -> list[Problem]:
    """STATE's copies: fewer online than STATE_WAIT_REPLICAS asks for (every request is then answered 503), a
    replica that stopped acknowledging, or a REDIS_URL that names a replica (every write is refused)."""
    if not repl:
        return []
    out: list[Problem] = []
    if repl["role"] == "replica":
        out.append(_line(None, "REDIS_URL names a replica: every write is refused (READONLY) and intake answers 503",
                         "point REDIS_URL at the primary, or at the sentinels (redis+sentinel://...) to follow "
                         "failovers"))
        return out
    wanted = settings.state_wait_replicas
    if wanted and repl["online"] < wanted:
        out.append(_line(None, f"STATE_WAIT_REPLICAS is {wanted} but the STATE primary has {repl['online']} replica(s) "
                               "online: every request is answered 503 (its events are applied, not acknowledged)",
                         "start or repair the replica (`INFO replication` on the primary lists them), or lower "
                         "STATE_WAIT_REPLICAS"))
    if repl["lag_s"] is not None and repl["lag_s"] >= REPLICA_LAG_WARN_S:
        behind = f", {size(repl['behind_bytes'])} behind" if repl["behind_bytes"] else ""
        out.append(_line(None, f"a STATE replica last acknowledged {repl['lag_s']} s ago{behind}: a failover now "
                               "would lose what it has not received",
                         "check the replica's host and its link to the primary (`INFO replication` on both)"))
    return out


def _space(row: dict, settings: Settings, now_ms: int) -> list[Problem]:
    space, out = row["space"], []
    rejected = row["events"]["last_hour"]["rejected"]
    if row["dead_letters"] or rejected:
        out.append(_line(space, f"{row['dead_letters']} dead letter(s) in {space} ({size(row['dead_letter_bytes'])}), "
                                f"{rejected} event(s) rejected in the last hour",
                         f"run `persona-sync dead-letters list --space {space}`, then `persona-sync replay "
                         f"--dead-letters --space {space}` once the cause is fixed"))
    if row["refresh_failures_in_a_row"]:
        out.append(_line(space, f"the last {row['refresh_failures_in_a_row']} refresh(es) of {space} failed",
                         f"run `persona-sync jobs` to see why; once fixed, `persona-sync recompute --space {space}`"))
    out += _stale(row, settings, now_ms)
    failed = {c: p for c, p in row["personas"].items() if p.get("state") == "failed"}
    for cluster, persona in failed.items():
        out.append(_line(space, f"persona {cluster} of {space} failed: {(persona.get('error') or '?')[:ERROR_CHARS]}",
                         "run `persona-sync jobs` for Mavera's answer; once fixed, "
                         "`persona-sync requeue --function workers.jobs.sync`"))
    narrative = row["narrative"]
    if narrative and narrative["state"] == "failed":
        out.append(_line(space, f"the channel narrative of {space} failed: "
                                f"{(narrative['error'] or '?')[:ERROR_CHARS]}",
                         "run `persona-sync jobs`; once fixed, `persona-sync requeue --function workers.jobs.sync`"))
    outbox = sorted(c for c, p in row["personas"].items() if p.get("state") == "outbox")
    if outbox:
        out.append(_line(space, f"{len(outbox)} persona(s) of {space} wait in the outbox ({', '.join(outbox)})",
                         "set MAVERA_API_KEY for the workers and restart them: they push what waits"))
    return out


def _stale(row: dict, settings: Settings, now_ms: int) -> list[Problem]:
    """Dirty profiles nobody refreshes, and a full recompute the schedule should have run."""
    space, out = row["space"], []
    oldest = row["event_log"]["oldest_ms"]
    runs = [r["at_ms"] for r in (row["last_refresh"], row["last_full_recompute"]) if r and r.get("at_ms")]
    last = max(runs) if runs else oldest
    if row["dirty_profiles"] and not row["recompute_running"] and last is not None and now_ms - last > STALE_MS:
        out.append(_line(space, f"{row['dirty_profiles']} dirty profile(s) of {space} and no refresh since "
                                f"{ago(last, now_ms)}",
                         "new events queue a refresh within REFRESH_DEBOUNCE; if this stays, check that a worker "
                         f"runs (`persona-sync worker-alive`), then `persona-sync recompute --space {space}`"))
    schedule = croniter(settings.full_recompute_cron, now_ms / 1000)
    schedule.get_prev(float)
    due_ms = schedule.get_prev(float) * 1000  # the run before the latest: done by now whatever its length
    full = row["last_full_recompute"]
    if full and full.get("at_ms", 0) < due_ms:
        out.append(_line(space, f"no full recompute of {space} since {ago(full['at_ms'], now_ms)} (FULL_RECOMPUTE_CRON "
                                f"{settings.full_recompute_cron!r})", _cron_fix(space)))
    elif not full and row["profiles_created"] and oldest is not None and oldest < due_ms:
        out.append(_line(space, f"no full recompute of {space} yet, with events since {ago(oldest, now_ms)}",
                         _cron_fix(space)))
    return out


def _cron_fix(space: str) -> str:
    return (f"check that exactly one `persona-sync cron` runs; `persona-sync recompute --space {space}` runs one "
            "now")
