"""Operator routes (``/admin``) and the read APIs over what the workers computed (``/api``), KPI endpoint included."""

from __future__ import annotations

from typing import Any

from service.config import DEFAULT_REPLAY_RATE, SPACE_ID_RULE
from service.http.openapi.components import (
    ANY,
    BOOL,
    INT,
    MS,
    NUM,
    OBJECT,
    STR,
    Schema,
    closed,
    errors,
    json_body,
    nullable,
    ok,
    ref,
)
from service.spec.rates import OUTCOMES

ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]
SPACE = {"$ref": "#/components/parameters/spaceQuery"}
PAGE = [{"$ref": "#/components/parameters/limit"}, {"$ref": "#/components/parameters/before"}]
NULL_STR = nullable(STR)
ENTRY = {"id": {**STR, "description": "Stream entry id, e.g. 1700000000000-0"}}
DEAD_LETTER = {**ENTRY, "reason": STR, "source": {**STR, "description": "webhook, tracking or replay"}, "at": MS,
               "raw": {**STR, "description": "The body or event as received"}}
REFUSAL = {**ENTRY, "at": MS, "space": STR, "route": STR, "status": INT, "reason": STR, "bytes": INT,
           "addr": {**STR, "description": "Peer address"}}


COUNTS = closed({o: INT for o in OUTCOMES})
RATES = closed({o: {**NUM, "description": "Events per second"} for o in OUTCOMES})
RUN = nullable(closed({"at_ms": MS, "seconds": NUM, "profiles": INT, "changed_clusters": INT, "reason": NULL_STR},
                      description="The last run that published its result"))


def _list(item: Schema, **extra: Schema) -> Schema:
    """A page of a stream, newest first, as ``_stream_page`` in service/http/admin.py answers."""
    return closed({**extra, "total": INT, "data": {"type": "array", "items": item}, "has_more": BOOL,
                   "next_before": {**NULL_STR, "description": "Pass as `?before=` for the next page"}})


