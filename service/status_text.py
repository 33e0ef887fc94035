"""The status report (``service/state/status.py``) as a person reads it in a terminal: `persona-sync status`.

Values that come from outside (Mavera's error messages, space and cluster names) are rich ``Text``, never markup,
so a ``[`` in them prints as it is. Problem lines are never cut to the terminal's width: they hold the command to
run next.
"""

from __future__ import annotations

from typing import IO, Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from service.spec.rates import OUTCOMES
from service.state.problems import ago, replicas, size, when


def _run(run: dict | None, now_ms: int) -> str:
    if not run:
        return "none yet"
    reason = f", {run['reason']}" if run.get("reason") and run["reason"] != "scheduled" else ""
    return (f"{when(run['at_ms'])} ({ago(run['at_ms'], now_ms)}), {run['seconds']:.2f} s, "
            f"{run['profiles']:,} profile(s){reason}")


def _persona(cluster: str, p: dict[str, Any], now_ms: int) -> str:
    state, last = p.get("state") or "?", p.get("last_sync_ms")
    if state == "synced":
        return f"{cluster} synced" + (f" {ago(last, now_ms)}" if last else "")
    synced = f" (last synced {ago(last, now_ms)})" if last else ""
    return f"{cluster} {state}{synced}" + (f": {p['error']}" if p.get("error") else "")


def _rate(per_second: float) -> str:
    if per_second == 0:
        return "0"
    return "<0.01" if per_second < 0.01 else f"{per_second:,.2f}" if per_second < 100 else f"{per_second:,.0f}"


def _events(row: dict) -> Table:
    events = row["events"]
    table = Table("events/s (events)", "last minute", "last hour", box=box.SIMPLE_HEAD, pad_edge=False)
    for outcome in OUTCOMES:
        table.add_row(outcome, *(f"{_rate(events[w + '_per_second'][outcome])} ({events[w][outcome]:,})"
                                 for w in ("last_minute", "last_hour")))
    replayed = {outcome: n for outcome, n in row["replayed_last_hour"].items() if n}
    if replayed:  # what they applied, and apart from it what they found already there or refused
        table.caption = "imports and replays in the last hour: " + ", ".join(f"{n:,} {outcome}"
                                                                           for outcome, n in replayed.items())
    return table


def _pairs(rows: list[tuple[str, str]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for name, value in rows:
        grid.add_row(name, Text(value))
    return grid


def _space(row: dict, now_ms: int) -> Table:
    log = row["event_log"]
    oldest = f", oldest {when(log['oldest_ms'])} ({ago(log['oldest_ms'], now_ms)})" if log["oldest_ms"] else ""
    running = "; a recompute is running" if row["recompute_running"] else ""
    personas = [_persona(c, p, now_ms) for c, p in row["personas"].items()] or ["none yet"]
    narrative = row["narrative"]
    return _pairs([
        ("profiles", f"{row['profiles']:,} live at the last refresh ({row['profiles_created']:,} created); "
                     f"{row['dirty_profiles']:,} dirty{running}"),
        ("last refresh", _run(row["last_refresh"], now_ms)
         + (f"; {row['refresh_failures_in_a_row']} failed since" if row["refresh_failures_in_a_row"] else "")),
        ("full recompute", _run(row["last_full_recompute"], now_ms)),
        ("personas", "\n".join(personas)),
        *([("narrative", narrative["state"] + (f": {narrative['error']}" if narrative["error"] else ""))]
          if narrative else []),
        ("dead letters", f"{row['dead_letters']:,} ({size(row['dead_letter_bytes'])})"),
        ("event log", f"{log['entries']:,} entries{oldest}"),
    ])


def _deployment(report: dict) -> Table:
    q, mavera, memory, refusals = report["queue"], report["mavera"], report["redis"], report["refusals"]
    if q is None:
        queue = "no queue configured"
    elif "unreachable" in q:
        queue = f"unreachable: {q['unreachable']}"
    else:
        queue = (f"{q['queued']} queued, {q['running']} running, {q['scheduled']} scheduled, {q['deferred']} deferred, "
                 f"{q['failed']} failed; {q['workers']} worker(s)")
    pause = "syncing"
    if any(p.get("state") == "outbox" for row in report["spaces"] for p in row["personas"].values()):
        pause = "outbox mode: personas kept here, not sent (the workers have no MAVERA_API_KEY)"
    if mavera.get("blocked_until_ms"):
        pause = f"waiting: Mavera asked (Retry-After) that no worker call it before {when(mavera['blocked_until_ms'])}"
    if mavera["paused"]:
        pause = "PAUSED" + (f" since {when(mavera['since_ms'])}" if mavera["since_ms"] else "") + \
            f": {mavera['reason'] or '?'}"
    limit = (f" of {size(memory['max_bytes'])} ({memory['used_pct']:.0f} %)" if memory["max_bytes"]
             else " (no maxmemory set)")
    return _pairs([
        ("queue", queue),
        ("Mavera", pause),
        ("Redis", f"{size(memory['used_bytes'])} used{limit}, maxmemory-policy {memory['policy']}"),
        ("replicas", replicas(memory.get("replication"))),
        ("refusals", f"{refusals['logged']:,} logged; {refusals['last_hour']:,} in the last hour"),
    ])


def render(report: dict, out: IO[str] | None = None) -> None:
    """Print the report: each space, the deployment, then the problems with what to run next."""
    console = Console(file=out, highlight=False)
    now_ms = report["at_ms"]
    console.print(Text(f"persona-sync status at {when(now_ms)}", style="bold"))
    if not report["spaces"]:
        console.print("no space has received an event yet")
    for row in report["spaces"]:
        console.print()
        console.print(Text(f"space {row['space']}", style="bold underline"))
        console.print(_events(row))
        console.print(_space(row, now_ms))
    console.print()
    console.print(Text("deployment", style="bold underline"))
    console.print(_deployment(report))
    console.print()
    if not report["problems"]:
        console.print(Text("no problems", style="green"))
        return
    console.print(Text(f"{len(report['problems'])} problem(s), and what to run next", style="bold red"))
    for p in report["problems"]:
        console.print(Text.assemble(("! ", "bold red"), f"{p['problem']}: {p['next']}"), soft_wrap=True)
