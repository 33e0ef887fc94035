"""``persona-sync``: the one command for developers and operators. Every subcommand has ``--help``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.config import (
    DEFAULT_REPLAY_RATE,
    VARIABLES,
    ConfigError,
    Settings,
    dev_stack_env,
    queue_url,
    redact,
    runs_dev_stack,
    state_url,
)
from service.state.queue import CRON_CONFIG, FULL_RECOMPUTE_JOB, QUEUE_NAME

DONE = "done"  # the checkpoint of a share of `import --workers N` that finished


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
    from service.state.connect import connect
    from service.state.connect import state_client as connect_state
    from service.state.upgrade import rename_legacy_keys

    setup(settings.log_level)
    rules = settings.cluster_rules_file  # read at every recompute: missing, every job would fail, long after the start
    if rules and not os.access(rules, os.R_OK):
        raise CommandError(f"CLUSTER_RULES_FILE={rules!r}: no such readable file on this host (leave it empty for "
                           "the packaged rules)")
    try:
        rename_legacy_keys(connect_state(settings))
    except redis.RedisError:
        pass  # not reachable yet: the web renames them, or the next start does
    conn = connect(queue_url(settings))
    if settings.mavera_api_key:  # personas kept in the outbox (no key until now) or paused go out at once
        from service.state.refresh import enqueue_sync

        try:
            enqueue_sync(connect_state(settings), conn, settings.mave_chat_timeout,
                         only_waiting=True)
        except redis.RedisError as exc:  # the worker still starts; the next refresh or hourly run syncs
            print(f"persona-sync worker: could not queue the waiting syncs ({exc}); continuing", file=sys.stderr)
    queue = Queue(QUEUE_NAME, connection=conn)
    watchdog = None
    if not args.burst:  # refreshes that a crash or a Redis restart left behind are queued again within seconds
        from service.state.refresh import RefreshWatchdog

        watchdog = RefreshWatchdog(connect_state(settings), queue, settings.refresh_debounce,
                                   mave_chat_timeout=settings.mave_chat_timeout)
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
    from rich.progress import Progress
    from rq import Queue
    from rq.job import JobStatus

    from service.spec.keys import Keys
    from service.state.holders import clear_if_gone
    from service.state.refresh import REFRESH_TIMEOUT
    from service.state.status import queue_depths, spaces

    client = state_client(settings)
    _known_space(client, args.space, "there is nothing to recompute")
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
    conn = queue_client(settings)
    queue = Queue(QUEUE_NAME, connection=conn)
    no_worker = "no worker is running: start one (`persona-sync worker`, or `make run`), then run this again"
    if not queue_depths(conn)["workers"]:  # live ones: a worker killed outright stays registered (rq's count)
        print(no_worker, file=sys.stderr)
        return 1
    job = queue.enqueue(FULL_RECOMPUTE_JOB, args.space, at_front=True, job_timeout=REFRESH_TIMEOUT,
                        description="full recompute (persona-sync recompute)")
    checked = time.monotonic()
    with Progress() as bar:
        task = bar.add_task(f"recomputing {', '.join(chosen)}", total=None)
        while (status := job.get_status(refresh=True)) not in (JobStatus.FINISHED, JobStatus.FAILED,
                                                              JobStatus.STOPPED, JobStatus.CANCELED, None):
            bar.update(task, completed=job.get_meta(refresh=True).get("profiles", 0))
            if status == JobStatus.QUEUED and time.monotonic() - checked > 5:  # the workers went away meanwhile
                checked = time.monotonic()
                if not queue_depths(conn)["workers"]:
                    job.cancel()
                    bar.stop()
                    print(no_worker, file=sys.stderr)
                    return 1
            time.sleep(0.5)
    if status != JobStatus.FINISHED:
        print(f"the recompute did not finish ({status}): see `persona-sync jobs` and the worker's log",
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
    """rq's cron scheduler with the schedule of ``CRON_CONFIG``, run in this process on the queue client that
    ``connect`` builds (``rq cron --url`` takes no Sentinel URL). When Redis goes away (a restart, a failover) the
    scheduler starts again once it is back, as the worker does; SIGTERM or Ctrl-C ends it."""
    import redis
    from rq.cron import CronScheduler
    from rq.exceptions import StopRequested

    from service.logs import setup
    from service.state.connect import connect

    setup(settings.log_level)
    conn = connect(queue_url(settings), socket_timeout=30, socket_connect_timeout=5)
    backoff = 0.5
    try:
        while True:
            try:
                cron = CronScheduler(connection=conn, logging_level=settings.log_level)
                cron.load_config_from_file(CRON_CONFIG)
                cron.start()  # returns once SIGTERM or Ctrl-C asked it to stop
                return 0
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                print(f"persona-sync cron: Redis unreachable ({exc}); starting again in {backoff:.1f} s",
                      file=sys.stderr, flush=True)
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
    except (StopRequested, KeyboardInterrupt):  # a signal between two runs (rq's handlers stay installed)
        return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    """Rates, profiles, refreshes, personas, dead letters, the log, the queue, Mavera and Redis; then each problem
    with the command to run next. ``--json``: what ``GET /admin/status`` answers."""
    import orjson

    from service.state.connect import connect
    from service.state.status import collect

    client = state_client(settings)
    _known_space(client, args.space, "its report would be all zeros")
    queue = connect(queue_url(settings), socket_timeout=5, socket_connect_timeout=2)
    report = collect(client, queue, settings, args.space)
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        from service.status_text import render

        render(report)
    return 0


def _resume_command(args: argparse.Namespace) -> str:
    """The command line that goes on where this one stopped, quoted for a shell (a path with a space in it)."""
    argv = sys.argv[1:] or [args.command]
    return "persona-sync " + shlex.join(argv if "--resume" in argv else [*argv, "--resume"])


def _known_space(client: Any, space: str | None, why: str) -> None:
    """A ``--space`` that holds no data is a typo more often than not: acting on it would create it for good."""
    from service.state.status import spaces

    if space and space not in (known := spaces(client)):
        raise CommandError(f"no space {space!r} has any data ({why}); known: {', '.join(sorted(known)) or 'none yet'}")


def cmd_forget(settings: Settings, args: argparse.Namespace) -> int:
    from service.state.ops import NotAnIdentifier, NotFound, forget

    client = state_client(settings)
    _known_space(client, args.space, "a deletion there would only suppress")
    try:
        outcome, user_id = forget(client, settings, args.space or settings.space_id, args.identifier)
    except NotFound as exc:
        raise CommandError(f"{exc}: nothing was erased") from None
    except NotAnIdentifier as exc:
        raise CommandError(str(exc)) from None
    erased = f"profile {outcome.profile_id} erased" if outcome.profile_id else "no profile held it"
    suppressed = (f"userId {user_id}'s events up to now are suppressed (later ones build a new profile, as with "
                  "Segment's DELETE_ONLY)" if user_id else "it had no userId to suppress")
    print(f"{outcome.status}: {erased}; {suppressed}; its logged, dead-lettered and archived events are purged")
    return 0


def cmd_replay_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from service.spec.keys import Keys
    from service.state.ops import replay_dead_letters
    from service.state.replay import Interrupted

    client = state_client(settings)
    space = args.space or settings.space_id
    total = client.xlen(Keys(space).dead_letters)
    with Progress() as bar:
        task = bar.add_task(f"replaying dead letters of {space}", total=total)
        try:
            counts = replay_dead_letters(client, settings, space, progress=lambda n: bar.advance(task, n),
                                         drop_unauthenticated=args.drop_unauthenticated)
        except Interrupted as exc:  # what applied is no longer a dead letter: running it again carries on
            bar.stop()
            _print_report(exc.report, False)
            if exc.reason:
                print(f"persona-sync replay-dead-letters: {exc.reason}", file=sys.stderr)
            _purge_if_due(settings, space, client=client)
            print("stopped; the dead letters that applied are removed, the rest are kept: run "
                  "`persona-sync replay-dead-letters` again to carry on", file=sys.stderr)
            return 1 if exc.reason else 130
    _purge_if_due(settings, space, client=client)
    print(f"{counts['replayed']} of {counts['entries']} dead letters replayed ({counts['events_applied']} events "
          f"applied); {counts['kept']} still invalid and kept: see `persona-sync dead-letters list`")
    if counts["unauthenticated"]:
        fate = "deleted" if args.drop_unauthenticated else "kept (delete them with --drop-unauthenticated)"
        print(f"{counts['unauthenticated']} dead letters came from requests that failed authentication (stored by an "
              f"earlier version): never applied; {fate}")
    return 0


class CommandError(Exception):
    """A command cannot go on; the message is the one line the operator reads (with the fix)."""


def state_client(settings: Settings):  # noqa: ANN201 - redis is imported lazily, as in every command
    """The STATE Redis as the stack finds it (REDIS_URL, else the embedded server of `persona-sync dev` under
    DATA_DIR), checked with a PING: an unreachable one is a one-line error with the fix."""
    def unreachable(url: str, exc: Exception) -> str:
        where = redact(url) if settings.redis_url else f"the embedded server under DATA_DIR={settings.data_dir}"
        return (f"cannot reach Redis at {where} ({exc}): start the stack with `make run`, or point REDIS_URL at "
                "your Redis")

    return _checked_client(lambda: state_url(settings), unreachable, settings.redis_cluster, socket_timeout=60)


def _checked_client(url_of: Callable[[], str], unreachable: Callable[[str, Exception], str], cluster: bool = False,
                    **options: Any):  # noqa: ANN202
    """A client on the URL ``url_of`` gives, after a PING; a configuration error or an unreachable server is a
    ``CommandError`` (the one line the operator reads)."""
    import redis
    from redis.exceptions import RedisClusterException

    from service.state.connect import connect

    try:
        url = url_of()
        client = connect(url, cluster=cluster, socket_connect_timeout=5, **options)
        client.ping()
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    except (redis.RedisError, RedisClusterException, OSError) as exc:
        raise CommandError(unreachable(url, exc)) from None
    return client


def parse_since(name: str, text: str | None, now: int) -> int | None:
    """``--since`` / ``--until``: ISO-8601 or a time ago; a one-line error otherwise."""
    from service.spec.clock import point_in_time

    if text is None:
        return None
    when = point_in_time(text, now)
    if when is None:
        raise CommandError(f"--{name} {text!r}: give an ISO-8601 time (2026-03-01T10:00:00Z) or a time ago "
                           "(90m, 2h, 7d)")
    return when


class Reporter:
    """Progress of a long run: a rich bar (count, rate, ETA) on a terminal, a plain line every 5 s otherwise.

    The bar measures events against ``total``, or, for files, bytes read against their size (``meter``: an
    object with ``total`` and ``done`` bytes), so that an import has an ETA before its events are counted."""

    def __init__(self, label: str, total: int | None, meter: Any = None) -> None:
        self.label, self.total, self.done, self.meter = label, total, 0, meter
        self.started = self.last = time.monotonic()
        self.bar: Any = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            class Events(TextColumn):
                def render(self, task: Any) -> Any:  # the count and events per second since the start
                    from rich.text import Text

                    n = task.fields.get("events", 0)
                    of = f" of {task.total:,.0f}" if task.total and not task.fields.get("bytes") else ""
                    return Text(f"{n:,}{of} events, {n / max(task.elapsed or 0, 1e-6):,.0f}/s")

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), Events(""),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
            self.bar.start()
            by_bytes = meter is not None and meter.total
            self.task = self.bar.add_task(label, total=meter.total if by_bytes else total, events=0,
                                          bytes=bool(by_bytes))

    def fraction(self) -> float | None:
        if self.meter is not None and self.meter.total:
            return min(1.0, self.meter.done / self.meter.total)
        if self.total:
            return min(1.0, self.done / self.total)
        return None

    def __call__(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            by_bytes = self.meter is not None and self.meter.total
            self.bar.update(self.task, completed=self.meter.done if by_bytes else self.done, events=self.done)
            return
        now = time.monotonic()
        if now - self.last >= 5:
            self.last = now
            elapsed = max(now - self.started, 1e-6)
            line = f"{self.label}: {self.done:,} events, {self.done / elapsed:,.0f}/s"
            share = self.fraction()
            if share:
                left = elapsed * (1 - share) / share
                line += f", {share:.0%} done, about {left / 60:.0f} min {left % 60:02.0f} s left"
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _print_report(report: Any, dry_run: bool) -> None:
    verb = "would be" if dry_run else "were"
    totals = report.outcome_totals()
    print(f"{report.total:,} events {verb}: " + ", ".join(f"{n:,} {o}" for o, n in totals.items())
          + f" ({report.seconds:.1f} s)")
    for kind, outcomes in report.by_type().items():
        print(f"  {kind:<9} " + ", ".join(f"{n:,} {o}" for o, n in outcomes.items()))
    if report.dead_letters_removed:
        print(f"{report.dead_letters_removed:,} dead letters applied and removed")
    if totals.get("invalid") and not dry_run:
        print("invalid events are dead letters now, each with its reason: `persona-sync dead-letters list`")


def _run_replay(settings: Settings, args: argparse.Namespace, records_for: Callable[[str | None], Any],
                total: int | None, options: Any, source: str, run_name: str, label: str, meter: Any = None) -> int:
    """Shared by `replay` and `import`: resume, progress, Ctrl-C, report."""
    from service.state.replay import Checkpoint, Interrupted, run

    client = state_client(settings)
    space = args.space or settings.space_id
    checkpoint = Checkpoint(client, space, run_name)
    after = checkpoint.load() if args.resume else None
    if args.resume and after is None:
        print("nothing to resume (no interrupted run with these arguments): starting from the beginning",
              file=sys.stderr)
    reporter = Reporter(label, total, meter)
    try:
        report = run(client, settings, space, records_for(after), options, source, checkpoint, reporter)
    except Interrupted as exc:
        reporter.close()
        _print_report(exc.report, options.dry_run)
        if exc.reason:
            print(f"persona-sync {args.command}: {exc.reason}", file=sys.stderr)
        print(f"stopped{' at ' + exc.report.stopped if exc.report.stopped else ''}; continue with: "
              f"{_resume_command(args)}", file=sys.stderr)
        _purge_if_due(settings, space, options.dry_run, client)
        return 1 if exc.reason else 130
    finally:
        reporter.close()
    _print_report(report, options.dry_run)
    _purge_if_due(settings, space, options.dry_run, client)
    return 0


def _purge_if_due(settings: Settings, space: str, dry_run: bool = False, client: Any = None) -> None:
    """Deletions an import or a replay applied leave the erased users' ids waiting in ``Keys.forgotten_ids`` and
    their events in the log, the dead letters and the archive: the purge job the receiver queues after a delete is
    queued here too, on whatever path the run ended (done, stopped, failed). ``client``: the run's STATE client.
    The clients are not the commands' checked ones: a run stopped by Redis going away still prints its hint."""
    import redis
    from rq import Queue

    from service.state import connect
    from service.state.queue import queue_purge_if_due

    if dry_run:
        return
    try:
        if not queue_purge_if_due(client or connect.state_client(settings),
                                  Queue(QUEUE_NAME, connection=connect.queue_client(settings)), space):
            return
    except (redis.RedisError, OSError) as exc:
        print(f"persona-sync: deletions were applied, but their purge could not be queued ({exc}); the purge "
              "queued with the next deletion does it", file=sys.stderr)
        return
    print(f"deletions were applied: a job (run by a worker) purges the erased users' events from the log, the dead "
          f"letters and the archive of {space}", file=sys.stderr)


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from service.spec.clock import now_ms
    from service.spec.keys import Keys
    from service.state.replay import (
        Checkpoint,
        Options,
        dead_letter_records,
        log_records,
        only,
        profile_filter,
        resolve,
    )

    _replay_options_fit(args)
    client = state_client(settings)
    space = args.space or settings.space_id
    options = Options(dry_run=args.dry_run, rate=args.rate or None, reapply=not args.dead_letters)
    if args.dead_letters:
        total = client.xlen(Keys(space).dead_letters)
        name = Checkpoint.name_of("dead-letters", space, args.reason)
        return _run_replay(settings, args, lambda after: dead_letter_records(client, space, args.reason, after),
                           total, options, "replay", name, f"replaying dead letters of {space}")
    now = now_ms()
    since, until = parse_since("since", args.since, now), parse_since("until", args.until, now)
    if since is not None and until is not None and since > until:
        raise CommandError(f"--since {args.since} is after --until {args.until}: nothing lies between them")
    types = {t.lower() for t in args.type} if args.type else None
    if args.from_archive:
        return _replay_archive(settings, args, space, since, until, types, options)
    pids = None
    if args.profile:
        kind, sep, value = args.profile.partition(":")
        if not sep or not value:
            raise CommandError(f"--profile {args.profile!r}: give TYPE:VALUE, e.g. user_id:u-42 or "
                               "email:ada@example.com")
        from service.spec.identity import IdentityRules

        kind, value, pid = resolve(client, IdentityRules.from_settings(settings), space, args.profile)
        if pid is None:
            raise CommandError(f"no profile has {kind}:{value} in space {space}")
        pids = profile_filter(client, settings, space, pid)
    # named by the arguments as typed (a relative --since resolves differently later), so --resume finds it
    name = Checkpoint.name_of("log", space, args.since, args.until, args.profile, sorted(types or []), args.event)
    total = client.xlen(Keys(space).log)
    last = client.xrevrange(Keys(space).log, count=1)
    end = last[0][0].decode() if last else None  # up to what is logged now, not the live tail for ever
    return _run_replay(settings, args, lambda after: only(log_records(client, space, since, until, pids, after,
                                                                      until_id=end), types, args.event),
                       total, options, "replay", name, f"replaying the event log of {space}")