SCHEMAS: dict[str, Schema] = {
    "Job": closed({
        "id": STR, "function": STR, "args": {"type": "array", "items": ANY}, "status": STR,
        "enqueued_at": NULL_STR, "started_at": NULL_STR, "ended_at": NULL_STR,
        "progress": closed({"done": INT, "total": INT, "stopped": ANY}, required=[]),
        "result": ANY, "error": {**NULL_STR, "description": "The last line of the failure"},
        "cancel": {**STR, "description": "DELETE only: 'done' (a queued job, canceled), 'requested' (a running "
                   "replay stops at its next chunk), or 'nothing to cancel: the job is <status>'"},
    }, required=["id", "function", "args", "status", "enqueued_at", "started_at", "ended_at", "progress", "result",
                 "error"]),
    "ReplayRequest": closed({
        "source": {**STR, "enum": ["log", "dead-letters", "archive"], "default": "log"},
        "since": {**STR, "description": "ISO-8601, or a time ago such as 90m, 2h, 7d"},
        "until": {**STR, "description": "ISO-8601, or a time ago"},
        "profile": {**STR, "description": "TYPE:VALUE: only that profile's events (log only)"},
        "types": {"type": "array", "items": STR, "description": "Call types, e.g. [\"identify\", \"track\"]"},
        "event": {**STR, "description": "Only track calls of this name"},
        "reason": {**STR, "description": "Dead letters whose reason contains this"},
        "id": {**STR, "description": "Only this dead letter (source dead-letters), e.g. 1700000000000-0"},
        "dry_run": BOOL, "rate": {**NUM, "minimum": 0, "maximum": 1e6, "default": DEFAULT_REPLAY_RATE,
                                   "description": "Events/s; 0: no limit"},
        "resume": {**BOOL, "description": "Go on from where an interrupted replay of the same request stopped"},
    }, required=[]),
    "KpiRequest": closed({
        "customers": {"type": "array", "minItems": 1, "items": closed({
            "id": STR, "frequency": {**INT, "minimum": 0}, "amount_spent": {**NUM, "minimum": 0},
            "product_types": {"type": "array", "items": STR}})},
        "labels": {"type": "object", "additionalProperties": {"oneOf": [INT, STR]},
                   "description": "Customer id -> cluster id (an integer or a string)"},
    }),
    "KpiCard": closed({
        "cluster_id": {"oneOf": [INT, STR]}, "n_customers": INT, "avg_spend": NUM, "median_spend": NUM,
        "avg_frequency": NUM, "top_categories": {**STR, "description": "Top 5 by TF-IDF, comma-separated"},
        "share_of_revenue_pct": NUM, "insight": STR}),
    "Cluster": closed({"cluster": STR, "label": STR, "n": INT,
                       "summary": {**OBJECT, "nullable": True, "description": "Averages and top plans/industries"},
                       "kpi": ref("KpiCard")}),
    "SpaceStatus": closed({
        "space": STR,
        "events": closed({"last_minute": COUNTS, "last_minute_per_second": RATES, "last_hour": COUNTS,
                          "last_hour_per_second": RATES}, description="Live intake by outcome (per-minute counters "
                                                                       "shared by every web process)"),
        "replayed_last_hour": {**COUNTS, "description": "What imports and replays applied, apart from live intake"},
        "profiles": {**INT, "description": "Live profiles at the last refresh"}, "profiles_created": INT,
        "dirty_profiles": INT, "dirty_being_refreshed": INT, "recompute_running": BOOL,
        "last_refresh": RUN, "last_full_recompute": RUN, "refresh_failures_in_a_row": INT, "clusters": INT,
        "personas": {"type": "object", "description": "Cluster -> its persona's sync", "additionalProperties": closed(
            {"state": NULL_STR, "error": NULL_STR, "last_sync_ms": nullable(MS), "mavera_id": NULL_STR,
             "note": NULL_STR})},
        "narrative": nullable(closed({"state": STR, "error": NULL_STR})),
        "dead_letters": INT, "dead_letter_bytes": INT, "suppressed_user_ids": INT,
        "event_log": closed({"entries": INT, "oldest_ms": nullable(MS)})}),
    "Status": closed({
        "at_ms": MS, "spaces": {"type": "array", "items": ref("SpaceStatus")},
        "queue": nullable(closed({
            "queued": INT, "running": INT, "scheduled": INT, "deferred": INT, "failed": INT,
            "workers": {**INT, "description": "Live RQ workers"},
            "unreachable": {**STR, "description": "Instead of the counts: why the queue Redis could not be read"}},
            required=[], description="The RQ queue; null when this process has no queue configured")),
        "mavera": closed({"paused": BOOL, "reason": NULL_STR, "since_ms": nullable(MS),
                          "blocked_until_ms": {**nullable(MS), "description": "Mavera asked (Retry-After) that no "
                                               "worker call it before then; null: no such wait"}}),
        "refusals": closed({"logged": INT, "last_hour": INT,
                            "last_hour_by_status": {"type": "object", "additionalProperties": INT}},
                           description="Requests refused before authentication (GET /admin/refusals)"),
        "redis": closed({"used_bytes": INT, "max_bytes": nullable(INT), "policy": NULL_STR,
                         "used_pct": nullable(NUM),
                         "replication": closed({
                             "role": {**STR, "enum": ["primary", "replica"],
                                      "description": "What REDIS_URL reaches: a replica refuses every write"},
                             "replicas": {**INT, "description": "Replicas connected to the STATE primary"},
                             "online": {**INT, "description": "Of those, in sync (state online)"},
                             "lag_s": {**nullable(INT), "description": "Seconds since the furthest behind online "
                                                                       "replica last acknowledged"},
                             "behind_bytes": {**nullable(INT), "description": "Bytes of replication stream the "
                                                                              "furthest behind one lacks"}},
                             description="INFO replication; on a Cluster, the primary with the fewest online")},
                        description="STATE's memory (INFO memory) and replication"),
        "problems": {"type": "array", "items": closed({
            "space": NULL_STR, "problem": STR, "next": {**STR, "description": "What to run next"}})}}),
}


