"""The replay engine against a real Redis: imports of every file format, replays of the log and of dead letters,
dry runs, filters, idempotence and resume."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import orjson
import pytest
import redis

from service.config import Settings
from service.spec.events import iso_ms, parse_timestamp
from service.spec.identity import IdentityRules
from service.spec.keys import Keys
from service.state.replay import (
    Checkpoint,
    Options,
    Report,
    dead_letter_records,
    file_records,
    log_records,
    only,
    profile_filter,
    resolve,
    run,
)
from service.state.store import SyncStore
from tests.helpers import apply, find, mixed_stream, snapshot

BOTH_BACKENDS = True  # each test runs on a standalone Redis and on a Redis Cluster (tests/conftest.py)

SPACE = "default"


def archived(events: list[dict]) -> list[dict]:
    """As Segment's archives hold them: every event with Segment's receivedAt (a little after its timestamp)."""
    rnd = random.Random(1)
    return [dict(e, receivedAt=iso_ms(parse_timestamp(e["timestamp"]) + rnd.randint(0, 5000))) for e in events]


def write_archive(path: Path, events: list[dict]) -> Path:
    """Segment's S3 destination layout: gzip, one event JSON per line."""
    with gzip.open(path, "wb") as f:
        for e in events:
            f.write(orjson.dumps(e) + b"\n")
    return path


def import_files(r: redis.Redis, paths: list[Path], **options: object) -> Report:
    return run(r, Settings(), SPACE, file_records([str(p) for p in paths]), Options(**options), "import")  # type: ignore[arg-type]


def log_entries(r: redis.Redis) -> list[bytes]:
    return [f[b"e"] for _, f in r.xrange(Keys(SPACE).log)]


def test_an_archive_import_gives_the_profiles_live_ingest_gives(r: redis.Redis, tmp_path: Path) -> None:
    events = archived(mixed_stream(6000, users=150, seed=11))
    apply(r, events)
    live = snapshot(r)
    r.flushall()
    half = len(events) // 2  # an hour per file, as the archive lays them out
    files = [write_archive(tmp_path / "a.gz", events[:half]), write_archive(tmp_path / "b.gz", events[half:])]
    report = import_files(r, files)
    assert report.outcome_totals() == {"applied": len(events)}
    assert snapshot(r) == live
    # and importing the same archive again changes nothing, and logs nothing twice
    again = import_files(r, files)
    assert again.outcome_totals() == {"duplicate": len(events)}
    assert snapshot(r) == live and len(log_entries(r)) == len(events)


def test_every_file_format_and_invalid_lines_become_dead_letters(r: redis.Redis, tmp_path: Path) -> None:
    event = {"type": "identify", "userId": "f1", "messageId": "x1", "timestamp": "2026-03-01T10:00:00Z",
             "traits": {"plan": "pro"}}
    ndjson = tmp_path / "plain.ndjson"
    ndjson.write_bytes(orjson.dumps(event) + b"\n\nnot json at all\n"
                       + orjson.dumps({"type": "track", "userId": "f1", "messageId": "x2"}) + b"\n"  # no event: fine
                       + orjson.dumps({"type": "teleport", "userId": "f1", "messageId": "x3"}) + b"\n")
    array = tmp_path / "array.json"
    array.write_bytes(orjson.dumps([dict(event, userId="f2", messageId="y1")], option=orjson.OPT_INDENT_2))
    batch = tmp_path / "batch.json"
    batch.write_bytes(orjson.dumps({"writeKey": "wk", "context": {"library": {"name": "analytics-python"}},
                                    "batch": [dict(event, userId="f3", messageId="z1", writeKey="wk")]}))
    report = import_files(r, [ndjson, array, batch])
    assert report.outcome_totals() == {"applied": 4, "invalid": 2}
    for uid in ("f1", "f2", "f3"):
        assert find(r, "user_id", uid).trait_values() == {"plan": "pro"}
    letters = r.xrange(Keys(SPACE).dead_letters)
    reasons = sorted(f[b"reason"].decode() for _, f in letters)
    assert reasons[0].startswith("plain.ndjson:3: malformed JSON")
    assert reasons[1].startswith("plain.ndjson:5: unknown type 'teleport'")
    assert {f[b"source"] for _, f in letters} == {b"import"}
    assert not any(b"wk" in e for e in log_entries(r))  # the batch's write key is not part of the events