def _replay_options_fit(args: argparse.Namespace) -> None:
    """An option of the other source would be ignored, and the replay run over far more than was meant."""
    log_only = {"--since": args.since, "--until": args.until, "--profile": args.profile, "--type": args.type,
                "--event": args.event}
    if args.dead_letters:
        given = [name for name, value in {**log_only, "--from-archive": args.from_archive}.items() if value]
        if given:
            raise CommandError(f"{', '.join(given)} select(s) log or archive events, not dead letters: drop it, or "
                               "drop --dead-letters (dead letters are chosen by --reason)")
    elif args.reason is not None:
        raise CommandError("--reason selects dead letters: add --dead-letters, or drop --reason")


def _replay_archive(settings: Settings, args: argparse.Namespace, space: str, since: int | None, until: int | None,
                    types: set[str] | None, options: Any) -> int:
    """``replay --from-archive``: the archive files of the hours in [since, until], applied again like the log."""
    from service.state.archive import archive_files
    from service.state.replay import ByteMeter, Checkpoint, file_records, only

    if not settings.event_archive_dir:
        raise CommandError("EVENT_ARCHIVE_DIR is not set: there is no archive to replay (see README, Replays)")
    if args.profile:
        raise CommandError("--profile works on the log only (archived events carry no profile id); use --type or "
                           "--event, or replay the log")
    files = [str(f) for f in archive_files(settings.event_archive_dir, space, since, until)]
    if not files:
        raise CommandError(f"no archive files for space {space} in that time range under "
                           f"{settings.event_archive_dir}")
    name = Checkpoint.name_of("archive", space, args.since, args.until, sorted(types or []), args.event)
    meter = ByteMeter.of(files)
    return _run_replay(settings, args, lambda after: only(file_records(files, after, meter=meter), types,
                                                          args.event),
                       None, options, "replay", name, f"replaying {len(files)} archive file(s) of {space}", meter)


