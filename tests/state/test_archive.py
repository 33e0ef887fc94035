"""The event archive against a real Redis and real files: Segment's S3 layout, trimming only what is archived,
replaying the archive, a crash that archives twice, and GDPR deletion in the files."""

from __future__ import annotations

import gzip
import subprocess
import sys
import time
from pathlib import Path

import orjson
import redis

from service.config import Settings
from service.spec.keys import DAY_MS, Keys
from service.state.archive import (
    CLOCK_SKEW_MS,
    HOUR_MS,
    Erasure,
    archive_files,
    archive_space,
    archived_lines,
    belongs,
    purge_archive,
)
from service.state.ops import purge_forgotten
from service.state.replay import Options, file_records, run
from tests.helpers import apply, find, mixed_stream, snapshot
from tests.state.test_replay import archived

SPACE = "default"
EXE = str(Path(sys.executable).with_name("persona-sync"))


def settings_for(tmp_path: Path, retention: float = 30 * 86400.0) -> Settings:
    return Settings(event_archive_dir=str(tmp_path / "archive"), event_log_retention=retention)


def wipe(r: redis.Redis) -> None:
    """Lose the space's state (profiles, identifiers, dedupe), as a Redis lost without a backup would."""
    for key in r.scan_iter(match=f"{Keys(SPACE).prefix}*"):
        r.delete(key)


def lines(tmp_path: Path) -> list[bytes]:
    return [line for f in archive_files(tmp_path / "archive", SPACE) for line in archived_lines(f)]


def test_events_go_to_hourly_files_in_segments_layout_before_the_log_trims_them(r: redis.Redis,
                                                                               tmp_path: Path) -> None:
    s = settings_for(tmp_path, retention=0)  # keep nothing in the log that is archived
    events = archived(mixed_stream(800, users=30, seed=21))
    apply(r, events, settings=s)
    k = Keys(SPACE)
    assert r.xlen(k.log) == 800  # with an archive, nothing is trimmed before it is in the files
    first = int(r.xrange(k.log, count=1)[0][0].split(b"-")[0])
    assert archive_space(r, s, SPACE) == {"archived": 800, "trimmed": 799}  # the cursor's entry stays
    [path] = archive_files(tmp_path / "archive", SPACE)
    day, hour = first - first % DAY_MS, first - first % HOUR_MS
    assert path == tmp_path / "archive" / "segment-logs" / SPACE / str(day) / f"{hour}.gz"
    assert [orjson.loads(line)["messageId"] for line in lines(tmp_path)] == [e["messageId"] for e in events]
    assert r.xlen(k.log) == 1 and r.get(k.archive_cursor)
    more = [dict(e, messageId=f"more-{e['messageId']}") for e in archived(mixed_stream(50, users=5, seed=22))]
    apply(r, more, settings=s)  # appended to the hour's file as another gzip member
    assert archive_space(r, s, SPACE)["archived"] == 50 and len(lines(tmp_path)) == 850
    with gzip.open(path) as f:  # one gzip stream for any reader
        assert len(f.read().splitlines()) == 850


def test_the_log_keeps_its_retention_and_the_archive_everything(r: redis.Redis, tmp_path: Path) -> None:
    s = settings_for(tmp_path)  # 30 days: nothing this new is trimmed
    apply(r, archived(mixed_stream(300, users=10, seed=23)), settings=s)
    assert archive_space(r, s, SPACE) == {"archived": 300, "trimmed": 0}
    assert r.xlen(Keys(SPACE).log) == 300 and len(lines(tmp_path)) == 300
    assert archive_space(r, s, SPACE) == {"archived": 0, "trimmed": 0}  # nothing twice


def test_replaying_the_archive_rebuilds_the_profiles_even_when_a_crash_archived_twice(r: redis.Redis,
                                                                                    tmp_path: Path) -> None:
    s = settings_for(tmp_path)
    events = archived(mixed_stream(3000, users=80, seed=24))
    apply(r, events[:2000], settings=s)
    archive_space(r, s, SPACE)
    r.delete(Keys(SPACE).archive_cursor)  # as if the archiver died after writing, before moving its cursor
    apply(r, events[2000:], settings=s)
    archive_space(r, s, SPACE)
    assert len(lines(tmp_path)) == 5000  # the first 2000 twice
    whole = snapshot(r)
    wipe(r)
    files = [str(f) for f in archive_files(tmp_path / "archive", SPACE)]
    report = run(r, s, SPACE, file_records(files), Options(reapply=True), "replay")
    assert report.outcome_totals() == {"applied": 5000}
    assert snapshot(r) == whole


