"""Every command answers --help; the configuration table covers every variable."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from rq import Queue

from service.config import VARIABLES, ConfigError, Settings

EXE = str(Path(sys.executable).with_name("persona-sync"))
COMMANDS = ["dev", "web", "worker", "cron", "status", "forget", "resume", "replay-dead-letters", "config",
            "recompute", "worker-alive"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command: str | None) -> None:
    out = subprocess.run([EXE, *([command] if command else []), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "usage: persona-sync" in out.stdout


def test_version() -> None:
    out = subprocess.run([EXE, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"persona-sync {version('segment-persona-sync')}"


def test_config_into_a_pipe_that_closes_early_ends_quietly() -> None:
    """`persona-sync config | head`: the reader is gone before the table is written (here: from the start)."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run([EXE, "config"], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert out.returncode == 0 and out.stderr == ""


def test_bench_help_reaches_the_benchmark_driver() -> None:
    out = subprocess.run([EXE, "bench", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "persona-sync bench" in out.stdout and "--only" in out.stdout


def test_config_table_lists_every_variable() -> None:
    out = subprocess.run([EXE, "config"], capture_output=True, text=True, timeout=60).stdout
    for name, _, _ in VARIABLES:
        assert f"`{name}`" in out


def test_the_readme_configuration_table_is_the_config_command_output() -> None:
    """The README's table is pasted from `persona-sync config`: a variable added without regenerating it fails."""
    table = subprocess.run([EXE, "config"], capture_output=True, text=True, timeout=30).stdout
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert table.strip() in readme, "regenerate the README's configuration table with `persona-sync config`"


def test_bad_configuration_says_what_to_fix() -> None:
    with pytest.raises(ConfigError, match="DEDUPE_WINDOW"):
        Settings.from_env({"DEDUPE_WINDOW": "forever"})
    with pytest.raises(ConfigError, match="SPACE_ID"):
        Settings.from_env({"SPACE_ID": "{bad}"})
    with pytest.raises(ConfigError, match="MAVE_CHAT_CONCURRENCY='11': must be at most 10"):
        Settings.from_env({"MAVE_CHAT_CONCURRENCY": "11"})  # Mavera allows 10 chats in flight per key
    for share in ("nan", "1e400", "-1", "101"):  # nan and inf would stop every KPI card from being computed
        with pytest.raises(ConfigError, match="INSIGHT_MIN_SHARE_PCT.*from 0 to 100"):
            Settings.from_env({"INSIGHT_MIN_SHARE_PCT": share})
    assert Settings.from_env({"INSIGHT_MIN_SHARE_PCT": "12.5"}).insight_min_share_pct == 12.5
    # found at start, not at the first connection, job or sync (a traceback, or failures an hour later)
    for name in ("REDIS_URL", "QUEUE_REDIS_URL"):
        with pytest.raises(ConfigError, match=f"{name} needs a scheme: redis://") as exc:
            Settings.from_env({name: "user:s3cret@localhost:6379"})
        assert "s3cret" not in str(exc.value)  # a URL may carry a password: never repeated
    # a messageId's digest names one of 65,536 sets: more would leave the rest empty, and say nothing
    with pytest.raises(ConfigError, match="DEDUPE_SHARDS='100000': must be at most 65536"):
        Settings.from_env({"DEDUPE_SHARDS": "100000"})
    # a token of blanks is no token (it would let "Basic IDo=" in), and a Secret's file ends in a newline that no
    # Bearer header can carry
    blank = Settings.from_env({"ADMIN_TOKEN": "  ", "PROFILE_API_TOKEN": "\t"})
    assert (blank.admin_token, blank.profile_api_token) == ("", "")
    from_files = Settings.from_env({"ADMIN_TOKEN": "adm-tok\n", "PROFILE_API_TOKEN": " prof-tok\n"})
    assert (from_files.admin_token, from_files.profile_api_token) == ("adm-tok", "prof-tok")
    with pytest.raises(ConfigError, match="PORT='70000': must be at most 65535"):
        Settings.from_env({"PORT": "70000"})
    with pytest.raises(ConfigError, match="MAVERA_BASE_URL='ftp://x': expected an http"):
        Settings.from_env({"MAVERA_BASE_URL": "ftp://x"})
    with pytest.raises(ConfigError, match="REDIS_URL needs a scheme"):
        Settings.from_env({"REDIS_URL": "REDIS://h"})  # redis-py takes the scheme in lower case only
    for url in ("redis://h:6379/0", "rediss://h:6380/0", "unix:///tmp/r.sock"):
        assert Settings.from_env({"REDIS_URL": url}).redis_url == url
    # the rules file is the workers' (the web starts without it); a worker refuses to start without it
    assert Settings.from_env({"CLUSTER_RULES_FILE": "/nonexistent/rules.json"}).cluster_rules_file
    worker = subprocess.run([EXE, "worker", "--burst"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "CLUSTER_RULES_FILE": "/nonexistent/rules.json"})
    assert worker.returncode != 0 and "CLUSTER_RULES_FILE='/nonexistent/rules.json': no such readable" in \
        worker.stderr, worker.stderr
    s = Settings.from_env({"DEDUPE_WINDOW": "2h", "SEGMENT_WRITE_KEYS": "a, b=spa_2", "IDENTITY_LIMITS": "email:2"})
    assert s.dedupe_window == 7200 and dict(s.write_keys) == {"a": "default", "b": "spa_2"}
    assert s.identity_limits == {"user_id": 1, "*": 5, "email": 2} and s.identity_limit_windows == {}
    s = Settings.from_env({"IDENTITY_LIMITS": "anonymous_id:5:weekly, ga_client_id:5:14d, email:5:ever"})
    assert s.identity_limits["anonymous_id"] == 5 and s.identity_limit_windows == {
        "anonymous_id": 7 * 86_400_000, "ga_client_id": 14 * 86_400_000}
    with pytest.raises(ConfigError, match="IDENTITY_PRIORITY type 'crm:id': no ':'"):
        Settings.from_env({"IDENTITY_PRIORITY": "user_id,crm:id"})
    with pytest.raises(ConfigError, match="the period is one of ever, daily, weekly"):
        Settings.from_env({"IDENTITY_LIMITS": "anonymous_id:5:fortnightly"})
    out = subprocess.run([EXE, "status"], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "DEDUPE_WINDOW": "x"})
    assert out.returncode == 2 and "DEDUPE_WINDOW" in out.stderr


@pytest.mark.parametrize("command", [["import", "/dev/null"], ["replay"], ["forget", "u1"], ["rebuild"],
                                     ["dead-letters", "list"], ["status"]])
def test_a_space_id_the_receiver_would_refuse_is_refused_before_anything_runs(command: list[str]) -> None:
    """The CLI took any --space, so an import could write where neither the receiver nor the admin API (which
    refuse such an id) can read it."""
    out = subprocess.run([EXE, command[0], "--space", "Acme Prod/EU}", *command[1:]], capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin", "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert out.returncode == 2 and "a space id is 1-64 letters" in out.stderr, out.stderr


def test_operator_commands_against_real_redis(redis_url: str, r) -> None:
    from service.spec.keys import MAVERA_PAUSED_KEY, Keys
    from tests.helpers import apply, find

    apply(r, [{"type": "identify", "userId": "op-1", "messageId": "1", "timestamp": "2026-03-01T00:00:00Z"}])
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url}
    status = subprocess.run([EXE, "status"], capture_output=True, text=True, timeout=60, env=env)
    assert status.returncode == 0 and "space default" in status.stdout and "(1 created)" in status.stdout
    typo = subprocess.run([EXE, "status", "--space", "defualt"], capture_output=True, text=True, timeout=60, env=env)
    assert typo.returncode == 1 and "no space 'defualt' has any data" in typo.stderr and "known: default" in typo.stderr
    r.hset(Keys("default").personas, "new", '{"state": "outbox"}')  # what workers without MAVERA_API_KEY leave
    outbox = subprocess.run([EXE, "status"], capture_output=True, text=True, timeout=60, env=env).stdout
    assert "outbox mode" in outbox and "MAVERA_API_KEY" in outbox
    forget = subprocess.run([EXE, "forget", "op-1"], capture_output=True, text=True, timeout=60, env=env)
    assert forget.returncode == 0 and "deleted" in forget.stdout
    assert find(r, "user_id", "op-1") is None
    r.set(MAVERA_PAUSED_KEY, '{"reason": "402 credits exhausted"}')
    assert "PAUSED" in subprocess.run([EXE, "status"], capture_output=True, text=True, timeout=60, env=env).stdout
    resumed = subprocess.run([EXE, "resume"], capture_output=True, text=True, timeout=60, env=env)
    assert "resumed" in resumed.stdout and not r.exists(MAVERA_PAUSED_KEY)
    assert "sync queued for 1 space(s): default" in resumed.stdout  # what waited goes out now, not at the next refresh
    [job] = Queue("persona-sync", connection=r).get_jobs()
    assert job.func_name == "workers.jobs.sync" and job.args == ("default",) and job.timeout >= 5 * 120


def test_commands_refuse_what_they_would_get_wrong(redis_url: str, r, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebuild of a misspelled --space reported success and created the space; a --limit of 0 printed a
    traceback; the resume hint of a file with a space in its name could not be pasted back."""
    import argparse
    import shlex

    from service.cli import _resume_command
    from tests.helpers import apply

    apply(r, [{"type": "identify", "userId": "op-1", "messageId": "1", "timestamp": "2026-03-01T00:00:00Z"}])
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url}
    typo = subprocess.run([EXE, "rebuild", "--space", "defualt"], capture_output=True, text=True, timeout=60, env=env)
    assert typo.returncode == 1 and "no space 'defualt' has any data" in typo.stderr, typo.stderr
    assert not list(r.scan_iter(match="*defualt*"))
    for limit in ("0", "-3"):
        listed = subprocess.run([EXE, "dead-letters", "list", "--limit", limit], capture_output=True, text=True,
                                timeout=60, env=env)
        assert listed.returncode == 2 and "give 1 or more" in listed.stderr and "Traceback" not in listed.stderr
    monkeypatch.setattr(sys, "argv", ["persona-sync", "import", "/data/my history.ndjson", "--rate", "200"])
    hint = _resume_command(argparse.Namespace(command="import"))
    assert shlex.split(hint) == ["persona-sync", "import", "/data/my history.ndjson", "--rate", "200", "--resume"]


def test_replay_dead_letters_command_never_applies_unauthenticated_entries(redis_url: str, r) -> None:
    import orjson

    from service.spec.keys import Keys
    from tests.helpers import profiles

    dlq = Keys("default").dead_letters
    for n in range(4):  # what earlier versions kept of bodies that failed the signature check
        r.xadd(dlq, {"reason": "X-Signature does not match", "source": "webhook-unsigned", "at": 1,
                     "raw": orjson.dumps({"type": "identify", "userId": f"forged-{n}", "messageId": f"f{n}"})})
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url}
    out = subprocess.run([EXE, "replay-dead-letters"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and "4 dead letters came from requests that failed authentication" in out.stdout
    assert profiles(r) == [] and r.xlen(dlq) == 4
    out = subprocess.run([EXE, "replay-dead-letters", "--drop-unauthenticated"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0 and "deleted" in out.stdout
    assert profiles(r) == [] and r.xlen(dlq) == 0