def cmd_move_space(settings: Settings, args: argparse.Namespace) -> int:
    """Move a space to another primary of the Redis Cluster, all its keys in one step, while intake goes on."""
    from service.state.connect import is_cluster
    from service.state.reshard import MoveError, move_space, owner

    client = state_client(settings)
    space = args.space or settings.space_id
    if not is_cluster(client):
        raise CommandError("REDIS_CLUSTER is not set: only a Redis Cluster has spaces to move")
    if not args.to:
        print(f"{space} is on {owner(client, space)}; primaries: "
              + ", ".join(sorted(n.name for n in client.get_primaries())))
        return 0
    try:
        moved = move_space(client, space, args.to)
    except MoveError as exc:
        raise CommandError(str(exc)) from None
    if not moved.keys and moved.source == moved.target:
        print(f"{space} is already on {moved.target}")
    else:
        print(f"{space}: slot {moved.slot} moved from {moved.source} to {moved.target}: {moved.keys:,} keys in "
              f"{moved.seconds} s")
    return 0


def cmd_rebuild(settings: Settings, args: argparse.Namespace) -> int:
    """Recompute a space's profiles from its history under the current rules, then switch (live ingest goes on)."""
    import redis
    from rq import Queue

    from service.spec.keys import Keys
    from service.state.rebuild import RebuildRefused, drop_old, rebuild
    from service.state.refresh import REFRESH_TIMEOUT
    from service.state.replay import Interrupted

    client = state_client(settings)
    _known_space(client, args.space, "a rebuild there would create it, empty")
    space = args.space or settings.space_id
    if args.drop_old:
        try:
            dropped = drop_old(client, space)
        except RebuildRefused as exc:
            raise CommandError(str(exc)) from None
        print(f"{space}: " + (", ".join(f"generation {g}: {n} keys deleted" for g, n in dropped.items())
                              or "no old generation to drop"))
        return 0
    reporter = Reporter(f"rebuilding {space}", None)
    try:
        result = rebuild(client, settings, space, force=args.force, progress=reporter,
                         say=lambda line: print(line, file=sys.stderr, flush=True))
    except RebuildRefused as exc:
        raise CommandError(str(exc)) from None
    except (Interrupted, KeyboardInterrupt) as exc:  # Ctrl-C inside a replay chunk, or between two
        reporter.close()
        reason = getattr(exc, "reason", None)
        try:  # where it stopped, as the rebuild recorded it for the console
            where = (client.hget(Keys(space).rebuild_status, "phase") or b"").decode()
        except (redis.RedisError, OSError):
            where = "Redis is unreachable, so whether it had switched is unknown (see `persona-sync status` once it " \
                    "is back)"
        print(f"persona-sync rebuild: stopped ({reason or 'interrupted'}): {where}; run `persona-sync rebuild` again",
              file=sys.stderr)
        return 1 if reason else 130
    finally:
        reporter.close()
    print(f"{space}: rebuilt into generation {result['generation']} from {result['events']:,} events "
          f"({', '.join(f'{n:,} {o}' for o, n in result['outcomes'].items())}); the previous generation "
          f"{result['previous']} stays until `persona-sync rebuild --drop-old --space {space}`")
    queue = Queue(QUEUE_NAME, connection=queue_client(settings))
    queue.enqueue(FULL_RECOMPUTE_JOB, space, at_front=True, job_timeout=REFRESH_TIMEOUT,
                  description=f"full recompute after the rebuild of {space}")
    print("a full recompute of its clusters, KPI cards and personas is queued for the workers")
    return 0


