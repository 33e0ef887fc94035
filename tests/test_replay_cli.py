"""`persona-sync replay` and `import` as an operator runs them: real processes against a real Redis, Ctrl-C
included."""

from __future__ import annotations

import gzip
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import redis

from service.spec.keys import Keys
from tests.helpers import apply, mixed_stream, snapshot
from tests.state.test_replay import archived, write_archive

EXE = str(Path(sys.executable).with_name("persona-sync"))


def interruptible() -> None:
    """In the child: SIGINT as at a terminal. A suite started in the background (``cmd &``) ignores SIGINT, and
    children inherit that, so Ctrl-C could not be drilled."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(cmd: list[str], redis_url: str, r: redis.Redis, once_logged: int) -> tuple[int, str]:
    """Start ``cmd``, press Ctrl-C once the log holds ``once_logged`` events; its exit code and stderr."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(redis_url), text=True,
                            preexec_fn=interruptible)
    deadline = time.monotonic() + 60
    while r.xlen(Keys("default").log) < once_logged and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr


def env(redis_url: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url}


def test_an_unreachable_redis_is_one_line_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "h.ndjson"
    path.write_bytes(b"{}\n")
    out = subprocess.run([EXE, "import", str(path)], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert "cannot reach Redis" in out.stderr and "REDIS_URL" in out.stderr
    for command in (["replay"], ["status"], ["forget", "u1"], ["rebuild"], ["jobs"], ["dead-letters", "list"]):
        nothing = subprocess.run([EXE, *command], capture_output=True, text=True, timeout=60,
                                 env={"PATH": "/usr/bin:/bin", "DATA_DIR": str(tmp_path)})
        assert nothing.returncode == 1 and "make run" in nothing.stderr, (command, nothing.stderr)
        assert len(nothing.stderr.strip().splitlines()) == 1, (command, nothing.stderr)
        down = subprocess.run([EXE, *command], capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "REDIS_URL": "redis://127.0.0.1:1/0"})
        assert down.returncode == 1 and "cannot reach" in down.stderr, (command, down.stderr)
        assert len(down.stderr.strip().splitlines()) == 1, (command, down.stderr)


def test_import_from_stdin_and_a_log_replay_dry_run(redis_url: str, r: redis.Redis) -> None:
    lines = b"".join(orjson.dumps(e) + b"\n" for e in archived(mixed_stream(400, users=20, seed=4)))
    out = subprocess.run([EXE, "import", "-", "--rate", "0"], input=lines, capture_output=True, timeout=120,
                         env=env(redis_url))
    assert out.returncode == 0, out.stderr
    assert b"400 events were: 400 applied" in out.stdout
    dry = subprocess.run([EXE, "replay", "--dry-run", "--type", "identify"], capture_output=True, text=True,
                         timeout=120, env=env(redis_url))
    assert dry.returncode == 0 and "would be" in dry.stdout and "reapply" in dry.stdout
    assert "identify" in dry.stdout and "track" not in dry.stdout
    unknown = subprocess.run([EXE, "replay", "--profile", "email:nobody@example.com"], capture_output=True,
                             text=True, timeout=60, env=env(redis_url))
    assert unknown.returncode == 1 and "no profile has email:nobody@example.com" in unknown.stderr
    typo = subprocess.run([EXE, "replay", "--type", "identifies"], capture_output=True, text=True, timeout=60,
                          env=env(redis_url))
    assert typo.returncode == 2 and "'identifies' is not a call type" in typo.stderr


def test_a_log_replay_stops_at_until(redis_url: str, r: redis.Redis) -> None:
    """``--until`` bounds a log replay (and its dry run) by receipt time; before, the replay ran to the log's end."""
    now = int(time.time() * 1000)
    for i, at in enumerate([now - 3 * 3_600_000] * 10 + [now] * 7):  # entries received 3 h ago, then now
        event = {"type": "identify", "userId": f"u{i}", "messageId": f"m{i}"}
        r.xadd(Keys("default").log, {"p": "use_1", "e": orjson.dumps(event)}, id=f"{at}-{i}")
    for dry in (["--dry-run"], []):
        out = subprocess.run([EXE, "replay", "--since", "4h", "--until", "2h", "--rate", "0", *dry],
                             capture_output=True, text=True, timeout=120, env=env(redis_url))
        assert out.returncode == 0, out.stderr
        assert ("10 events would be" if dry else "10 events were") in out.stdout, out.stdout


@pytest.mark.parametrize("options, says", [
    (["--reason", "OOM"], "--reason selects dead letters"),
    (["--dead-letters", "--since", "1h"], "--since select(s) log or archive events"),
    (["--dead-letters", "--from-archive"], "--from-archive select(s)"),
    (["--since", "1m", "--until", "2h"], "nothing lies between them"),
    (["--rate", "-5"], "give events per second"),
])
def test_replay_options_of_another_source_or_out_of_range_are_refused(redis_url: str, r: redis.Redis,
                                                                       options: list[str], says: str) -> None:
    """Each was ignored: `--reason` without --dead-letters replayed the whole log, --since beside --dead-letters
    every dead letter, and a negative rate ran unlimited."""
    r.xadd(Keys("default").log, {"p": "use_1", "e": b'{"type":"identify","userId":"u","messageId":"m"}'})
    out = subprocess.run([EXE, "replay", *options], capture_output=True, text=True, timeout=60, env=env(redis_url))
    assert out.returncode != 0 and says in out.stderr, out.stderr
    assert "were" not in out.stdout  # nothing ran