def test_an_imported_event_without_a_time_replays_from_the_archive_as_of_its_import(r: redis.Redis,
                                                                                       tmp_path: Path) -> None:
    """An event with no time of its own is applied as received at its import, and that receipt goes into the log
    and the archive: replaying the archive later does not make its old trait newer than what came after it (before,
    the replay stamped it with the replay's time and the old value won)."""
    import time

    from service.spec.events import iso_ms, parse_timestamp

    s = settings_for(tmp_path)
    old = tmp_path / "old.ndjson"
    old.write_bytes(orjson.dumps({"type": "identify", "userId": "ua", "traits": {"plan": "free"}}) + b"\n")
    assert run(r, s, SPACE, file_records([str(old)]), Options(), "import").outcome_totals() == {"applied": 1}
    [(entry, fields)] = r.xrange(Keys(SPACE).log)
    logged_receipt = parse_timestamp(orjson.loads(fields[b"e"])["receivedAt"])  # the import's clock, about the
    assert abs(logged_receipt - int(entry.split(b"-")[0])) < 5_000  # log id's (Redis's clock)
    time.sleep(0.01)
    now = int(time.time() * 1000)
    apply(r, [{"type": "identify", "userId": "ua", "messageId": "later", "traits": {"plan": "pro"},
               "timestamp": iso_ms(now)}], settings=s, now=now)
    archive_space(r, s, SPACE)
    assert all(b'"receivedAt"' in line for line in lines(tmp_path))
    files = [str(f) for f in archive_files(tmp_path / "archive", SPACE)]
    run(r, s, SPACE, file_records(files), Options(reapply=True), "replay")
    assert find(r, "user_id", "ua").traits["plan"].value == "pro"


def test_an_entry_logged_without_a_receipt_is_archived_with_its_entry_s(r: redis.Redis, tmp_path: Path) -> None:
    """Entries an older version logged without ``receivedAt`` get the entry id's time in the archive."""
    s = settings_for(tmp_path)
    nested = {"type": "track", "event": "x", "userId": "uc", "messageId": "c", "properties": {"receivedAt": "?"}}
    r.xadd(Keys(SPACE).log, {"p": "use_1", "e": orjson.dumps({"type": "identify", "userId": "ub", "messageId": "b"})},
           id="1795500000123-0")
    r.xadd(Keys(SPACE).log, {"p": "use_2", "e": orjson.dumps(nested)}, id="1795500000124-0")
    archive_space(r, s, SPACE)
    assert [orjson.loads(line) for line in lines(tmp_path)] == [
        {"type": "identify", "userId": "ub", "messageId": "b", "receivedAt": "2026-11-24T06:00:00.123Z"},
        {**nested, "receivedAt": "2026-11-24T06:00:00.124Z"}]  # a receivedAt inside properties is not its own


def test_a_gdpr_deletion_removes_the_users_events_from_the_archive(r: redis.Redis, tmp_path: Path) -> None:
    s = settings_for(tmp_path)
    t = "2026-03-01T10:00:00Z"
    apply(r, [{"type": "identify", "userId": "gone", "anonymousId": "gone-anon", "messageId": "1", "timestamp": t},
              {"type": "page", "anonymousId": "gone-anon", "messageId": "2", "timestamp": t},
              {"type": "identify", "userId": "stays", "messageId": "3", "timestamp": t}], settings=s)
    archive_space(r, s, SPACE)
    apply(r, [{"type": "delete", "userId": "gone", "messageId": "4", "timestamp": "2026-03-02T10:00:00Z"}],
          settings=s)
    purge_forgotten(r, SPACE)
    assert purge_archive(r, s, SPACE) == 2
    kept = [orjson.loads(line) for line in lines(tmp_path)]
    assert [e["messageId"] for e in kept] == ["3"]
    assert not any(b"gone" in line for line in lines(tmp_path))
    assert r.scard(Keys(SPACE).forgotten_ids) == 0