def cmd_import(settings: Settings, args: argparse.Namespace) -> int:
    from service.state.replay import ByteMeter, Checkpoint, Options, file_records

    for path in args.files:
        if path != "-" and not Path(path).is_file():
            raise CommandError(f"{path}: no such file")
    if args.workers < 1 or (args.workers > 1 and "-" in args.files):
        raise CommandError("--workers is 1 or more, and stdin (-) can only be read by one")
    stamp = [(p, Path(p).stat().st_size) if p != "-" else (p, 0) for p in args.files]
    name = Checkpoint.name_of("import", args.space or settings.space_id, stamp)
    label = f"importing {len(args.files)} file(s)"
    if args.workers > 1:
        state_client(settings)  # one clear line now rather than one per process
        return _import_sharded(settings, args, f"{name}-{args.workers}", label)
    options = Options(dry_run=args.dry_run, rate=args.rate or None)
    meter = ByteMeter.of(args.files)
    return _run_replay(settings, args, lambda after: file_records(args.files, after, meter=meter), None, options,
                       "import", name, label, meter)


def _import_sharded(settings: Settings, args: argparse.Namespace, name: str, label: str) -> int:
    """``import --workers N``: N processes read the same files and each applies its share of the lines (the state
    is order-independent), each with its own checkpoint. Ctrl-C asks them all to stop at their next chunk."""
    import multiprocessing

    from service.state.replay import ByteMeter, Checkpoint, Report

    ctx = multiprocessing.get_context("fork")
    messages = ctx.Queue()
    stop = ctx.Event()
    procs = [ctx.Process(target=_import_shard, args=(settings, args, name, k, messages, stop, os.getpid()),
                         daemon=True) for k in range(args.workers)]
    for proc in procs:
        proc.start()
    files_total = ByteMeter.of(args.files).total
    meter = ByteMeter(files_total * args.workers if files_total else None)  # each share reads to the end
    shares_done = [0] * args.workers
    reporter = Reporter(f"{label} with {args.workers} processes", None, meter)
    merged, finished, stopped, failed = Report(), 0, False, []
    try:
        while finished < len(procs):
            try:
                kind, payload = messages.get(timeout=0.5)
            except KeyboardInterrupt:
                stop.set()
                continue
            except Exception:  # noqa: BLE001 - queue.Empty: check that nobody died or left without a word
                if all(p.exitcode is not None for p in procs) and messages.empty():
                    if any(p.exitcode != 0 for p in procs):
                        failed.append("an import process died; see the messages above")
                    stopped = stopped or stop.is_set()  # a report lost to Ctrl-C: resume to be sure
                    break
                continue
            if kind == "progress":
                k, n, read = payload
                shares_done[k] = read
                meter.done = sum(shares_done)
                reporter(n)
            elif kind == "done":
                report, was_stopped = payload
                merged.counts.update(report.counts)
                merged.seconds = max(merged.seconds, report.seconds)
                stopped = stopped or was_stopped
                finished += 1
            elif kind == "error":
                failed.append(payload)
                finished += 1
    finally:
        reporter.close()
        for proc in procs:
            proc.join(30)
    _print_report(merged, args.dry_run)
    _purge_if_due(settings, args.space or settings.space_id, args.dry_run)  # whatever became of the shares
    if failed:
        print(f"persona-sync import: {failed[0]}\nstopped; continue with: {_resume_command(args)}",
              file=sys.stderr)
        return 1
    if not stopped:  # every share is done: the next import of these files starts afresh
        client = state_client(settings)
        for k in range(args.workers):
            Checkpoint(client, args.space or settings.space_id, f"{name}-{k}").clear()
    if stopped:
        print(f"stopped; continue with: {_resume_command(args)}", file=sys.stderr)
        return 130
    return 0