def _op(op_id: str, summary: str, responses: dict[str, Any], *statuses: int, tag: str = "Admin",
        parameters: list[Any] | None = None, body: Schema | None = None, body_required: bool = True,
        security: list[dict[str, list[str]]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"tags": [tag], "operationId": op_id, "summary": summary,
                          "security": security or ADMIN, "responses": {**responses, **errors(401, *statuses)}}
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": json_body(body)}
    return op


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": STR, "description": description}


JOB_ID = _path_param("job_id", "Letters, digits and '-', as POST /admin/replay answered")
ENTRY_ID = _path_param("entry_id", "A dead letter's id, e.g. 1700000000000-0")
FORGOTTEN = closed({"space": STR, "id": STR, "erased_profile": NULL_STR, "suppressed_user_id": NULL_STR,
                    "events_purge": {**STR, "enum": ["queued", "done"]}})
QUEUED = closed({"job": STR, "status": {**STR, "enum": ["queued"]}, "space": STR, "request": OBJECT,
                 "follow": {**STR, "description": "Where to follow the job: /admin/jobs/{job}"}})


def paths() -> dict[str, Any]:
    job = ok("The job", ref("Job"))
    letter = ok("The dead letter, its body whole", closed({**DEAD_LETTER, "space": STR}))
    return {
        "/admin/forget": {"post": _op(
            "forget", "Erase the profile an identifier resolves to, as a Segment delete does, and suppress its userId",
            {"200": ok("Erased", FORGOTTEN)}, 400, 404, 413, 503, parameters=[SPACE],
            body=closed({"id": {**STR, "description": "TYPE:VALUE (e.g. email:ada@example.com); a bare value is a "
                                                      "userId"}}))},
        "/admin/suppressions": {"get": _op(
            "suppressions", "UserIds whose events are dropped, and until when (0: for ever), with the other "
            "identifiers erased with each profile (user_id null: a profile without one)",
            {"200": ok("Suppressed userIds", closed({"space": STR, "total": INT, "data": {"type": "array", "items":
                closed({"user_id": nullable(STR), "until_ms": MS, "identifiers": {
                    "type": "array", "items": {**STR, "description": "TYPE:VALUE"},
                    "description": "Dropped from the events at or before until_ms"}})}}))}, 400, 503,
            parameters=[SPACE])},
        "/admin/suppressions/{user_id}": {"delete": _op(
            "liftSuppression", "Apply a userId's events again from now on (and those of the identifiers erased with "
            "it)", {"200": ok("Lifted", closed(
                {"space": STR, "lifted": STR}))}, 400, 404, 503,
            parameters=[_path_param("user_id", "The suppressed userId"), SPACE])},
        "/admin/replay": {"post": _op(
            "replay", "Queue a replay of the event log, the dead letters or the archive as a job",
            {"202": ok("Queued", QUEUED)}, 400, 404, 413, 503, parameters=[SPACE], body=ref("ReplayRequest"),
            body_required=False)},
        "/admin/jobs/{job_id}": {
            "get": _op("job", "A job's state, progress and result", {"200": job}, 400, 404, 503, parameters=[JOB_ID]),
            "delete": _op("cancelJob", "Cancel a job (a running replay stops at its next chunk and can be resumed)",
                          {"200": job}, 400, 404, 503, parameters=[JOB_ID]),
        },
        "/admin/dead-letters/{entry_id}": {
            "get": _op("deadLetter", "One dead letter", {"200": letter}, 400, 404, 503, parameters=[ENTRY_ID, SPACE]),
            "delete": _op("dropDeadLetter", "Drop a dead letter (it is never applied)",
                          {"200": ok("Dropped", closed({"deleted": STR, "bytes_freed": INT}))}, 400, 404, 503,
                          parameters=[ENTRY_ID, SPACE]),
        },
        "/admin/dead-letters": {"get": _op(
            "deadLetters", "What passed authentication but could not be applied, newest first (replayable)",
            {"200": ok("A page", _list(closed(DEAD_LETTER), space=STR))}, 400, 503, parameters=[SPACE, *PAGE])},
        "/admin/refusals": {"get": _op(
            "refusals", "Requests refused before authentication, every space, newest first: metadata only",
            {"200": ok("A page", _list(closed(REFUSAL)))}, 400, 503, parameters=PAGE)},
        "/admin/status": {"get": _op(
            "status", "Every space's intake rates, profiles, refreshes, personas, dead letters and log; the queue, "
            "Mavera, Redis; each problem with what to run next", {"200": ok("Status", ref("Status"))}, 400, 404, 503,
            parameters=[{"name": "space", "in": "query", "required": False, "schema": STR,
                         "description": "Only this space (default: every space); 404 when it holds no data"}])},
        "/api/clusters": {"get": _op(
            "clusters", "Cluster summaries and KPI cards, as the last refresh computed them",
            {"200": ok("Clusters", closed({"space": STR, "clusters": {"type": "array", "items": ref("Cluster")}}))},
            400, 503, tag="Read API", parameters=[SPACE])},
        "/api/personas": {"get": _op(
            "personas", "Each cluster's Mavera persona and its sync state",
            {"200": ok("Personas", closed({"space": STR, "paused": {**ANY, "description": "Why Mavera sync is paused"},
                                           "personas": {"type": "array", "items": closed({
                                               "cluster": STR, "mavera_id": NULL_STR, "name": NULL_STR,
                                               "last_sync_ms": nullable(INT), "state": NULL_STR,
                                               "error": NULL_STR})}}))},
            400, 503, tag="Read API", parameters=[SPACE])},
        "/api/patterns": {"get": _op(
            "patterns", "Channel patterns and the Mave narrative about them",
            {"200": ok("Patterns", closed({"space": STR, "patterns": {"type": "object",
                                                                       "additionalProperties": OBJECT},
                                           "narrative": {**OBJECT, "nullable": True}}))},
            400, 503, tag="Read API", parameters=[SPACE])},
        "/api/v1/segment_cluster_profiles": {"post": _op(
            "clusterKpis", "KPI cards for customers and cluster labels you bring",
            {"200": ok("One card per non-empty cluster, by cluster id", closed({
                "cluster_profiles": {"type": "array", "items": ref("KpiCard")}}))}, 400, 413,
            tag="Read API", body=ref("KpiRequest"), security=[{"adminToken": []}, {"kpiApiId": [], "kpiSecret": []}])},
    }


PARAMETERS = {
    "spaceQuery": {"name": "space", "in": "query", "required": False, "schema": STR,
                   "description": f"The space (default SPACE_ID): {SPACE_ID_RULE}"},
    "limit": {"name": "limit", "in": "query", "required": False,
              "schema": {**INT, "minimum": 1, "maximum": 1000, "default": 50}},
    "before": {"name": "before", "in": "query", "required": False, "schema": STR,
               "description": "The previous page's next_before"},
}
