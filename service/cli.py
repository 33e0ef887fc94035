"""``persona-sync``: the one command for developers and operators. Every subcommand has ``--help``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.config import VARIABLES, ConfigError, Settings, queue_url, state_url
from service.state.queue import CRON_CONFIG, FULL_RECOMPUTE_JOB, QUEUE_NAME


def cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    from service.devstack.supervisor import run_dev

    return run_dev(settings, with_worker=not args.no_worker, with_cron=not args.no_cron)


def cmd_web(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    state_url(settings)  # refuse to start without a Redis to talk to (the app resolves it the same way)
    workers = args.workers or settings.web_concurrency
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import shutil
        import tempfile

        prom = Path(tempfile.gettempdir()) / f"persona-sync-metrics-{os.getpid()}"
        shutil.rmtree(prom, ignore_errors=True)
        prom.mkdir()
        # prometheus-client's own interface (not one of our settings): read by each uvicorn worker as it imports
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
    uvicorn.run("service.http.asgi:app", host=args.host or settings.host, port=args.port or settings.port,
                workers=workers, access_log=False, log_config=None,
                http="service.http.protocol:BoundedHttpToolsProtocol",
                timeout_graceful_shutdown=10)
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    import redis
    from rq import Queue, Worker

    from service.logs import setup

    setup(settings.log_level)
    conn = redis.Redis.from_url(queue_url(settings))
    if settings.mavera_api_key:  # personas kept in the outbox (no key until now) or paused go out at once
        from service.state.refresh import enqueue_sync

        try:
            enqueue_sync(redis.Redis.from_url(state_url(settings)), queue_url(settings), settings.mave_chat_timeout,
                         only_waiting=True)
        except redis.RedisError as exc:  # the worker still starts; the next refresh or hourly run syncs
            print(f"persona-sync worker: could not queue the waiting syncs ({exc}); continuing", file=sys.stderr)
    queue = Queue(QUEUE_NAME, connection=conn)
    watchdog = None
    if not args.burst:  # refreshes that a crash or a Redis restart left behind are queued again within seconds
        from service.state.refresh import RefreshWatchdog

        watchdog = RefreshWatchdog(redis.Redis.from_url(state_url(settings)), queue, settings.refresh_debounce)
        try:
            watchdog.check()
        except redis.RedisError as exc:
            print(f"persona-sync worker: Redis not reachable yet ({exc}); the watchdog keeps trying", file=sys.stderr)
        watchdog.start()
    class StoppableWorker(Worker):
        """Remembers a stop request (SIGTERM, Ctrl-C), so that Redis going away during shutdown ends the process
        instead of starting a new worker."""

        stop_signalled = False

        def request_stop(self, signum: int, frame: Any) -> None:
            self.stop_signalled = True
            super().request_stop(signum, frame)

    try:
        return _work(lambda: StoppableWorker([queue], connection=conn), args.burst)
    finally:
        if watchdog:
            watchdog.stop()


def _work(make_worker: Callable[[], Any], burst: bool) -> int:
    """Run an RQ worker; when Redis goes away under it (a restart, a failover), start a new one once Redis is back
    instead of exiting: RQ retries only while it waits for a job, not while it registers or reports one."""
    import redis

    backoff = 0.5
    while True:
        worker = None
        try:
            worker = make_worker()
            worker.work(with_scheduler=True, burst=burst)
            return 0
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if getattr(worker, "stop_signalled", False):
                return 0  # asked to stop: Redis going away (often with the rest of the stack) changes nothing
            print(f"persona-sync worker: Redis unreachable ({exc}); starting again in {backoff:.1f} s",
                  file=sys.stderr, flush=True)
        if worker is not None and worker.scheduler:
            worker.stop_scheduler()
        time.sleep(backoff)
        backoff = min(backoff * 2, 5.0)


def cmd_recompute(settings: Settings, args: argparse.Namespace) -> int:
    """A full recompute now, run by a worker at the front of the queue, for an operator who does not want to wait
    for the scheduled run. A recompute lock left by a process of this host that died is cleared first."""
    import redis
    from rich.progress import Progress
    from rq import Queue, Worker
    from rq.job import JobStatus

    from service.spec.keys import Keys
    from service.state.holders import clear_if_gone
    from service.state.refresh import REFRESH_TIMEOUT
    from service.state.status import spaces

    client = redis.Redis.from_url(state_url(settings))
    chosen = [args.space] if args.space else spaces(client)
    if not chosen:
        print("no spaces yet: nothing to recompute")
        return 0
    for space in chosen:
        if cleared := clear_if_gone(client, Keys(space).recompute_lock):  # no need to wait for it to lapse
            print(f"{space}: cleared the recompute lock of a process that no longer runs ({cleared.decode()})")
        elif holder := client.get(Keys(space).recompute_lock):
            print(f"{space}: a recompute is running ({holder.decode()}); this one waits up to 30 s for it, "
                  "else skips the space")
    conn = redis.Redis.from_url(queue_url(settings))
    queue = Queue(QUEUE_NAME, connection=conn)
    if not Worker.count(queue=queue):
        print("no worker is running: start one (`persona-sync worker`, or `make run`), then run this again",
              file=sys.stderr)
        return 1
    job = queue.enqueue(FULL_RECOMPUTE_JOB, args.space, at_front=True, job_timeout=REFRESH_TIMEOUT,
                        description="full recompute (persona-sync recompute)")
    with Progress() as bar:
        task = bar.add_task(f"recomputing {', '.join(chosen)}", total=None)
        while (status := job.get_status(refresh=True)) not in (JobStatus.FINISHED, JobStatus.FAILED,
                                                              JobStatus.STOPPED, JobStatus.CANCELED, None):
            bar.update(task, completed=job.get_meta(refresh=True).get("profiles", 0))
            time.sleep(0.5)
    if status != JobStatus.FINISHED:
        print(f"the recompute did not finish ({status}): see `rq info -u <queue url>` and the worker's log",
              file=sys.stderr)
        return 1
    for report in job.return_value() or []:
        if "skipped" in report:
            print(f"{report['space']}: skipped: {report['skipped']}", file=sys.stderr)
        else:
            print(f"{report['space']}: {report['profiles']} profiles in {report['seconds']} s; clusters changed: "
                  f"{', '.join(report['changed_clusters']) or 'none'}; sync queued")
    return 0


def cmd_cron(settings: Settings, args: argparse.Namespace) -> int:
    rq = Path(sys.executable).with_name("rq")
    os.execv(str(rq), [str(rq), "cron", CRON_CONFIG, "--url", queue_url(settings)])
    return 0  # not reached


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    import redis

    from service.state.ops import space_status

    client = redis.Redis.from_url(state_url(settings))
    for row in space_status(client, args.space):
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    return 0


def cmd_forget(settings: Settings, args: argparse.Namespace) -> int:
    import redis

    from service.state.ops import forget

    client = redis.Redis.from_url(state_url(settings))
    outcome = forget(client, settings, args.space or settings.space_id, args.user_id)
    print(f"{outcome.status}: profile {outcome.profile_id or '(none found)'}; userId suppressed from now on")
    return 0


def cmd_replay_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    import redis
    from rich.progress import Progress

    from service.spec.keys import Keys
    from service.state.ops import replay_dead_letters

    client = redis.Redis.from_url(state_url(settings))
    space = args.space or settings.space_id
    total = client.xlen(Keys(space).dead_letters)
    with Progress() as bar:
        task = bar.add_task(f"replaying dead letters of {space}", total=total)
        counts = replay_dead_letters(client, settings, space, progress=lambda n: bar.advance(task, n),
                                     drop_unauthenticated=args.drop_unauthenticated)
    print(f"{counts['replayed']} of {counts['entries']} dead letters replayed ({counts['events_applied']} events "
          f"applied); {counts['kept']} still invalid and kept: see GET /admin/dead-letters")
    if counts["unauthenticated"]:
        fate = "deleted" if args.drop_unauthenticated else "kept (delete them with --drop-unauthenticated)"
        print(f"{counts['unauthenticated']} dead letters came from requests that failed authentication (stored by an "
              f"earlier version): never applied; {fate}")
    return 0


def cmd_resume(settings: Settings, args: argparse.Namespace) -> int:
    import orjson
    import redis

    from service.state.ops import paused, resume
    from service.state.refresh import enqueue_sync

    client = redis.Redis.from_url(state_url(settings))
    why = paused(client)
    resume(client)
    print(f"Mavera sync resumed (was paused: {orjson.dumps(why).decode()})" if why else "Mavera sync was not paused")
    chosen = enqueue_sync(client, queue_url(settings), settings.mave_chat_timeout)
    print(f"sync queued for {len(chosen)} space(s): {', '.join(chosen) or 'none yet'}")
    return 0


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    print("| Variable | Default | Meaning |\n|---|---|---|")
    for name, default, meaning in VARIABLES:
        print(f"| `{name}` | `{default}` | {meaning} |" if default else f"| `{name}` | | {meaning} |")
    return 0


def cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    """The benchmarks live in the repository (bench/), not in the installed package: run them from there."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "run.py").exists():
        print("the benchmarks need a checkout of the repository: run `make bench` there", file=sys.stderr)
        return 2
    os.chdir(root)
    os.execv(sys.executable, [sys.executable, "-m", "bench.run", *args.rest])
    return 0  # not reached