def test_an_event_that_reached_the_person_by_email_alone_leaves_the_archive_and_the_log(r: redis.Redis,
                                                                                       tmp_path: Path) -> None:
    """A page whose anonymousId the identifier limit kept off the profile reached it by its email alone: after
    the person's deletion the purge removes it from the log and the archive too, email and all. A group call
    whose account traits carry the same email is the account's, and stays."""
    s = settings_for(tmp_path).replace(identity_limits={"user_id": 1, "anonymous_id": 1, "*": 5})
    t = "2026-03-01T10:00:00Z"
    events = [{"type": "identify", "userId": "gone", "anonymousId": "first", "messageId": "1", "timestamp": t,
               "traits": {"email": "Gone@Example.com"}},
              {"type": "page", "anonymousId": "second", "messageId": "2", "timestamp": t,
               "context": {"traits": {"email": "gone@example.com "}}},
              {"type": "group", "userId": "stays", "groupId": "acme", "messageId": "3", "timestamp": t,
               "traits": {"email": "gone@example.com"}}]
    apply(r, events, settings=s)
    assert [i.value for i in find(r, "user_id", "gone").identifiers if i.type == "anonymous_id"] == ["first"]
    archive_space(r, s, SPACE)
    apply(r, [{"type": "delete", "userId": "gone", "messageId": "4", "timestamp": "2026-03-02T10:00:00Z"}],
          settings=s)
    purge_forgotten(r, SPACE)
    purge_archive(r, s, SPACE)
    logged = [orjson.loads(f[b"e"])["messageId"] for _, f in r.xrange(Keys(SPACE).log)]
    archived = [orjson.loads(line)["messageId"] for line in lines(tmp_path)]
    assert "2" not in logged and "2" not in archived
    assert "3" in archived and "3" in logged


def test_text_that_cannot_be_decoded_belongs_to_an_erased_numeric_user_id_written_bare() -> None:
    """Segment allows a number as userId: a malformed body with ``"userId":4711`` names the erased user 4711 (the
    text search looked only for ``"4711"``), and one naming 47110 does not."""
    assert belongs(b'{"userId":4711, "event": "x", "properties": {', {"4711": Erasure()}, 0)
    assert belongs(b'{"userId" : -12 }{', {"-12": Erasure()}, 0)
    assert not belongs(b'{"userId":47110, "event": {', {"4711": Erasure()}, 0)
    assert not belongs(b'{"event": "4711 items", [', {"4711": Erasure()}, 0)
    assert belongs(b'{"userId":"ada", [', {"ada": Erasure()}, 0)


def test_an_event_belongs_to_an_erasure_up_to_its_time_by_the_time_it_took_effect() -> None:
    """An event is purged when it names an erased id and either took effect at or before that id's erasure (judged
    as the state judged it: its own time, never later than its receipt) or was received before the profile was
    erased (as it stood then; a web host's receipt up to a second after counts as before, for its clock);
    without either record (a lifted suppression), or with an unreadable time of its own, it is purged. One that
    the state gave someone else (its first identifier by priority is not an erased one) is theirs."""
    from service.spec.events import iso_ms
    from service.spec.identity import IdentityRules
    from service.state.archive import CLOCK_SKEW_MS, event_belongs

    until, applied = 1_000_000, 2_000_000
    later = applied + CLOCK_SKEW_MS + 1  # received after the erasure, whatever the clocks
    erased = {"ada": Erasure(until, applied), "tablet": Erasure(until, applied), "lifted": Erasure()}
    rules = IdentityRules()

    def ada(at: int, **more: object) -> dict:
        return {"type": "track", "event": "x", "userId": "ada", "timestamp": iso_ms(at), **more}

    for judge in (None, rules):
        assert event_belongs(ada(until), erased, later, rules=judge)
        assert not event_belongs(ada(until + 1), erased, later, rules=judge)
        assert event_belongs(ada(until + 1), erased, applied, rules=judge)  # received before: as the profile stood
        assert not event_belongs(ada(until + 1), erased, applied + 1, rules=judge)  # by Redis's clock (the log's)
        # by a web host's clock (a dead letter's, an archived line's), a second later still counts as before
        assert event_belongs(ada(until + 1), erased, applied + CLOCK_SKEW_MS, rules=judge, skew=CLOCK_SKEW_MS)
        assert event_belongs(ada(until + 1), erased, later + HOUR_MS, later - 1, rules=judge, skew=CLOCK_SKEW_MS)
        assert not event_belongs(ada(until + 1, receivedAt=iso_ms(later)), erased, later + HOUR_MS, later - 1,
                                 rules=judge, skew=CLOCK_SKEW_MS)  # its receivedAt says after
        assert event_belongs(ada(10 ** 13), erased, until, rules=judge)  # a clock in the future, capped by receipt
        assert event_belongs({"type": "page", "anonymousId": "x", "context": {"traits": {"email": "ADA"}}},
                             erased, until, rules=judge)
        assert event_belongs(ada(until, timestamp="not a time"), erased, later, rules=judge)
        assert event_belongs({"type": "page", "userId": "lifted", "timestamp": iso_ms(10 ** 13)}, erased, later,
                             rules=judge)
        assert not event_belongs(dict(ada(0), userId="bob"), erased, later, rules=judge)
    # someone else's, as the state judged it: another userId, or another person's email ahead of a shared tablet's
    # anonymousId; a blocked placeholder userId is nobody's, and the tablet's first
    shared = {"type": "page", "anonymousId": "tablet", "timestamp": iso_ms(0)}
    assert not event_belongs({**shared, "userId": "bob"}, erased, later, rules=rules)
    assert not event_belongs({**shared, "context": {"traits": {"email": "dave@example.com"}}}, erased, later,
                             rules=rules)
    for nobody in ("null", "anonymous", "0"):
        assert event_belongs({**shared, "userId": nobody}, erased, later, rules=rules), nobody
    assert event_belongs(shared, erased, later, rules=rules)


