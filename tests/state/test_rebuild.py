"""Rebuild against a real Redis and a live server: new identity rules, live ingest and Profile API reads during
the rebuild, the refusal when history is gone, and dropping the old generation."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import orjson
import pytest
import redis

from service.config import Settings
from service.http.app import create_app
from service.spec.clock import now_ms
from service.spec.keys import Keys
from service.state.rebuild import RebuildRefused, drop_old, generations, rebuild
from tests.conftest import PROFILE_TOKEN, LiveServer
from tests.helpers import _iso, apply, find, profiles
from tests.http.test_receiver import sign

BOTH_BACKENDS = True  # each test runs on a standalone Redis and on a Redis Cluster (tests/conftest.py)

SPACE = "default"


def many_emails(people: int) -> list[dict]:
    """Each anonymous visitor gives three emails, one identify each: under the default email limit (5) one
    profile holds all three; under a limit of 1 the second and third stay apart."""
    return [{"type": "identify", "anonymousId": f"anon-{i}", "messageId": f"e-{i}-{j}",
             "timestamp": f"2026-03-01T10:{j:02d}:00Z", "traits": {"email": f"p{i}-{j}@example.com", "n": j}}
            for i in range(people) for j in range(3)]


def emails_per_profile(r: redis.Redis) -> Counter[int]:
    return Counter(sum(1 for i in p.identifiers if i.type == "email") for p in profiles(r, SPACE))


def test_a_rebuild_applies_new_rules_while_ingest_and_reads_go_on(settings: Settings, redis_url: str,
                                                                   r: redis.Redis) -> None:
    apply(r, many_emails(60), now=now_ms())
    assert emails_per_profile(r) == Counter({3: 60})
    strict = settings.replace(identity_limits={"user_id": 1, "email": 1, "*": 5}, profile_api_rate_limit=0)
    acked: list[str] = []
    statuses: Counter[int] = Counter()
    stop = threading.Event()
    with LiveServer(create_app(strict, redis_url, "")) as server:
        def post() -> None:
            with httpx.Client(base_url=server.url, timeout=10) as http:
                n = 0
                while not stop.is_set():
                    body = orjson.dumps({"type": "identify", "userId": f"live-{n}", "messageId": f"live-{n}",
                                         "timestamp": "2026-03-02T10:00:00Z", "traits": {"plan": "pro"}})
                    if http.post("/segment", content=body, headers={"X-Signature": sign(body)}).status_code == 200:
                        acked.append(f"live-{n}")
                    n += 1

        def read() -> None:
            with httpx.Client(base_url=server.url, timeout=10, auth=(PROFILE_TOKEN, "")) as http:
                while not stop.is_set():
                    for i in (0, 17, 59):
                        statuses[http.get(f"/v1/spaces/{SPACE}/collections/users/profiles/"
                                          f"anonymous_id:anon-{i}/traits").status_code] += 1

        threads = [threading.Thread(target=post), threading.Thread(target=read)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        result = rebuild(r, strict, SPACE)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(30)
    assert result["generation"] == "g1:" and r.get(Keys(SPACE).generation_key) == b"g1:"
    assert statuses and set(statuses) == {200}, statuses  # no read failed, before, during or after the switch
    assert len(acked) > 50
    # the profiles follow the new rule: one email each; every visitor's first email stays with them
    assert emails_per_profile(r) == Counter({1: 60 * 3, 0: len(acked)})
    assert find(r, "anonymous_id", "anon-7").trait_values()["email"] == "p7-0@example.com"
    # every event posted during the rebuild is in the new state, once
    logged = Counter(orjson.loads(f[b"e"])["messageId"] for _, f in r.xrange(Keys(SPACE).log))
    assert all(logged[mid] == 1 for mid in acked)
    assert all(find(r, "user_id", uid) is not None for uid in acked)
    # the old generation stays until it is dropped
    assert generations(r, SPACE) == {"", "g1:"}
    assert drop_old(r, SPACE)["(original)"] > 0 and generations(r, SPACE) == {"g1:"}
    assert find(r, "anonymous_id", "anon-7") is not None


def test_a_rebuild_refuses_when_history_no_longer_reaches_back(r: redis.Redis) -> None:
    apply(r, many_emails(5), now=now_ms() - 3_600_000)  # created an hour ago...
    log = Keys(SPACE).log
    r.xtrim(log, minid=str(now_ms() + 1))  # ...and the log trimmed since
    apply(r, [{"type": "identify", "userId": "new", "messageId": "n1", "timestamp": "2026-03-02T10:00:00Z"}],
          now=now_ms())
    with pytest.raises(RebuildRefused, match="5 of 6 profiles"):
        rebuild(r, Settings(), SPACE)
    assert r.get(Keys(SPACE).generation_key) is None
    forced = rebuild(r, Settings(), SPACE, force=True)
    assert forced["generation"] == "g1:" and [p.id for p in profiles(r, SPACE)] != []
    assert find(r, "user_id", "new") is not None and find(r, "anonymous_id", "anon-0") is None  # what was lost


def test_a_rebuild_records_its_progress_and_its_end(r: redis.Redis) -> None:
    """What the console shows of a rebuild: running with its events applied as it goes, then done (or failed
    with its error), kept an hour after the last write."""
    apply(r, many_emails(30), now=now_ms())
    key = Keys(SPACE).rebuild_status
    seen: list[dict] = []
    result = rebuild(r, Settings(), SPACE, progress=lambda n: seen.append({k.decode(): v.decode()
                                                                           for k, v in r.hgetall(key).items()}))
    assert seen and all(s["state"] == "running" and s["generation"] == "g1:" for s in seen)
    done = {k.decode(): v.decode() for k, v in r.hgetall(key).items()}
    assert done["state"] == "done" and done["previous"] == "(original)"
    assert int(done["events"]) == result["events"] >= r.xlen(Keys(SPACE).log) > 0
    assert int(done["ended_ms"]) >= int(done["started_ms"]) and 0 < r.ttl(key) <= 3600

    def interrupted(text: str) -> None:
        raise RuntimeError("the command was interrupted")

    with pytest.raises(RuntimeError):
        rebuild(r, Settings(), SPACE, say=interrupted)
    failed = {k.decode(): v.decode() for k, v in r.hgetall(key).items()}
    assert failed["state"] == "failed" and failed["generation"] == "g2:"
    assert failed["error"] == "RuntimeError: the command was interrupted"


def test_the_rebuild_command(redis_env: dict[str, str], queue_url: str, r: redis.Redis) -> None:
    import subprocess
    import sys
    from pathlib import Path

    from rq import Queue

    exe = str(Path(sys.executable).with_name("persona-sync"))
    apply(r, many_emails(4), now=now_ms())
    env = {"PATH": "/usr/bin:/bin", **redis_env, "IDENTITY_LIMITS": "user_id:1,email:1,*:5"}
    out = subprocess.run([exe, "rebuild"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "rebuilt into generation g1: from 12 events" in out.stdout and "--drop-old" in out.stdout
    assert emails_per_profile(r) == Counter({1: 12})
    [job] = Queue("persona-sync", connection=redis.Redis.from_url(queue_url)).get_jobs()
    assert job.func_name == "workers.jobs.full_recompute" and job.args == ("default",)
    dropped = subprocess.run([exe, "rebuild", "--drop-old"], capture_output=True, text=True, timeout=60, env=env)
    assert dropped.returncode == 0 and "generation (original):" in dropped.stdout
    assert generations(r, SPACE) == {"g1:"}


def test_forget_after_a_rebuild_purges_the_events_logged_before_it(r: redis.Redis, settings: Settings) -> None:
    """Entries logged before a rebuild carry the previous generation's profile ids: the purge finds them by the
    erased user's ids too."""
    from service.state.ops import forget

    now = now_ms()
    apply(r, [{"type": "track", "event": "Viewed", "userId": "gone", "messageId": f"gone-{n}",
               "timestamp": "2026-03-01T00:00:00Z"} for n in range(3)] +
          [{"type": "track", "event": "Viewed", "userId": "stays", "messageId": "stays-1"}], now=now)
    rebuild(r, settings, SPACE)
    forget(r, settings, SPACE, "user_id:gone")
    assert [orjson.loads(f[b"e"])["userId"] for _, f in r.xrange(Keys(SPACE).log)] == ["stays"]


