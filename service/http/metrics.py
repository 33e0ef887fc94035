"""Prometheus metrics of the receiver.

With several uvicorn workers, ``persona-sync web`` sets ``PROMETHEUS_MULTIPROC_DIR`` and every worker writes its
samples there (prometheus-client's multiprocess mode), so one scrape of /metrics sums all of them.
"""

from __future__ import annotations

import functools
import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS = Counter(
    "segment_events", "Events received, by type and outcome (ok, duplicate, rejected, suppressed, deleted)",
    ["type", "outcome"], registry=REGISTRY,
)
REQUESTS = Histogram(
    "http_request_duration_seconds", "Request latency by route and status", ["route", "status"], registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.002, 0.004, 0.007, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
REDIS_ERRORS = Counter("redis_errors", "Redis calls that failed (the request got a 503)", registry=REGISTRY)
REFUSED = Counter("requests_refused", "Whole requests refused, by status", ["status"], registry=REGISTRY)
CONTENT_TYPE = CONTENT_TYPE_LATEST


# A labelled child is looked up once per label values and kept: ``labels()`` costs more than the increment it
# serves (~2.5 µs a call in multiprocess mode). The values are bounded: event types (anything else counts as
# "unknown"), outcomes, route templates and status codes.
@functools.cache
def _events(kind: str, outcome: str) -> Counter:
    return EVENTS.labels(kind, outcome)


@functools.cache
def _requests(route: str, status: int) -> Histogram:
    return REQUESTS.labels(route, str(status))


def count_events(counts: dict[tuple[str, str], int]) -> None:
    for (kind, outcome), n in counts.items():
        _events(kind, outcome).inc(n)


def observe_request(route: str, status: int, seconds: float) -> None:
    _requests(route, status).observe(seconds)


def render() -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)