def test_events_without_message_id_or_receipt_import_the_same_every_time(r: redis.Redis, tmp_path: Path) -> None:
    path = tmp_path / "history.ndjson"
    path.write_bytes(b"".join(orjson.dumps({"type": "track", "userId": "n1", "event": "Email Opened",
                                            "timestamp": "2026-03-01T10:00:00Z"}) + b"\n" for _ in range(3)))
    assert import_files(r, [path]).outcome_totals() == {"applied": 3}  # three lines: three events
    assert import_files(r, [path]).outcome_totals() == {"duplicate": 3}  # the same lines again: nothing new
    logged = [orjson.loads(e) for e in log_entries(r)]
    assert len({e["messageId"] for e in logged}) == 3
    assert {e["receivedAt"] for e in logged} == {"2026-03-01T10:00:00.000Z"}


def test_files_of_the_same_name_in_two_folders_are_two_histories(r: redis.Redis, tmp_path: Path) -> None:
    """Daily exports are often each a folder with a file of the same name: events without a messageId get one
    from the file's name, line and content, so two such files both apply, and each imported again adds nothing
    (also from another folder)."""
    paths = []
    for day, who in (("2026-03-01", "alice"), ("2026-03-02", "bob")):
        (tmp_path / day).mkdir()
        path = tmp_path / day / "events.ndjson"
        path.write_bytes(orjson.dumps({"type": "identify", "userId": who, "timestamp": f"{day}T10:00:00Z"}) + b"\n")
        paths.append(path)
    assert import_files(r, paths).outcome_totals() == {"applied": 2}
    assert find(r, "user_id", "alice") is not None and find(r, "user_id", "bob") is not None
    moved = tmp_path / "moved.d"
    moved.mkdir()
    (moved / "events.ndjson").write_bytes(paths[1].read_bytes())
    assert import_files(r, [paths[0], moved / "events.ndjson"]).outcome_totals() == {"duplicate": 2}


def test_dry_run_counts_and_changes_nothing(r: redis.Redis, tmp_path: Path) -> None:
    events = archived(mixed_stream(800, users=30, seed=2))
    apply(r, events[:300])
    before = (snapshot(r), r.dbsize())
    path = write_archive(tmp_path / "h.gz", events + events[:10] + [{"type": "nope", "messageId": "bad"}])
    report = import_files(r, [path], dry_run=True)
    assert report.outcome_totals() == {"new": 500, "duplicate": 310, "invalid": 1}
    assert (snapshot(r), r.dbsize()) == before


def test_a_log_replay_rewrites_what_was_wrong_and_logs_nothing_twice(r: redis.Redis) -> None:
    events = archived(mixed_stream(3000, users=80, seed=5))
    apply(r, events)
    right = snapshot(r)
    k = Keys(SPACE)
    logged = log_entries(r)
    for pid in list(r.smembers(k.dirty))[:20]:  # a bug had lost some traits and orders
        fields = [f for f in r.hkeys(k.profile(pid.decode())) if f[:2] in (b"t:", b"o:")]
        if fields:
            r.hdel(k.profile(pid.decode()), *fields)
    assert snapshot(r) != right
    for _ in range(2):  # and twice is the same as once
        report = run(r, Settings(), SPACE, log_records(r, SPACE), Options(reapply=True), "replay")
        assert report.outcome_totals() == {"applied": len(events)}
        assert snapshot(r) == right and log_entries(r) == logged


def test_log_filters_profile_type_event_and_time(r: redis.Redis) -> None:
    t = "2026-03-01T10:00:00Z"
    apply(r, [
        {"type": "page", "anonymousId": "anon-a", "messageId": "1", "timestamp": t},
        {"type": "identify", "userId": "ada", "messageId": "2", "timestamp": t, "traits": {"email": "ada@x.io"}},
        {"type": "alias", "userId": "ada", "previousId": "anon-a", "messageId": "3", "timestamp": t},
        {"type": "track", "userId": "ada", "event": "Clicked", "messageId": "4", "timestamp": t},
        {"type": "track", "userId": "bob", "event": "Clicked", "messageId": "5", "timestamp": t},
    ])
    rules = IdentityRules.from_settings(Settings())
    pid = resolve(r, rules, SPACE, "email:Ada@X.io")[2]
    assert pid is not None
    pids = profile_filter(r, Settings(), SPACE, pid)
    assert len(pids.pids) == 2  # ada's profile and the anonymous one merged into it

    def mids(types: set[str] | None = None, event: str | None = None, **filters: object) -> list[str]:
        records = only(log_records(r, SPACE, **filters), types, event)  # type: ignore[arg-type]
        return [orjson.loads(rec.item.raw)["messageId"] for rec in records]

    assert mids(profile=pids) == ["1", "2", "3", "4"]
    assert mids(types={"track"}) == ["4", "5"]
    assert mids(event="Clicked", profile=pids) == ["4"]
    first = int(r.xrange(Keys(SPACE).log)[0][0].decode().split("-")[0])
    assert len(mids(since_ms=first)) == 5 and mids(until_ms=first - 1) == []
    assert resolve(r, rules, SPACE, "email:nobody@x.io")[2] is None