@pytest.mark.parametrize("how", ["forget", "segment delete stamped before the rebuild"])
def test_a_user_deleted_while_a_rebuild_runs_is_erased_in_the_new_generation(r: redis.Redis, settings: Settings,
                                                                              how: str) -> None:
    """Whatever the deletion's own time: Segment retries a delete for hours, so one stamped before the rebuild
    started may arrive while it runs (before, only deletions stamped after its start were done again)."""
    from service.state.ops import forget

    apply(r, [{"type": "identify", "userId": uid, "messageId": f"{uid}-{n}", "traits": {"n": n},
               "timestamp": "2026-03-01T00:00:00Z"} for uid in ("erase-me", "keep-me") for n in range(3)],
          now=now_ms())
    done: list[int] = []

    def mid_rebuild(count: int) -> None:  # the new generation already holds both users when the delete comes
        if not done:
            done.append(count)
            assert r.exists(Keys(SPACE, "g1:").ident("user_id", "erase-me"))
            if how == "forget":
                forget(r, settings, SPACE, "user_id:erase-me")
            else:
                deleted = apply(r, [{"type": "delete", "userId": "erase-me", "messageId": "del-1",
                                     "timestamp": _iso(now_ms() - 120_000)}], now=now_ms())
                assert deleted[0].status == "deleted"

    rebuild(r, settings, SPACE, progress=mid_rebuild)
    assert done and r.get(Keys(SPACE).generation_key) == b"g1:"
    assert find(r, "user_id", "erase-me") is None and find(r, "user_id", "keep-me") is not None
    late = apply(r, [{"type": "identify", "userId": "erase-me", "messageId": "late",
                      "timestamp": "2026-03-01T00:00:00Z"}], now=now_ms())
    assert late[0].status == "suppressed"  # still suppressed up to the deletion