def cmd_worker_alive(settings: Settings, args: argparse.Namespace) -> int:
    """Liveness probe of a worker container: exit 0 if an RQ worker started on this host (the pod) sent a heartbeat
    within ``--max-age`` seconds, else exit 1 saying what is wrong.

    rq heartbeats every 30 s while a job runs but only once per blocking dequeue when idle (worker_ttl - 15 =
    405 s by default), so the default limit is worker_ttl + 60, the time rq itself keeps a silent worker's key:
    anything shorter would restart healthy idle workers."""
    import socket
    from datetime import UTC, datetime

    import redis
    from rq import Queue, Worker
    from rq.defaults import DEFAULT_WORKER_TTL

    max_age = args.max_age if args.max_age is not None else DEFAULT_WORKER_TTL + 60
    host = socket.gethostname()
    try:
        conn = redis.Redis.from_url(queue_url(settings), socket_timeout=5, socket_connect_timeout=5)
        workers = [w for w in Worker.all(queue=Queue(QUEUE_NAME, connection=conn)) if w.hostname == host]
    except redis.RedisError as exc:
        print(f"worker-alive: cannot read the RQ workers from the queue Redis: {exc}", file=sys.stderr)
        return 1
    now = datetime.now(UTC)
    ages = sorted((now - w.last_heartbeat).total_seconds() for w in workers if w.last_heartbeat)
    if ages and ages[0] <= max_age:
        print(f"worker-alive: ok, last heartbeat {ages[0]:.0f} s ago ({len(workers)} worker(s) on {host})")
        return 0
    if not workers:
        print(f"worker-alive: no RQ worker of queue {QUEUE_NAME} registered from host {host}", file=sys.stderr)
    elif not ages:
        print(f"worker-alive: the RQ worker(s) on {host} never sent a heartbeat", file=sys.stderr)
    else:
        print(f"worker-alive: the newest heartbeat of an RQ worker on {host} is {ages[0]:.0f} s old "
              f"(limit {max_age:g} s): the worker is stuck or cannot reach Redis", file=sys.stderr)
    return 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="persona-sync", description="Segment events in, live profiles and Mavera "
                                "personas out. Configuration comes from environment variables (`persona-sync config`).")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("dev", help="run everything: embedded Redis (unless REDIS_URL), web, worker, cron",
                       description="The whole stack under one supervisor for a laptop or a single box: a program "
                                   "that dies is restarted. One DATA_DIR holds one stack. Ctrl-C stops all.")
    d.add_argument("--no-worker", action="store_true", help="do not start the RQ worker")
    d.add_argument("--no-cron", action="store_true", help="do not start the rq cron scheduler")
    d.set_defaults(func=cmd_dev)
    w = sub.add_parser("web", help="serve the HTTP API with uvicorn", description="Serve the receiver and read APIs.")
    w.add_argument("--host", help="bind address (default HOST)")
    w.add_argument("--port", type=int, help="port (default PORT)")
    w.add_argument("--workers", type=int, help="uvicorn processes (default WEB_CONCURRENCY)")
    w.set_defaults(func=cmd_web)
    k = sub.add_parser("worker", help="run one RQ worker (with its scheduler)",
                       description="Run recompute and sync jobs from the persona-sync queue.")
    k.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    k.set_defaults(func=cmd_worker)
    wa = sub.add_parser("worker-alive", help="liveness probe: exit 0 if this host's RQ worker has a recent heartbeat",
                        description="Exit 0 when an RQ worker registered from this host (the pod) sent a heartbeat "
                                    "recently, else 1 with the reason. For a Kubernetes exec liveness probe.")
    wa.add_argument("--max-age", type=float, help="seconds a heartbeat stays recent (default: rq's worker TTL + 60, "
                                                  "480 s; an idle rq worker heartbeats every 405 s)")
    wa.set_defaults(func=cmd_worker_alive)
    c = sub.add_parser("cron", help="run the rq cron scheduler (exactly one per deployment)",
                       description="Enqueue the scheduled full recompute. Run exactly one of these.")
    c.set_defaults(func=cmd_cron)
    rc = sub.add_parser("recompute", help="run a full recompute now (all spaces, or one), then queue the syncs",
                        description="Rebuild clusters, KPI cards and channel patterns from every profile now, "
                                    "instead of waiting for the scheduled run: a running worker takes the job at "
                                    "the front of the queue, and this command shows its progress. A recompute that "
                                    "is running is waited for (up to 30 s); a lock left by a process of this host "
                                    "that died is cleared.")
    rc.add_argument("--space", help="only this space")
    rc.set_defaults(func=cmd_recompute)
    s = sub.add_parser("status", help="profiles, dirty set, event log and dead letters per space",
                       description="Print the state of every space (or one).")
    s.add_argument("--space", help="only this space")
    s.set_defaults(func=cmd_status)
    f = sub.add_parser("forget", help="GDPR: erase a user's profile and suppress the userId",
                       description="Erase the profile of USER_ID (identifiers, traits, logged events) and drop "
                                   "that userId's events from now on, exactly as a Segment delete call does.")
    f.add_argument("user_id")
    f.add_argument("--space", help="space (default SPACE_ID)")
    f.set_defaults(func=cmd_forget)
    d2 = sub.add_parser("replay-dead-letters", help="apply the dead letters again; what applies is removed",
                        description="Re-apply refused events that had passed authentication (after a fix). Events "
                                    "that are still invalid stay in the dead-letter stream; nothing that failed "
                                    "authentication is ever applied.")
    d2.add_argument("--space", help="space (default SPACE_ID)")
    d2.add_argument("--drop-unauthenticated", action="store_true",
                    help="delete dead letters of requests that failed authentication (never applied either way)")
    d2.set_defaults(func=cmd_replay_dead_letters)
    r = sub.add_parser("resume", help="resume Mavera syncing after it paused (402: credits exhausted)",
                       description="Clear the pause that a 402 from Mavera set; the next sync pushes what waited.")
    r.set_defaults(func=cmd_resume)
    g = sub.add_parser("config", help="print every environment variable with its default and meaning",
                       description="Print the configuration table (Markdown).")
    g.set_defaults(func=cmd_config)
    b = sub.add_parser("bench", help="run the benchmarks (see BENCHMARKS.md)", add_help=False,
                       description="Run the benchmarks; `persona-sync bench --help` lists their options.")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark driver, --help included
        args = argparse.Namespace(func=cmd_bench, rest=argv[1:])
    else:
        args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return args.func(settings, args) or 0
    except BrokenPipeError:  # `persona-sync config | head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout again at exit
        return 0


def version() -> str:
    """The installed package's version (pyproject.toml), or "unknown" from a bare checkout."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("segment-persona-sync")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