def _import_shard(settings: Settings, args: argparse.Namespace, name: str, k: int, messages: Any, stop: Any,
                  parent: int) -> None:
    """One process of ``import --workers N``: its own Redis client, its share of the lines, progress to the
    parent."""
    import signal

    from service.devstack.supervisor import die_with_parent
    from service.state.replay import ByteMeter, Checkpoint, Interrupted, Options, Report, file_records, run

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop (``stop``)
    # a parent killed outright (SIGKILL, OOM) takes its shares along: left running, they would race the shares of
    # the `--resume` its message asks for; what they applied is checkpointed by chunk, and a resume redoes the rest
    die_with_parent(parent)
    try:
        client = state_client(settings)
        space = args.space or settings.space_id
        checkpoint = Checkpoint(client, space, f"{name}-{k}")
        rate = (args.rate / args.workers) if args.rate else None
        options = Options(dry_run=args.dry_run, rate=rate)
        after = checkpoint.load() if args.resume else None
        if after == DONE:  # this share finished before the interruption: nothing to do again
            messages.put(("done", (Report(), False)))
            return
        meter = ByteMeter()
        try:
            report = run(client, settings, space, file_records(args.files, after, (k, args.workers), meter),
                         options, "import", checkpoint,
                         progress=lambda n: messages.put(("progress", (k, n, meter.done))), should_stop=stop.is_set)
        except Interrupted as exc:
            if exc.reason:  # Redis refused a chunk: the parent reports why, and how to resume
                messages.put(("error", exc.reason))
                return
            report = exc.report
        if not report.interrupted and not args.dry_run:
            checkpoint.save(DONE)  # until every share is done, a --resume must not redo this one
        messages.put(("done", (report, report.interrupted)))
    except Exception as exc:  # noqa: BLE001 - reported by the parent in one line
        messages.put(("error", f"{type(exc).__name__}: {exc}"))