def test_gzip_on_stdin_is_read_as_gzip_when_the_pipe_hands_over_one_byte_first(redis_url: str, tmp_path: Path) -> None:
    """A slow producer's first write of one byte made the gzip check see one byte: the compressed stream was read
    as text (garbage dead letters, exit 0)."""
    body = gzip.compress(b"".join(orjson.dumps(e) + b"\n" for e in archived(mixed_stream(50, users=5, seed=2))))
    proc = subprocess.Popen([EXE, "import", "-", "--rate", "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env(redis_url))
    assert proc.stdin is not None
    proc.stdin.write(body[:1])
    proc.stdin.flush()
    time.sleep(0.5)
    out, err = proc.communicate(body[1:], timeout=60)
    assert proc.returncode == 0 and b"50 events were: 50 applied" in out, (out, err)


def ctrl_c_when(cmd: list[str], redis_url: str, ready: Callable[[], bool]) -> tuple[int, str]:
    """Start ``cmd``, press Ctrl-C once ``ready()``; its exit code and stderr."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(redis_url), text=True,
                            preexec_fn=interruptible)
    deadline = time.monotonic() + 60
    while not ready() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr


def test_ctrl_c_stops_a_rebuild_and_a_dead_letter_replay_with_a_message(redis_url: str, r: redis.Redis) -> None:
    """Ctrl-C printed a traceback and exited 1 for these two; now each says where it stopped and what to run."""
    from service.config import Settings
    from service.state.store import SyncStore

    events = archived(mixed_stream(20_000, users=400, seed=6))
    apply(r, events, now=int(time.time() * 1000))
    k = Keys("default")
    # as the log's application begins (its progress is recorded once a second, and a fast host can apply the
    # 20,000 events within that: waiting for a count could press Ctrl-C only after the rebuild ended)
    code, stderr = ctrl_c_when([EXE, "rebuild"], redis_url,
                               lambda: (r.hget(k.rebuild_status, "phase") or b"").startswith(b"applying the log"))
    assert code == 130 and "Traceback" not in stderr, stderr
    assert "persona-sync rebuild: stopped (interrupted)" in stderr and "run `persona-sync rebuild` again" in stderr
    letters = [("store error: a bug since fixed", orjson.dumps(dict(e, messageId=f"dl-{n}")))
               for n, e in enumerate(events)]
    SyncStore(r, Settings()).dead_letters("default", letters, "webhook")
    code, stderr = ctrl_c_when([EXE, "replay-dead-letters"], redis_url,
                               lambda: r.xlen(k.dead_letters) < len(letters))
    assert code == 130 and "Traceback" not in stderr, stderr
    assert "run `persona-sync replay-dead-letters` again" in stderr
    assert 0 < r.xlen(k.dead_letters) < len(letters)


def archive_and_expected(r: redis.Redis, tmp_path: Path, n: int, users: int, seed: int
                         ) -> tuple[list[dict], dict, Path]:
    """``n`` archived events, the state they make when applied in one go (Redis emptied again), their archive."""
    events = archived(mixed_stream(n, users=users, seed=seed))
    apply(r, events)
    whole = snapshot(r)
    r.flushall()
    return events, whole, write_archive(tmp_path / "archive.gz", events)


def resume_to_the_end(cmd: list[str], redis_url: str, r: redis.Redis, whole: dict, n: int) -> None:
    """``cmd`` (its ``--rate`` last) again with ``--resume`` and no rate: it ends with every event applied once."""
    again = subprocess.run([*cmd[:-2], "--rate", "0", "--resume"], capture_output=True, text=True, timeout=300,
                           env=env(redis_url))
    assert again.returncode == 0, again.stderr
    assert snapshot(r) == whole and r.xlen(Keys("default").log) == n


def test_ctrl_c_stops_cleanly_and_resume_finishes_the_import(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    events, whole, path = archive_and_expected(r, tmp_path, 20_000, users=300, seed=6)
    cmd = [EXE, "import", str(path), "--rate", "4000"]
    returncode, stderr = interrupt(cmd, redis_url, r, once_logged=2000)
    assert returncode == 130, stderr
    assert "continue with: persona-sync import" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    done = r.xlen(Keys("default").log)
    assert 2000 <= done < len(events)
    resume_to_the_end(cmd, redis_url, r, whole, len(events))  # nothing lost, nothing twice


def test_an_import_shared_by_processes_equals_one_and_resumes(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    """--workers 3: every third chunk each, in any order (the state is order-independent): the same profiles and
    log as one process; interrupted, each process resumes from its own checkpoint."""
    events, whole, path = archive_and_expected(r, tmp_path, 12_000, users=200, seed=14)
    cmd = [EXE, "import", str(path), "--workers", "3", "--rate", "3000"]
    returncode, stderr = interrupt(cmd, redis_url, r, once_logged=3000)
    assert returncode == 130 and "--resume" in stderr, stderr
    assert 3000 <= r.xlen(Keys("default").log) < len(events)
    resume_to_the_end(cmd, redis_url, r, whole, len(events))


def test_a_shared_import_whose_parent_is_killed_stops_and_resumes(redis_url: str, r: redis.Redis,
                                                                   tmp_path: Path) -> None:
    """SIGKILL of ``import --workers``'s parent (OOM killer, ``kill -9``) takes its processes along: none goes on
    applying behind the user's back, racing the ``--resume`` they run next."""
    events, whole, path = archive_and_expected(r, tmp_path, 12_000, users=200, seed=15)
    cmd = [EXE, "import", str(path), "--workers", "2", "--rate", "1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(redis_url))
    deadline = time.monotonic() + 60
    while r.xlen(Keys("default").log) < 1000 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait(30)
    time.sleep(2)  # a chunk in flight may still land
    settled = r.xlen(Keys("default").log)
    time.sleep(3)
    assert r.xlen(Keys("default").log) == settled < len(events), "import processes outlived their parent"
    resume_to_the_end(cmd, redis_url, r, whole, len(events))


def test_a_resumed_shared_import_does_not_redo_a_finished_share(redis_url: str, r: redis.Redis,
                                                                tmp_path: Path) -> None:
    from service.state.replay import Checkpoint

    events = archived(mixed_stream(2000, users=50, seed=16))
    path = tmp_path / "a.ndjson"
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    name = Checkpoint.name_of("import", "default", [(str(path), path.stat().st_size)]) + "-2"
    Checkpoint(r, "default", f"{name}-0").save("done")  # share 0 finished before an interruption, share 1 not
    out = subprocess.run([EXE, "import", str(path), "--workers", "2", "--rate", "0", "--resume"],
                         capture_output=True, text=True, timeout=120, env=env(redis_url))
    assert out.returncode == 0, out.stderr
    assert "1,000 events were: 1,000 applied" in out.stdout  # share 1's runs of 500 lines only
    assert Checkpoint(r, "default", f"{name}-0").load() is None  # all done: the next import starts afresh


def test_progress_lines_give_count_rate_and_time_left_when_not_a_terminal(capsys, tmp_path: Path) -> None:
    from service.cli import Reporter
    from service.state.replay import ByteMeter, file_records

    path = tmp_path / "h.gz"
    with gzip.open(path, "wb") as f:
        for e in archived(mixed_stream(3000, users=30, seed=18)):
            f.write(orjson.dumps(e) + b"\n")
    meter = ByteMeter.of([str(path)])
    reporter = Reporter("importing", None, meter)
    records = file_records([str(path)], meter=meter)
    for _ in range(1500):
        next(records)
    reporter.last = reporter.started = time.monotonic() - 10  # as if 10 s had passed since the start
    reporter(1500)
    line = capsys.readouterr().err.strip()
    assert line.startswith("importing: 1,500 events, ") and "% done, about" in line and "s left" in line
    assert 0 < meter.done < meter.total


@pytest.mark.parametrize("workers", [1, 2])
def test_an_import_that_applies_deletions_queues_their_purge(redis_url: str, r: redis.Redis, tmp_path: Path,
                                                             workers: int) -> None:
    """As the receiver does after a delete: the erased user's events also leave the log, the dead letters and the
    archive (an import left them there until some later live delete's purge)."""
    from rq import Queue

    from service.state.queue import PURGE_JOB, QUEUE_NAME

    path = tmp_path / "history.ndjson"
    events = [{"type": "identify", "userId": f"u{n}", "messageId": f"i{n}", "timestamp": "2026-03-01T00:00:00Z"}
              for n in range(4)]
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    assert subprocess.run([EXE, "import", str(path), "--rate", "0"], capture_output=True, timeout=120,
                          env=env(redis_url)).returncode == 0
    queue = Queue(QUEUE_NAME, connection=r)
    assert PURGE_JOB not in [j.func_name for j in queue.get_jobs()]  # no deletion: nothing to purge
    path.write_bytes(orjson.dumps({"type": "delete", "userId": "u1", "messageId": "d1",
                                   "timestamp": "2026-04-01T00:00:00Z"}) + b"\n")
    out = subprocess.run([EXE, "import", str(path), "--rate", "0", "--workers", str(workers)], capture_output=True,
                         text=True, timeout=120, env=env(redis_url))
    assert out.returncode == 0 and "purges the erased users' events" in out.stderr, out.stderr
    assert [j.func_name for j in queue.get_jobs()].count(PURGE_JOB) == 1