def test_replay_from_archive_command(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    s = settings_for(tmp_path, retention=0)
    apply(r, archived(mixed_stream(400, users=15, seed=25)), settings=s)
    archive_space(r, s, SPACE)
    whole = snapshot(r)
    wipe(r)
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url, "EVENT_ARCHIVE_DIR": s.event_archive_dir}
    out = subprocess.run([EXE, "replay", "--from-archive", "--rate", "0"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "400 events were: 400 applied" in out.stdout and snapshot(r) == whole
    none = subprocess.run([EXE, "replay", "--from-archive"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url})
    assert none.returncode == 1 and "EVENT_ARCHIVE_DIR is not set" in none.stderr


def test_pretty_printed_bodies_and_lone_surrogates_are_one_readable_line_each(client, r: redis.Redis,
                                                                              tmp_path: Path) -> None:
    """A webhook body as a person might send it (pretty-printed, half an emoji) is logged and archived as one
    compact line that any reader parses on its own."""
    from tests.http.test_receiver import post

    body = (b'{\n  "type": "identify",\n  "userId": "pretty",\n  "messageId": "pp-1",\n'
            b'  "timestamp": "2026-03-01T10:00:00Z",\n  "receivedAt": "2026-03-01T10:00:01Z",\n'
            b'  "traits": {"nick": "cut \\ud83d"}\n}')
    assert post(client, body).status_code == 200
    s = settings_for(tmp_path)
    archive_space(r, s, SPACE)
    [line] = lines(tmp_path)
    assert b"\n" not in line and orjson.loads(line)["traits"] == {"nick": "cut \ufffd"}
    [(_, fields)] = r.xrange(Keys(SPACE).log)
    assert orjson.loads(fields[b"e"])["userId"] == "pretty"


def test_an_entry_logged_in_the_cursors_millisecond_is_not_trimmed_unarchived(r: redis.Redis,
                                                                              tmp_path: Path) -> None:
    s = settings_for(tmp_path, retention=0)
    log = Keys(SPACE).log
    r.xadd(log, {"p": "use_1", "e": b'{"messageId":"a"}'}, id="1000-0")
    assert archive_space(r, s, SPACE)["archived"] == 1
    r.xadd(log, {"p": "use_1", "e": b'{"messageId":"b"}'}, id="1000-1")  # the same millisecond, after the read
    assert archive_space(r, s, SPACE)["archived"] == 1
    assert [orjson.loads(line)["messageId"] for line in lines(tmp_path)] == ["a", "b"]


def test_a_failed_append_leaves_the_file_readable(r: redis.Redis, tmp_path: Path, monkeypatch) -> None:
    from service.state import archive

    path = tmp_path / "1" / "h.gz"
    archive._append(r, SPACE, path, [b'{"n":1}'])

    class DiskFull(OSError):
        pass

    def fail(fd: int) -> None:
        raise DiskFull("no space left on device")

    monkeypatch.setattr(archive.os, "fsync", fail)
    try:
        archive._append(r, SPACE, path, [b'{"n":2}'])
    except DiskFull:
        pass
    monkeypatch.undo()
    archive._append(r, SPACE, path, [b'{"n":3}'])
    assert [orjson.loads(line)["n"] for line in archived_lines(path)] == [1, 3]
    # a write killed outright (SIGKILL, a lost machine) runs no cleanup: its torn member made the file unreadable
    # from there on, to replays and to every GDPR purge after it; the next write cuts it off first
    with open(path, "ab") as raw:
        raw.write(gzip.compress(b'{"n":"torn"}\n' * 100)[:40])
    archive._append(r, SPACE, path, [b'{"n":4}'])
    assert [orjson.loads(line)["n"] for line in archived_lines(path)] == [1, 3, 4]


def test_the_purge_reads_an_archive_file_a_killed_write_tore(r: redis.Redis, tmp_path: Path) -> None:
    """The archiver never writes to an old hour's file again: the purge cuts a torn tail off itself, and removes
    the erased person's lines; it raised on every run, and the person's events stayed in the archive."""
    from service.state.ops import purge_erased

    s = settings_for(tmp_path)
    apply(r, [{"type": "identify", "userId": u, "messageId": u, "timestamp": "2026-03-01T10:00:00Z"}
              for u in ("ada", "bob")], settings=s)
    archive_space(r, s, SPACE)
    [path] = archive_files(tmp_path / "archive", SPACE)
    with open(path, "ab") as raw:
        raw.write(gzip.compress(b'{"n":"torn"}\n' * 100)[:40])
    apply(r, [{"type": "delete", "userId": "ada", "messageId": "d", "timestamp": "2026-03-02T10:00:00Z"}],
          settings=s)
    purge_erased(r, s, SPACE)
    assert [orjson.loads(line)["messageId"] for line in lines(tmp_path)] == ["bob"]


def test_the_purge_keeps_what_a_returning_user_sent_after_the_deletion(r: redis.Redis, tmp_path: Path) -> None:
    """Only a deleted userId's events up to its deletion are suppressed: later ones are a returning person's, and
    the state applies them. A purge that ran after they arrived (a busy queue, a worker down for a while) removed
    them from the log, the dead letters and the archive as well, and a rebuild then lost that person."""
    from service.state.ops import purge_erased
    from service.state.rebuild import rebuild
    from service.state.store import SyncStore

    s = settings_for(tmp_path)
    before, deleted, after = "2026-03-01T10:00:00Z", "2026-03-02T10:00:00Z", "2026-03-03T10:00:00Z"
    k = Keys(SPACE)
    apply(r, [{"type": "identify", "userId": "back", "anonymousId": "b-anon", "messageId": "1", "timestamp": before,
               "traits": {"email": "Back@Example.com"}},
              {"type": "page", "userId": "stays", "messageId": "2", "timestamp": before}], settings=s)
    store = SyncStore(r, s)
    store.dead_letters(SPACE, [("old", orjson.dumps({"type": "track", "userId": "back", "timestamp": before}))],
                       "webhook")
    apply(r, [{"type": "delete", "userId": "back", "messageId": "3", "timestamp": deleted}], settings=s)
    time.sleep(CLOCK_SKEW_MS / 1000 + 0.1)  # the user comes back later than web hosts' clocks may be off Redis's
    returned = [{"type": "identify", "userId": "back", "anonymousId": "b-anon", "messageId": "4", "timestamp": after,
                 "traits": {"email": "back@example.com"}},
                {"type": "page", "anonymousId": "b-anon", "messageId": "5", "timestamp": after},
                {"type": "page", "anonymousId": "b-anon", "messageId": "6", "timestamp": before}]
    assert [o.status for o in apply(r, returned, settings=s)] == ["ok", "ok", "suppressed"]
    store.dead_letters(SPACE, [("new", orjson.dumps({"type": "track", "userId": "back", "timestamp": after})),
                               ("batch", orjson.dumps([{"type": "track", "anonymousId": "b-anon", "timestamp": t}
                                                       for t in (before, after)]))], "webhook")
    archive_space(r, s, SPACE)

    assert purge_erased(r, s, SPACE) > 0

    assert sorted(orjson.loads(f[b"e"])["messageId"] for _, f in r.xrange(k.log)) == ["2", "4", "5"]
    assert sorted(orjson.loads(line)["messageId"] for line in lines(tmp_path)) == ["2", "4", "5"]
    kept = {f[b"reason"]: orjson.loads(f[b"raw"]) for _, f in r.xrange(k.dead_letters)}
    assert kept == {b"new": {"type": "track", "userId": "back", "timestamp": after},
                    b"batch": [{"type": "track", "anonymousId": "b-anon", "timestamp": after}]}
    assert r.scard(k.forgotten_ids) == 0
    rebuild(r, s, SPACE, force=True)
    person = find(r, "user_id", "back")
    assert person is not None and person.traits["email"].value == "back@example.com"
    assert {(i.type, i.value) for i in person.identifiers} >= {("anonymous_id", "b-anon"),
                                                              ("email", "back@example.com")}


def test_a_rebuild_loses_nothing_the_archiver_trims_while_it_reads(r: redis.Redis, tmp_path: Path) -> None:
    """A rebuild reads the archive files up to the log's first entry, then the log. An archiver run that trimmed in
    between (one under way when the rebuild started) left entries in neither what was read of the files nor the
    log: the rebuilt generation lacked those people, and the rebuild said it was done. Later runs leave the log
    alone while a rebuild holds its lock, and the rebuild reads the files again from where the log moved."""
    from service.state.rebuild import rebuild

    s = settings_for(tmp_path, retention=0)
    k = Keys(SPACE)
    apply(r, [{"type": "identify", "userId": f"a{i}", "messageId": f"a{i}", "timestamp": "2026-03-01T10:00:00Z"}
              for i in range(5)], settings=s)
    archive_space(r, s, SPACE)  # all but the cursor's entry leave the log
    apply(r, [{"type": "identify", "userId": f"b{i}", "messageId": f"b{i}", "timestamp": "2026-03-01T11:00:00Z"}
              for i in range(5)], settings=s)
    trimmed: list[int] = []

    def meanwhile(_: int) -> None:  # once the first file is read: what an archiver run under way would do
        if trimmed:
            return
        assert archive_space(r, s, SPACE)["trimmed"] == 0  # holds back while the rebuild holds its lock
        last = r.xrevrange(k.log, count=1)[0][0]
        trimmed.append(r.xtrim(k.log, minid=last.decode(), approximate=False))

    rebuild(r, s, SPACE, force=True, progress=meanwhile)
    assert trimmed == [5]
    assert {p for p in (f"a{i}" for i in range(5)) if find(r, "user_id", p) is None} == set()
    assert {p for p in (f"b{i}" for i in range(5)) if find(r, "user_id", p) is None} == set()
    apply(r, [{"type": "page", "userId": "a0", "messageId": "after", "timestamp": "2026-03-01T12:00:00Z"}],
          settings=s)
    assert archive_space(r, s, SPACE)["trimmed"] == 1  # and trims again once the rebuild is over


def test_the_purge_removes_what_the_deletion_erased_and_keeps_a_shared_devices_other_user(r: redis.Redis,
                                                                                          tmp_path: Path) -> None:
    """A deletion erases the profile as it stands, events stamped after the deletion's time included when they
    arrived before it (Segment forwards deletions late): the purge removes those from the archive and the dead
    letters too (judged by time alone they stayed, and a rebuild brought the person back). An event of another
    userId that named the deleted person's device is that user's: the state kept it for them, and so does the
    purge."""
    from service.spec.clock import now_ms
    from service.state.ops import purge_erased
    from service.state.rebuild import rebuild
    from service.state.store import SyncStore

    s = settings_for(tmp_path)
    k = Keys(SPACE)
    before, deleted, after = "2026-03-01T10:00:00Z", "2026-03-02T10:00:00Z", "2026-03-03T10:00:00Z"
    apply(r, [{"type": "identify", "userId": "gone", "anonymousId": "tablet", "messageId": "1", "timestamp": before},
              {"type": "identify", "userId": "gone", "messageId": "2", "timestamp": after,
               "traits": {"plan": "secret"}},
              {"type": "track", "userId": "other", "anonymousId": "tablet", "messageId": "3", "timestamp": before,
               "event": "Order Completed", "properties": {"order_id": "o1", "revenue": 99}}], settings=s)
    SyncStore(r, s).dead_letters(SPACE, [("dl", orjson.dumps({"type": "track", "userId": "gone",
                                                              "timestamp": after}))], "webhook")
    archive_space(r, s, SPACE)
    now = now_ms()
    apply(r, [{"type": "delete", "userId": "gone", "messageId": "d", "timestamp": deleted}], settings=s, now=now)
    assert find(r, "user_id", "gone") is None

    purge_erased(r, s, SPACE)

    assert [orjson.loads(f[b"e"])["messageId"] for _, f in r.xrange(k.log)] == ["3"]
    assert [orjson.loads(line)["messageId"] for line in lines(tmp_path)] == ["3"]
    assert r.xlen(k.dead_letters) == 0
    rebuild(r, s, SPACE, force=True)
    assert find(r, "user_id", "gone") is None
    other = find(r, "user_id", "other")
    assert other is not None and [o.key for o in other.orders] == ["o1"]


def test_the_purge_judges_devices_external_ids_and_bare_numbers_as_the_state_does(r: redis.Redis,
                                                                                   tmp_path: Path) -> None:
    """An app's anonymous event leads with its device id (ahead of the anonymousId by priority), which the purge
    keeps no list of: it goes when it names the erased person. An event naming them only in context.externalIds
    goes too. A number in an unreadable body is an erased userId only where an id stands (a "quantity":42 of
    someone else's order is not user 42)."""
    from service.spec.clock import now_ms
    from service.state.ops import purge_erased
    from service.state.store import SyncStore

    s = settings_for(tmp_path)
    k = Keys(SPACE)
    t = "2026-03-01T10:00:00Z"
    android = {"type": "android", "id": "dev-ada"}
    apply(r, [{"type": "identify", "userId": "ada", "anonymousId": "anon-ada", "messageId": "1", "timestamp": t,
               "context": {"device": android}},
              {"type": "screen", "name": "Checkout", "anonymousId": "anon-ada", "messageId": "2", "timestamp": t,
               "context": {"device": android}},
              {"type": "identify", "userId": "42", "messageId": "3", "timestamp": t}], settings=s)
    SyncStore(r, s).dead_letters(SPACE, [
        ("android", orjson.dumps({"type": "screen", "anonymousId": "anon-ada", "timestamp": "bad",
                                  "context": {"device": android}})),
        ("external", orjson.dumps({"type": "track", "anonymousId": "unknown", "timestamp": "bad",
                                   "context": {"externalIds": [{"id": "ada", "type": "user_id"}]}})),
        ("bob", b'{"type":"track","userId":"bob","properties":{"quantity":42,"revenue":42},'),
        ("42", b'{"type":"track","userId":42,"properties":{'),
    ], "webhook")
    archive_space(r, s, SPACE)
    now = now_ms()
    for who in ("ada", "42"):
        apply(r, [{"type": "delete", "userId": who, "messageId": f"d-{who}", "timestamp": t}], settings=s, now=now)

    purge_erased(r, s, SPACE)

    assert [f[b"reason"] for _, f in r.xrange(k.dead_letters)] == [b"bob"]
    assert lines(tmp_path) == [] and r.xlen(k.log) == 0


def test_a_deletion_applied_while_a_purge_runs_keeps_its_ids_for_its_own_purge(r: redis.Redis,
                                                                              tmp_path: Path) -> None:
    """The purge read the erased ids, then forgot the whole set (or every id it had read) when done: a deletion
    applied meanwhile, of someone else or of the same person again, lost its purge."""
    from service.spec.clock import now_ms
    from service.state.archive import erased_ids
    from service.state.ops import purge_erased

    for archive in (True, False):
        r.flushall()
        s = settings_for(tmp_path / str(archive)) if archive else Settings()
        t = "2026-03-01T10:00:00Z"
        apply(r, [{"type": "identify", "userId": u, "messageId": u, "timestamp": t} for u in ("ada", "bob")],
              settings=s)
        apply(r, [{"type": "delete", "userId": "ada", "messageId": "d1", "timestamp": t}], settings=s, now=now_ms())
        read = erased_ids(r, SPACE)  # what the job read, before bob's deletion came in
        apply(r, [{"type": "delete", "userId": "bob", "messageId": "d2", "timestamp": t}], settings=s, now=now_ms())
        purge_archive(r, s, SPACE, read)
        assert {i.decode() for i in r.smembers(Keys(SPACE).forgotten_ids)} == {"bob"}, archive
        purge_erased(r, s, SPACE)
        assert not r.exists(Keys(SPACE).forgotten_ids)