def test_a_profile_s_log_replay_finds_its_events_after_a_rebuild(r: redis.Redis, settings: Settings) -> None:
    """Entries logged before a rebuild carry the old generation's profile ids: a replay of one profile finds them
    by the profile's identifiers (before, it found nothing after any rebuild, and said so with success), events
    older than the log's retention included, and none of another profile's."""
    from service.spec.identity import IdentityRules
    from service.state.ops import resolve
    from service.state.replay import log_records, profile_filter

    apply(r, [{"type": "identify", "userId": "ada", "anonymousId": "a-1", "messageId": "ada-1",
               "traits": {"email": "ada@example.com"}, "timestamp": "2026-01-01T00:00:00Z"},
              {"type": "page", "anonymousId": "a-1", "messageId": "ada-2", "timestamp": "2026-01-02T00:00:00Z"},
              {"type": "track", "userId": "ada", "event": "Clicked", "messageId": "ada-3"},
              {"type": "track", "event": "Opened", "anonymousId": "anonymous", "messageId": "m-4",  # a placeholder:
               "context": {"traits": {"email": "ADA@Example.com"}}},  # only the email, as sent, says who
              {"type": "track", "userId": "adam", "event": "Clicked", "messageId": "adam-1"},
              {"type": "identify", "userId": "bob", "messageId": "bob-1", "traits": {"note": "ada"}}], now=now_ms())

    def replayed() -> list[str]:
        pid = resolve(r, IdentityRules.from_settings(settings), SPACE, "email:ada@example.com")[2]
        assert pid is not None
        return [orjson.loads(rec.item.raw)["messageId"]
                for rec in log_records(r, SPACE, profile=profile_filter(r, settings, SPACE, pid))]

    assert replayed() == ["ada-1", "ada-2", "ada-3", "m-4"]
    rebuild(r, settings, SPACE)
    assert replayed() == ["ada-1", "ada-2", "ada-3", "m-4"]