def cmd_suppressions(settings: Settings, args: argparse.Namespace) -> int:
    from service.state.ops import NotAnIdentifier, lift_suppression, suppressions

    client = state_client(settings)
    space = args.space or settings.space_id
    if args.action == "list":
        rows = suppressions(client, space)
        for row in rows:
            until = row["until_ms"]
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(until / 1000)) + " UTC" if until else "for ever"
            who = row["user_id"] if row["user_id"] is not None else "(a profile without a userId)"
            also = f"; also {', '.join(row['identifiers'])}" if row["identifiers"] else ""
            print(f"{who}  events up to {when}{also}")
        users = sum(row["user_id"] is not None for row in rows)
        print(f"{users} suppressed userId(s) and {len(rows) - users} erased profile(s) without one in {space}")
        return 0
    if not args.user_ids:
        raise CommandError("lift needs one or more userIds (see `persona-sync suppressions list`)")
    if not all(uid.strip() for uid in args.user_ids):
        raise CommandError("an empty userId names nobody (see `persona-sync suppressions list`)")
    for uid in args.user_ids:
        try:
            lifted = lift_suppression(client, space, uid)
        except NotAnIdentifier as exc:
            raise CommandError(str(exc)) from None
        if not lifted:
            raise CommandError(f"{uid} is not suppressed in space {space} (see `persona-sync suppressions list`)")
        print(f"{uid}: lifted; its events are applied again from now on")
    return 0


def cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    """Failed RQ jobs, newest first: id, function, space, age and the last line of the error (Mavera's answer)."""
    from datetime import UTC, datetime

    from rq import Queue

    from service.state import jobs

    found = jobs.failed(Queue(QUEUE_NAME, connection=queue_client(settings)), limit=1_000_000)
    if not found:
        print("no failed jobs")
        return 0
    now = datetime.now(UTC)
    for j in found:
        age = now - jobs.ended(j, now)
        last = jobs.last_error(j) or "(no error recorded)"
        space = j.args[0] if j.args and isinstance(j.args[0], str) else "-"
        print(f"{j.id}  {j.func_name}  space={space}  {_age(age.total_seconds())} ago  {last[:300]}")
    print(f"{len(found)} failed job(s): `persona-sync requeue --all`, `--function NAME` or `JOB_ID ...` runs them "
          "again once the cause is fixed")
    return 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def cmd_requeue(settings: Settings, args: argparse.Namespace) -> int:
    from rq import Queue
    from rq.job import Job

    from service.state import jobs

    if not (args.all or args.function or args.job_ids):
        raise CommandError("say which: --all, --function NAME (e.g. workers.jobs.sync) or JOB_ID ...")
    queue = Queue(QUEUE_NAME, connection=queue_client(settings))
    failed = queue.failed_job_registry.get_job_ids()
    chosen = set(failed) if args.all else set(args.job_ids) & set(failed)
    if args.function:
        chosen |= {j.id for j in Job.fetch_many(failed, connection=queue.connection)
                   if j is not None and j.func_name == args.function}
    missing = set(args.job_ids) - set(failed)
    requeued, _ = jobs.requeue(queue, chosen)
    print(f"requeued {len(requeued)} job(s)")
    if missing:
        print(f"not failed (or unknown): {', '.join(sorted(missing))}", file=sys.stderr)
        return 1
    return 0


def queue_client(settings: Settings):  # noqa: ANN201 - redis is imported lazily
    """The QUEUE Redis, checked like ``state_client``."""
    return _checked_client(lambda: queue_url(settings), lambda url, exc: (
        f"cannot reach the queue Redis ({exc}): start the stack with `make run`, or set QUEUE_REDIS_URL / REDIS_URL"))


def cmd_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    import orjson

    from service.spec.keys import Keys, valid_entry_id
    from service.state.store import delete_dead_letters

    client = state_client(settings)
    space = args.space or settings.space_id
    key = Keys(space).dead_letters
    if args.action == "list":
        needle = (args.reason or "").lower()
        shown = 0
        for entry_id, f in client.xrevrange(key, count=max(args.limit * 20, 1000) if needle else args.limit):
            reason = f.get(b"reason", b"").decode(errors="replace")
            if needle and needle not in reason.lower():
                continue
            at = int(f.get(b"at", b"0") or 0)
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at / 1000)) if at else "?"
            print(f"{entry_id.decode()}  {when}  {f.get(b'source', b'').decode()}  "
                  f"{len(f.get(b'raw', b''))} B  {reason}")
            shown += 1
            if shown >= args.limit:
                break
        print(f"{shown} shown of {client.xlen(key)} in {space}; `persona-sync dead-letters show ID` prints one, "
              "`persona-sync replay --dead-letters` applies them again")
        return 0
    if not args.ids:
        raise CommandError(f"{args.action} needs one or more dead-letter ids (see `persona-sync dead-letters list`)")
    bad = [entry_id for entry_id in args.ids if not valid_entry_id(entry_id)]
    if bad:
        raise CommandError(f"not a dead-letter id: {', '.join(repr(b[:40]) for b in bad[:5])}; ids look like "
                           "1795500000123-0 (see `persona-sync dead-letters list`)")
    found = {entry_id: client.xrange(key, min=entry_id, max=entry_id) for entry_id in args.ids}
    missing = [entry_id for entry_id, rows in found.items() if not rows]
    if missing:  # nothing is deleted: a wrong --space or a mistyped id should not half-succeed
        raise CommandError(f"no dead letter {', '.join(missing[:5])} in space {space}"
                           + ("; nothing was deleted" if args.action == "delete" else ""))
    if args.action == "show":
        for entry_id, rows in found.items():
            f = rows[0][1]
            print(orjson.dumps({"id": entry_id, "reason": f.get(b"reason", b"").decode(errors="replace"),
                                "source": f.get(b"source", b"").decode(), "at": int(f.get(b"at", b"0") or 0)}).decode())
            print(f.get(b"raw", b"").decode(errors="replace"))
        return 0
    freed = delete_dead_letters(client, space, args.ids)
    print(f"deleted {len(found)} dead letter(s); {freed} bytes freed")
    return 0


