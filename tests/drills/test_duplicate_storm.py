"""Drill: one Webhooks (Actions) batch delivered 40 times at once (Segment retrying a batch whose answer it missed,
across two uvicorn workers) is applied exactly once.

What a user relies on: however many copies of a batch arrive and however they interleave, the profiles are the
ones a single delivery gives, and the event log holds each messageId once.

Two starting points, with the same assertions: Redis with the apply script already loaded (any Redis that has
served a request), and a cold script cache (the first traffic after a Redis restart or failover), where copies meet
NOSCRIPT part-way through their pipelines while other copies load the script. Each event is ``accepted`` by exactly
one copy and ``duplicate`` in the 39 others; the test at the end reproduces the race on one large batch.
"""

from __future__ import annotations

import threading

import httpx
import orjson

from service.spec.keys import Keys
from service.state.store import SCRIPT
from tests.drills.stack import logged_message_ids, signed_headers
from tests.helpers import mixed_stream, snapshot

COPIES = 40


def actions_batch() -> tuple[bytes, dict[str, str]]:
    """A 50-event Actions batch (every call type, 8 people) and its headers: Actions signs element 0 only."""
    events = mixed_stream(50, users=8, seed=11)
    body = orjson.dumps(events)
    return body, signed_headers(body, signed_part=orjson.dumps(events[0]))


def storm(start_redis, start_web, warm_script_cache: bool) -> tuple[dict, list[dict]]:
    """Post the batch once to a fresh stack and 40 times at once to another; assert the two states are equal.
    Returns the single delivery's answer and the 40 answers."""
    body, headers = actions_batch()
    message_ids = sorted(e["messageId"] for e in orjson.loads(body))
    assert len(set(message_ids)) == 50

    reference_redis = start_redis(persistent=False)
    reference = start_web(reference_redis.url, concurrency=1)
    with httpx.Client(timeout=60) as client:
        once = client.post(f"{reference.url}/segment", content=body, headers=headers)
    assert once.status_code == 200, once.text
    assert once.json()["accepted"] + once.json()["duplicate"] == 50 and once.json()["rejected"] == 0

    storm_redis = start_redis(persistent=False)
    web = start_web(storm_redis.url, concurrency=2)
    admin = storm_redis.client()
    if warm_script_cache:
        admin.script_load(SCRIPT)
    else:
        admin.script_flush()
    gate = threading.Barrier(COPIES)
    answers: list[httpx.Response | BaseException] = [None] * COPIES  # type: ignore[list-item]

    def deliver(i: int) -> None:
        try:
            with httpx.Client(timeout=60) as client:
                gate.wait(30)
                answers[i] = client.post(f"{web.url}/segment", content=body, headers=headers)
        except BaseException as exc:  # reported by the assertion below
            answers[i] = exc

    threads = [threading.Thread(target=deliver, args=(i,), daemon=True) for i in range(COPIES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [a.status_code if isinstance(a, httpx.Response) else repr(a) for a in answers] == [200] * COPIES
    summaries = [a.json() for a in answers]
    assert all(s["accepted"] + s["duplicate"] == 50 and s["rejected"] == 0 for s in summaries), summaries

    ref = reference_redis.client()
    assert logged_message_ids(admin) == dict.fromkeys(message_ids, 1)
    assert logged_message_ids(ref) == dict.fromkeys(message_ids, 1)
    storm_state, reference_state = snapshot(admin), snapshot(ref)
    assert len(storm_state) > 1
    assert storm_state == reference_state
    admin.close()
    ref.close()
    return once.json(), summaries


def test_batch_posted_40_times_concurrently_equals_one_application(start_redis, start_web) -> None:
    once, summaries = storm(start_redis, start_web, warm_script_cache=True)
    # each event was accepted by exactly one of the copies, and reported a duplicate by the 39 others
    assert sum(s["accepted"] for s in summaries) == once["accepted"], (once, summaries)


def test_batch_storm_on_a_cold_script_cache_still_applies_once(start_redis, start_web) -> None:
    once, summaries = storm(start_redis, start_web, warm_script_cache=False)
    assert sum(s["accepted"] for s in summaries) == once["accepted"], (once, summaries)


class Miscounted(AssertionError):
    """An answer's accepted/duplicate counts disagree with what the request applied."""


BIG_BATCH = 2000


def test_a_batch_racing_a_script_load_is_counted_once(start_redis, start_web) -> None:
    """One 2,000-event batch on a cold script cache; the script is loaded from another connection (as another web
    worker would) as soon as the batch's pipeline meets NOSCRIPT. Every event is new: all must be ``accepted``.
    Up to 5 rounds, each with new events (a round can miss the moment when the pipeline is already done)."""
    redis_server = start_redis(persistent=False)
    web = start_web(redis_server.url, concurrency=1)
    admin = redis_server.client()
    for round_ in range(5):
        events = [{"type": "identify", "userId": f"cold-{round_}-{i}", "messageId": f"cold-{round_}-{i}",
                   "timestamp": "2026-03-05T00:00:00Z", "traits": {"pad": "x" * 200}} for i in range(BIG_BATCH)]
        body = orjson.dumps(events)
        headers = signed_headers(body, signed_part=orjson.dumps(events[0]))
        admin.script_flush()
        admin.config_resetstat()
        answer: dict = {}

        def post(body: bytes = body, headers: dict = headers, answer: dict = answer) -> None:
            with httpx.Client(timeout=120) as client:
                answer["response"] = client.post(f"{web.url}/segment", content=body, headers=headers)

        sender = threading.Thread(target=post, daemon=True)
        sender.start()
        while sender.is_alive():
            if admin.info("errorstats").get("errorstat_NOSCRIPT", {}).get("count", 0):
                admin.script_load(SCRIPT)
                break
        sender.join(120)
        response = answer["response"]
        assert response.status_code == 200, response.text
        # the state is right whatever the counts say: each event in the log once
        assert admin.xlen(Keys("default").log) == BIG_BATCH * (round_ + 1)
        summary = response.json()
        if summary["accepted"] != BIG_BATCH:
            raise Miscounted(f"round {round_}: {summary} for {BIG_BATCH} new events")
    admin.close()