def test_dead_letters_that_apply_are_removed_the_rest_stay(r: redis.Redis) -> None:
    store = SyncStore(r, Settings())
    good = {"type": "identify", "userId": "dl", "messageId": "d1", "timestamp": "2026-03-01T10:00:00Z",
            "traits": {"plan": "pro"}}
    store.dead_letters(SPACE, [("store error: OOM", orjson.dumps(good)),
                               ("unknown type 'x'", orjson.dumps({"type": "x", "messageId": "d2"}))], "webhook")
    store.dead_letters(SPACE, [("X-Signature does not match", orjson.dumps(dict(good, userId="forged")))],
                       "webhook-unsigned")
    dry = run(r, Settings(), SPACE, dead_letter_records(r, SPACE), Options(dry_run=True), "replay")
    assert dry.outcome_totals() == {"new": 1, "invalid": 1} and r.xlen(Keys(SPACE).dead_letters) == 3
    only_oom = run(r, Settings(), SPACE, dead_letter_records(r, SPACE, reason="oom"), Options(), "replay")
    assert only_oom.outcome_totals() == {"applied": 1} and only_oom.dead_letters_removed == 1
    assert find(r, "user_id", "dl").trait_values() == {"plan": "pro"} and find(r, "user_id", "forged") is None
    rest = run(r, Settings(), SPACE, dead_letter_records(r, SPACE), Options(), "replay")
    assert rest.outcome_totals() == {"invalid": 1}
    reasons = sorted(f[b"reason"] for _, f in r.xrange(Keys(SPACE).dead_letters))
    assert reasons == [b"X-Signature does not match", b"unknown type 'x'"]  # kept, with their own reasons


def test_an_interrupted_import_resumes_where_it_stopped(r: redis.Redis, tmp_path: Path) -> None:
    events = archived(mixed_stream(5000, users=100, seed=8))
    apply(r, events)
    whole = snapshot(r)
    r.flushall()
    path = write_archive(tmp_path / "big.gz", events)
    checkpoint = Checkpoint(r, SPACE, "test")
    chunks = iter(range(10**6))
    stopped = run(r, Settings(), SPACE, file_records([str(path)]), Options(), "import", checkpoint,
                  should_stop=lambda: next(chunks) >= 1)
    assert stopped.stopped == f"@{path}:2000" and checkpoint.load() == f"@{path}:2000"
    assert r.xlen(Keys(SPACE).log) == 2000
    rest = run(r, Settings(), SPACE, file_records([str(path)], checkpoint.load()), Options(), "import", checkpoint)
    assert rest.outcome_totals() == {"applied": 3000} and checkpoint.load() is None
    assert snapshot(r) == whole and r.xlen(Keys(SPACE).log) == len(events)


def test_a_resume_finds_its_file_when_the_list_of_files_changed(tmp_path: Path) -> None:
    """A resumed replay of the archive with a relative --since lists the files again, and the oldest hour may have
    fallen out of the window meanwhile: the position names its file, so the resume starts where it stopped
    (before, a position counted files by place and skipped a whole file after the shift)."""
    paths = [str(write_archive(tmp_path / f"{h}.gz", [{"type": "page", "userId": f"u{h}-{n}", "messageId": f"{h}-{n}"}
                                                       for n in range(5)])) for h in range(3)]
    first = list(file_records(paths))
    position = first[7].position  # stopped in the second file
    assert position == f"@{paths[1]}:3"
    resumed = [rec.where for rec in file_records(paths[1:], position)]  # the first file fell out of the window
    assert resumed == [rec.where for rec in first[8:]]
    assert [rec.where for rec in file_records(paths, "1:3")] == [rec.where for rec in first[8:]]  # older versions'
    gone = [rec.where for rec in file_records(paths[2:], position)]  # its file is not listed: every file given
    assert gone == [rec.where for rec in first[10:]]