def cmd_resume(settings: Settings, args: argparse.Namespace) -> int:
    import orjson

    from service.state.ops import paused, resume
    from service.state.refresh import enqueue_sync

    client = state_client(settings)
    why = paused(client)
    resume(client)
    print(f"Mavera sync resumed (was paused: {orjson.dumps(why).decode()})" if why else "Mavera sync was not paused")
    chosen = enqueue_sync(client, queue_client(settings), settings.mave_chat_timeout)
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

    from service.state.connect import connect

    max_age = args.max_age if args.max_age is not None else DEFAULT_WORKER_TTL + 60
    host = socket.gethostname()
    try:
        conn = connect(queue_url(settings), socket_timeout=5, socket_connect_timeout=5)
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


def _run_options(cmd: argparse.ArgumentParser, resumes: str) -> None:
    """--dry-run, --rate and --resume, which every run of the replay engine takes."""
    cmd.add_argument("--dry-run", action="store_true", help="count by type and expected outcome; change nothing")
    cmd.add_argument("--rate", type=_rate, default=DEFAULT_REPLAY_RATE,
                     help=f"events per second (default {DEFAULT_REPLAY_RATE:g}, which keeps live intake's p95 within "
                          "2x; 0: as fast as Redis takes them)")
    cmd.add_argument("--resume", action="store_true", help=f"continue an interrupted {resumes}")


def _count(text: str) -> int:
    """--limit: a whole number, 1 or more (0 or less would list nothing, or fail in Redis)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: give 1 or more")
    return n


def _rate(text: str) -> float:
    """--rate: events per second, 0 for as fast as Redis takes them (a negative one is a mistake, not 'unlimited')."""
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number of events per second") from None
    if not rate >= 0 or rate == float("inf"):
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: give events per second, or 0 for as fast as Redis takes "
                                         "them")
    return rate


def _call_type(text: str) -> str:
    """A --type: one of Segment's call types (any other would silently match nothing)."""
    from service.spec.events import TYPES

    if text.lower() not in TYPES:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a call type; one of {', '.join(sorted(TYPES))}")
    return text.lower()