def test_ctrl_c_right_after_the_switch_waits_for_the_catch_up(r: redis.Redis, settings: Settings) -> None:
    """Stopped between the switch and the last catch-up, the space would run on a generation missing what was
    logged meanwhile: Ctrl-C waits for those few seconds (it is ignored, then restored)."""
    import os
    import signal

    apply(r, [{"type": "identify", "userId": f"u{n}", "messageId": f"m{n}", "traits": {"n": n}} for n in range(50)],
          now=now_ms())
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, even in a background run

    def say(line: str) -> None:
        if line.startswith("switched"):
            apply(r, [{"type": "identify", "userId": "late", "messageId": "late", "traits": {"plan": "pro"}}],
                  now=now_ms())
            os.kill(os.getpid(), signal.SIGINT)

    try:
        result = rebuild(r, settings, SPACE, say=say)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result["generation"] == "g1:" and r.hget(Keys(SPACE).rebuild_status, "state") == b"done"
    assert find(r, "user_id", "late") is not None and find(r, "user_id", "late").trait_values() == {"plan": "pro"}


def visitor_events(r: redis.Redis) -> None:
    """Two visitors without a userId, each known by an anonymousId and an email."""
    apply(r, [{"type": "identify", "anonymousId": f"anon-{who}", "messageId": f"{who}-{n}",
               "traits": {"email": f"{who}@example.com", "n": n}, "timestamp": "2026-03-01T00:00:00Z"}
              for who in ("erase-me", "keep-me") for n in range(3)], now=now_ms())


def test_a_profile_erased_by_profile_id_while_a_rebuild_runs_is_erased_in_the_new_generation(
        r: redis.Redis, settings: Settings) -> None:
    """``forget`` of a profile without a userId erases it by profile id, in the generation current at the time:
    the rebuild erases it again in its own once it has switched, found by the identifiers the erasure recorded."""
    from service.state.ops import forget, suppressions

    visitor_events(r)
    done: list[int] = []

    def mid_rebuild(count: int) -> None:  # the new generation already holds both visitors when the forget comes
        if not done:
            assert r.exists(Keys(SPACE, "g1:").ident("anonymous_id", "anon-erase-me"))
            # as the receiver does: the purge (which reaches other generations) is a job, not yet run
            outcome, user_id = forget(r, settings, SPACE, "anonymous_id:anon-erase-me", purge=False)
            done.append(now_ms())
            assert outcome.status == "deleted" and user_id is None

    rebuild(r, settings, SPACE, progress=mid_rebuild)
    assert done and r.get(Keys(SPACE).generation_key) == b"g1:"
    assert find(r, "anonymous_id", "anon-erase-me") is None
    assert find(r, "email", "erase-me@example.com") is None
    assert find(r, "anonymous_id", "anon-keep-me") is not None
    assert [p.identifiers for p in profiles(r, SPACE) if any("erase-me" in i.value for i in p.identifiers)] == []
    assert not r.exists(Keys(SPACE).rebuild_erased)  # the record of erased identifiers is gone with its use
    # the erasure keeps its own time (the rebuild's erasing it again does not move it): events up to then stay out,
    # later ones build a new profile
    [row] = suppressions(r, SPACE)
    assert row["user_id"] is None and row["until_ms"] <= done[0]
    assert row["identifiers"] == ["anonymous_id:anon-erase-me", "email:erase-me@example.com"]
    late = apply(r, [{"type": "identify", "anonymousId": "anon-erase-me", "messageId": "late",
                      "timestamp": "2026-03-02T00:00:00Z"}], now=now_ms())
    assert late[0].status == "suppressed"
    after = now_ms() + 1_000
    later = apply(r, [{"type": "identify", "anonymousId": "anon-erase-me", "messageId": "after",
                       "timestamp": _iso(after)}], now=after)
    assert later[0].status == "ok" and later[0].created