def test_a_file_of_webhooks_actions_batches_one_per_line_imports_every_event(r: redis.Redis, tmp_path: Path) -> None:
    """Request bodies kept one per line (an outage's Actions batches): before, the first line's '[' made the whole
    file one JSON document, which failed to parse and became a single dead letter cut to 64 KiB."""
    events = archived(mixed_stream(300, users=12, seed=9))
    path = tmp_path / "bodies.ndjson"
    path.write_bytes(b"".join(orjson.dumps(events[i:i + 100]) + b"\n" for i in range(0, 300, 100)))
    assert import_files(r, [path]).outcome_totals() == {"applied": 300}
    one = tmp_path / "one.json"  # a single array, as before: one document, blank lines after it or not
    one.write_bytes(orjson.dumps(events[:10]) + b"\n\n\n")
    assert [rec.where for rec in file_records([str(one)])] == [f"one.json#{n}" for n in range(1, 11)]


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_gzip_file_keeps_what_was_read_and_the_next_file_follows(r: redis.Redis, tmp_path: Path,
                                                                            damage: str) -> None:
    """An archive copy cut short, or a corrupt block: before, a traceback (truncated) or "Redis refused a chunk"
    (a CRC error is an OSError), and a resume failed the same way for ever. Now the file's readable events apply,
    the damage is a dead letter that names the file and the line, and the next file is imported."""
    events = [{"type": "page", "userId": f"u{n}", "messageId": f"m{n}", "name": "x" * (n % 97)} for n in range(20_000)]
    whole = write_archive(tmp_path / "whole.gz", events).read_bytes()
    damaged = tmp_path / "damaged.gz"
    if damage == "truncated":
        damaged.write_bytes(whole[: len(whole) * 3 // 4])
    else:
        middle = len(whole) // 2
        damaged.write_bytes(whole[:middle] + b"\0" * 10 + whole[middle + 10:])
    after = write_archive(tmp_path / "after.gz", [{"type": "page", "userId": "z", "messageId": "after"}])
    report = run(r, Settings(), SPACE, file_records([str(damaged), str(after)]), Options(), "import")
    totals = report.outcome_totals()
    assert 0 < totals["applied"] < len(events) + 1, totals
    # cut short: one dead letter says so; corrupt: what the damaged block decodes to is not JSON either (gzip's
    # check comes at the end of the file), and each such line is a dead letter of its own
    assert totals["invalid"] == 1 if damage == "truncated" else totals["invalid"] >= 1, totals
    assert find(r, "user_id", "z") is not None  # the next file was read
    reasons = [letter[b"reason"] for _, letter in r.xrange(Keys(SPACE).dead_letters)]
    assert sum(b"damaged.gz is damaged" in reason and b"after line" in reason for reason in reasons) == 1


@pytest.mark.parametrize("rate", [500.0])
def test_a_throttled_run_applies_everything(r: redis.Redis, tmp_path: Path, rate: float) -> None:
    """The rate only spaces the chunks out (how well it protects live intake is measured in BENCHMARKS.md)."""
    path = write_archive(tmp_path / "t.gz", archived(mixed_stream(300, users=10, seed=3)))
    assert import_files(r, [path], rate=rate).outcome_totals() == {"applied": 300}


def test_a_month_of_s3_archive_backfills_to_the_profiles_of_live_ingest(r: redis.Redis, tmp_path: Path) -> None:
    """100,000 events of a generated Segment S3 archive (one gzip file per received day, as the destination lays
    them out) imported into an empty space give exactly the profiles that live ingest of the same events gives."""
    events = archived(mixed_stream(100_000, users=2000, seed=31))
    apply(r, events, batch=1000)
    live = snapshot(r)
    r.flushall()
    by_day: dict[str, list[dict]] = {}
    for e in sorted(events, key=lambda e: e["receivedAt"]):
        by_day.setdefault(e["receivedAt"][:10], []).append(e)
    files = [write_archive(tmp_path / f"{day}.gz", day_events) for day, day_events in sorted(by_day.items())]
    assert len(files) >= 28
    report = import_files(r, files)
    assert report.outcome_totals() == {"applied": 100_000}
    assert snapshot(r) == live


def test_a_log_replay_takes_each_entrys_receipt_from_its_id(r: redis.Redis) -> None:
    """An entry logged before receipts were written into events: replayed, its 2099 clock takes effect when it
    was received (the entry id), not at replay time, so a later write keeps winning."""
    log = Keys(SPACE).log
    r.xadd(log, {"p": "use_1", "e": orjson.dumps({"type": "identify", "userId": "old", "messageId": "o1",
                                                  "timestamp": "2099-01-01T00:00:00Z", "traits": {"plan": "a"}})},
           id="1700000000000-0")
    r.xadd(log, {"p": "use_1", "e": orjson.dumps({"type": "identify", "userId": "old", "messageId": "o2",
                                                  "timestamp": "2023-11-14T22:14:10Z", "traits": {"plan": "b"}})},
           id="1700000100000-0")
    run(r, Settings(), SPACE, log_records(r, SPACE), Options(reapply=True), "replay")
    p = find(r, "user_id", "old")
    assert p.trait_values() == {"plan": "b"} and p.traits["plan"].ts == parse_timestamp("2023-11-14T22:14:10Z")