def _space_arg(text: str) -> str:
    """A --space as the receiver and the admin API take it: anything else would put data where nothing reads it."""
    from service.config import SPACE_ID_RULE, valid_space

    if not valid_space(text):
        raise argparse.ArgumentTypeError(f"{text[:80]!r}: a space id is {SPACE_ID_RULE}")
    return text


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
    rc.add_argument("--space", type=_space_arg, help="only this space")
    rc.set_defaults(func=cmd_recompute)
    s = sub.add_parser("status", help="intake rates, profiles, refreshes, personas, queue, Redis; what to run next",
                       description="Per space: events/s over the last minute and hour by outcome, profiles, dirty "
                                   "profiles, the last refresh and full recompute, each persona's sync state, dead "
                                   "letters and the event log; then the queue, Mavera's pause and Redis memory; then "
                                   "every problem with the command to run next.")
    s.add_argument("--space", type=_space_arg, help="only this space")
    s.add_argument("--json", action="store_true", help="print the report as JSON (as GET /admin/status)")
    s.set_defaults(func=cmd_status)
    f = sub.add_parser("forget", help="GDPR: erase the profile any identifier resolves to "
                                      "(email:…, user_id:…, segment_id:use_…)",
                       description="Erase the profile an identifier resolves to (identifiers, traits, merged "
                                   "profiles, logged, dead-lettered and archived events) exactly as a Segment delete "
                                   "call does: its userId's events stamped up to now are suppressed (late retries, "
                                   "replays); "
                                   "later ones build a new profile. An identifier of nobody is an error (exit 1), "
                                   "but for a userId: as with Segment's delete, its events up to now are suppressed "
                                   "even when no profile holds it yet.")
    f.add_argument("identifier", metavar="TYPE:VALUE",
                   help="any identifier of the profile: user_id:u-42, email:ada@example.com, anonymous_id:… "
                        "(a bare value is a userId)")
    f.add_argument("--space", type=_space_arg, help="space (default SPACE_ID)")
    f.set_defaults(func=cmd_forget)
    d2 = sub.add_parser("replay-dead-letters", help="apply the dead letters again; what applies is removed",
                        description="Re-apply refused events that had passed authentication (after a fix). Events "
                                    "that are still invalid stay in the dead-letter stream; nothing that failed "
                                    "authentication is ever applied.")
    d2.add_argument("--space", type=_space_arg, help="space (default SPACE_ID)")
    d2.add_argument("--drop-unauthenticated", action="store_true",
                    help="delete dead letters of requests that failed authentication (never applied either way)")
    d2.set_defaults(func=cmd_replay_dead_letters)
    rp = sub.add_parser("replay", help="apply logged events (or dead letters) again through the receiver's path",
                        description="Apply events again, exactly as the receiver applies them. By default the "
                                    "space's event log, filtered: every event is applied again with the current "
                                    "code and rules (effects are idempotent, so what was right stays the same) and "
                                    "is not logged a second time. With --dead-letters, the refused events: what "
                                    "applies is removed, the rest stays with its reason.")
    rp.add_argument("--space", type=_space_arg, help="space (default SPACE_ID)")
    rp.add_argument("--dead-letters", action="store_true", help="replay the dead letters instead of the log")
    rp.add_argument("--from-archive", action="store_true",
                    help="replay the archive files (EVENT_ARCHIVE_DIR) instead of the log: everything older than "
                         "the log's retention; --since/--until select whole hours")
    rp.add_argument("--reason", help="with --dead-letters: only those whose reason contains TEXT")
    rp.add_argument("--since", help="log: received at or after (ISO-8601, or a time ago: 90m, 2h, 7d)")
    rp.add_argument("--until", help="log: received at or before (ISO-8601, or a time ago)")
    rp.add_argument("--profile", metavar="TYPE:VALUE",
                    help="log: every event of the profile that identifier resolves to, and of those merged into it")
    rp.add_argument("--type", action="append", type=_call_type, help="log: only this call type (repeatable)")
    rp.add_argument("--event", metavar="NAME", help="log: only track events of this name")
    _run_options(rp, "run of the same command")
    rp.set_defaults(func=cmd_replay)
    im = sub.add_parser("import", help="backfill history from files: Segment S3/GCS archives, NDJSON, JSON arrays",
                        description="Load events from files into a space, through the receiver's path (deduplicated "
                                    "by messageId, logged once): Segment's S3 / GCS destination archives (gzip, one "
                                    "event per line), plain NDJSON, a JSON array of events, or a Tracking API batch "
                                    "body; `-` reads stdin. A line that is not a valid event becomes a dead letter "
                                    "with its file and line and never stops the import.")
    im.add_argument("files", nargs="+", metavar="FILE")
    im.add_argument("--space", type=_space_arg, help="space (default SPACE_ID)")
    _run_options(im, "import of the same files")
    im.add_argument("--workers", type=int, default=1,
                    help="processes sharing the import (the rate is shared too); as many as cores for a quiet hour")
    im.set_defaults(func=cmd_import)
    sp = sub.add_parser("suppressions", help="list deleted userIds, or lift a suppression",
                        description="A deleted userId's events stamped at or before its deletion are suppressed. "
                                    "List them, or lift one (after a deletion made by mistake): its events are "
                                    "applied again from then on; what was erased stays erased. A profile without "
                                    "a userId that `forget` erased is lifted by one of its identifiers, as the "
                                    "list shows them (anonymous_id:abc).")
    sp.add_argument("action", choices=["list", "lift"])
    sp.add_argument("user_ids", nargs="*", metavar="USER_ID", help="a userId, or TYPE:VALUE of an erased profile "
                                                                   "without one")
    sp.add_argument("--space", type=_space_arg, help="space (default SPACE_ID)")
    sp.set_defaults(func=cmd_suppressions)
    jb = sub.add_parser("jobs", help="list failed jobs (function, space, age, error)",
                        description="List the failed RQ jobs, newest first, with the last line of their error "
                                    "(for a sync, Mavera's answer).")
    jb.set_defaults(func=cmd_jobs)
    rq_ = sub.add_parser("requeue", help="run failed jobs again: --all, --function NAME or JOB_ID ...",
                         description="Move failed RQ jobs back to the queue once their cause is fixed.")
    rq_.add_argument("job_ids", nargs="*", metavar="JOB_ID")
    rq_.add_argument("--all", action="store_true", help="every failed job")
    rq_.add_argument("--function", help="every failed job of this function, e.g. workers.jobs.sync")
    rq_.set_defaults(func=cmd_requeue)
    dl = sub.add_parser("dead-letters", help="list, show or delete dead letters",
                        description="Dead letters are authenticated events that could not be applied, each with "
                                    "its reason, source and time. `persona-sync replay --dead-letters` applies "
                                    "them again.")
    dl.add_argument("action", choices=["list", "show", "delete"])
    dl.add_argument("ids", nargs="*", metavar="ID", help="entry ids (show, delete)")
    dl.add_argument("--space", type=_space_arg, help="space (default SPACE_ID)")
    dl.add_argument("--reason", help="list: only those whose reason contains TEXT")
    dl.add_argument("--limit", type=_count, default=50, help="list: at most this many, newest first (default 50)")
    dl.set_defaults(func=cmd_dead_letters)
    rb = sub.add_parser("rebuild", help="recompute a space's profiles from its history under the current rules",
                        description="After a change of identity rules (IDENTITY_LIMITS, IDENTITY_PRIORITY, ...) or "
                                    "a fix: apply the archive and the event log again into a new generation of "
                                    "profile state while live ingest goes on, then switch to it at once; the old "
                                    "generation stays until --drop-old. Refuses when history no longer reaches "
                                    "back to every profile's first event, unless --force.")
    rb.add_argument("--space", type=_space_arg, help="space (default SPACE_ID)")
    rb.add_argument("--force", action="store_true", help="rebuild even if some profiles would lose data")
    rb.add_argument("--drop-old", action="store_true", help="delete the generations a rebuild left behind")
    rb.set_defaults(func=cmd_rebuild)
    mv = sub.add_parser("move-space", help="move a space to another primary of the Redis Cluster",
                        description="With REDIS_CLUSTER=true: move every key of a space (they share one hash slot) "
                                    "to another primary in one step, while intake goes on, so that no event is "
                                    "applied against half-moved state. Use it instead of `redis-cli --cluster "
                                    "reshard` for slots that hold a space. Without --to: where the space is.")
    mv.add_argument("--space", type=_space_arg, help="space (default SPACE_ID)")
    mv.add_argument("--to", metavar="HOST:PORT", help="the primary to move the space to")
    mv.set_defaults(func=cmd_move_space)
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
        if runs_dev_stack(settings):  # the archive and log retention the stack's own programs run with
            settings = Settings.from_env(dev_stack_env(os.environ, settings.data_dir))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return args.func(settings, args) or 0
    except (CommandError, ConfigError) as exc:
        print(f"persona-sync {args.command}: {exc}", file=sys.stderr)
        return 1
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