def test_a_rebuild_does_not_bring_back_a_profile_whose_purge_job_has_not_run(r: redis.Redis,
                                                                             settings: Settings) -> None:
    """The receiver's ``forget`` queues the purge of the erased profile's events as a job: a rebuild that starts
    before the job runs purges first, rather than apply those events to its new generation."""
    from service.state.ops import forget

    visitor_events(r)
    forget(r, settings, SPACE, "email:erase-me@example.com", purge=False)
    assert find(r, "anonymous_id", "anon-erase-me") is None
    rebuild(r, settings, SPACE)
    assert find(r, "anonymous_id", "anon-erase-me") is None
    assert find(r, "email", "erase-me@example.com") is None
    assert find(r, "anonymous_id", "anon-keep-me") is not None
    assert [orjson.loads(f[b"e"])["anonymousId"] for _, f in r.xrange(Keys(SPACE).log)] == ["anon-keep-me"] * 3


def test_an_erasure_reaches_the_generation_a_rebuild_left_behind(r: redis.Redis, settings: Settings) -> None:
    """A rebuild keeps the previous generation until ``--drop-old``, holding the same people: a GDPR erasure after
    it erases them there too, a user by userId and a profile without one alike, and nobody else."""
    from service.state.ops import forget

    apply(r, [{"type": "identify", "userId": "gone", "messageId": "g1", "traits": {"email": "gone@example.com"},
               "timestamp": "2026-03-01T00:00:00Z"},
              {"type": "identify", "userId": "kept", "messageId": "k1", "traits": {"email": "kept@example.com"},
               "timestamp": "2026-03-01T00:00:00Z"}], now=now_ms())
    visitor_events(r)
    rebuild(r, settings, SPACE)
    old = Keys(SPACE, "")
    before = {value: r.get(old.ident(kind, value)).decode()
              for kind, value in (("user_id", "gone"), ("user_id", "kept"), ("anonymous_id", "anon-erase-me"),
                                  ("anonymous_id", "anon-keep-me"))}
    r.delete(Keys(SPACE).dirty)  # what the events marked, which no refresh took here
    forget(r, settings, SPACE, "user_id:gone")
    forget(r, settings, SPACE, "email:erase-me@example.com")
    assert not r.exists(old.profile(before["gone"])) and not r.exists(old.profile(before["anon-erase-me"]))
    assert r.get(old.ident("email", "gone@example.com")) is None
    assert r.get(old.ident("email", "erase-me@example.com")) is None
    assert r.exists(old.profile(before["kept"])) and r.exists(old.profile(before["anon-keep-me"]))
    assert find(r, "user_id", "kept") is not None and find(r, "user_id", "gone") is None
    marked = {m.decode() for m in r.smembers(Keys(SPACE).dirty)}  # the current generation's erased profiles only
    assert before["gone"] not in marked and before["anon-erase-me"] not in marked and len(marked) == 2


def test_a_second_rebuild_or_a_drop_while_one_runs_is_refused(r: redis.Redis, settings: Settings) -> None:
    """Two rebuilds at once built into the same generation, each dropping what the other applied (profiles then
    held several people's identifiers); the second is refused, with what to do, and the first ends whole."""
    apply(r, many_emails(40), now=now_ms())
    before = emails_per_profile(r)
    refused: list[str] = []

    def mid_rebuild(count: int) -> None:
        if not refused:
            for attempt in (lambda: rebuild(r, settings, SPACE), lambda: drop_old(r, SPACE)):
                with pytest.raises(RebuildRefused, match="is running") as exc:
                    attempt()
                refused.append(str(exc.value))

    rebuild(r, settings, SPACE, progress=mid_rebuild)
    assert len(refused) == 2 and "persona-sync status" in refused[0]
    assert r.get(Keys(SPACE).generation_key) == b"g1:" and emails_per_profile(r) == before
    assert not r.exists(Keys(SPACE).rebuild_lock)  # let go at the end: the next rebuild runs
    rebuild(r, settings, SPACE)
    assert r.get(Keys(SPACE).generation_key) == b"g2:" and emails_per_profile(r) == before
