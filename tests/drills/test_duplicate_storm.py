"""Drill: one Webhooks (Actions) batch delivered 40 times at once (Segment retrying a batch whose answer it missed,
across two uvicorn workers) is applied exactly once.

What a user relies on: however many copies of a batch arrive and however they interleave, the profiles are the
ones a single delivery gives, and the event log holds each messageId once.
"""

from __future__ import annotations

import threading

import httpx
import orjson

from tests.drills.stack import logged_message_ids, signed_headers
from tests.helpers import mixed_stream, snapshot

COPIES = 40


def actions_batch() -> tuple[bytes, dict[str, str]]:
    """A 50-event Actions batch (every call type, 8 people) and its headers: Actions signs element 0 only."""
    events = mixed_stream(50, users=8, seed=11)
    body = orjson.dumps(events)
    return body, signed_headers(body, signed_part=orjson.dumps(events[0]))


def post(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    with httpx.Client(timeout=60) as client:
        return client.post(url, content=body, headers=headers)


def test_batch_posted_40_times_concurrently_equals_one_application(start_redis, start_web) -> None:
    body, headers = actions_batch()
    message_ids = sorted(e["messageId"] for e in orjson.loads(body))
    assert len(set(message_ids)) == 50

    reference_redis = start_redis(persistent=False)
    reference = start_web(reference_redis.url, concurrency=1)
    once = post(f"{reference.url}/segment", body, headers)
    assert once.status_code == 200, once.text
    assert once.json()["accepted"] + once.json()["duplicate"] == 50 and once.json()["rejected"] == 0

    storm_redis = start_redis(persistent=False)
    storm = start_web(storm_redis.url, concurrency=2)
    gate = threading.Barrier(COPIES)
    answers: list[httpx.Response | BaseException] = [None] * COPIES  # type: ignore[list-item]

    def deliver(i: int) -> None:
        try:
            with httpx.Client(timeout=60) as client:
                gate.wait(30)
                answers[i] = client.post(f"{storm.url}/segment", content=body, headers=headers)
        except BaseException as exc:  # reported by the assertion below
            answers[i] = exc

    threads = [threading.Thread(target=deliver, args=(i,), daemon=True) for i in range(COPIES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [a.status_code if isinstance(a, httpx.Response) else repr(a) for a in answers] == [200] * COPIES
    summaries = [a.json() for a in answers]
    # each event was accepted by exactly one of the copies, and reported a duplicate by the 39 others
    assert sum(s["accepted"] for s in summaries) == once.json()["accepted"]
    assert all(s["accepted"] + s["duplicate"] == 50 and s["rejected"] == 0 for s in summaries), summaries

    a, b = storm_redis.client(), reference_redis.client()
    assert logged_message_ids(a) == dict.fromkeys(message_ids, 1)
    assert logged_message_ids(b) == dict.fromkeys(message_ids, 1)
    storm_state, reference_state = snapshot(a), snapshot(b)
    assert len(storm_state) > 1
    assert storm_state == reference_state
    a.close()
    b.close()
