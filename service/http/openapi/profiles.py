"""The Profile API, one path per collection and part, with the parameters and shapes of Segment's own
(https://segment.com/docs/unify/profile-api/).

``COLLECTIONS`` says which parts each collection answers: a collection, or a part of one, is documented by adding
its name here (with, for a new collection, how its profiles are named in ``IDENTS``; for a new part, its entry in
``PARTS``). The tests compare it with the parts the Profile API serves.
"""

from __future__ import annotations

from typing import Any

from service.http.openapi.components import (
    ANY,
    INT,
    OBJECT,
    STR,
    TIME,
    Schema,
    closed,
    errors,
    nullable,
    ok,
    ref,
)

COLLECTIONS: dict[str, tuple[str, ...]] = {
    "users": ("traits", "external_ids", "metadata", "links", "events"),
    "accounts": ("traits", "links"),
}
# collection -> (how its profiles are named, an example)
IDENTS = {
    "users": ("`<type>:<value>` (user_id, email, anonymous_id or any identifier type), URL-encoded (a `/` in a value "
              "as `%2F`) and matched as the receiver normalised it (emails case-insensitively); or "
              "`segment_id:<profile id>`, or the bare profile id (`use_…`) as in Segment's cursor URLs",
              "user_id:u1"),
    "accounts": ("`group_id:<groupId>`, URL-encoded", "group_id:acc-1"),
}
BASE = "/v1/spaces/{space}/collections/%s/profiles/{ident}/%s"

NULL_STR, NULL_TIME = nullable(STR), nullable(TIME)


def _query(name: str, description: str, schema: Schema) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _limit(default: int, maximum: int) -> dict[str, Any]:
    return _query("limit", f"Page size, 1 to {maximum}", {**INT, "minimum": 1, "maximum": maximum,
                                                          "default": default})


NEXT = _query("next", "The cursor's `next` from the previous page", STR)
EXTERNAL_ID = closed({"id": STR, "type": STR, "source_id": NULL_STR, "collection": STR, "created_at": NULL_TIME,
                      "encoding": STR, "first_message_id": NULL_STR},
                     required=["id", "type", "source_id", "collection", "created_at", "encoding"])

SCHEMAS: dict[str, Schema] = {
    "ExternalId": EXTERNAL_ID,
    "VerboseTrait": closed({"value": ANY, "source_id": NULL_STR, "updated_at": NULL_TIME}),
    "Traits": closed({"traits": {"type": "object", "additionalProperties": {
        "nullable": True, "description": "The value, or with `verbose` a VerboseTrait object"}},
        "cursor": ref("Cursor")}),
    "ExternalIds": closed({"data": {"type": "array", "items": ref("ExternalId")}, "cursor": ref("Cursor")}),
    "Metadata": closed({"metadata": closed({
        "segment_id": STR, "created_at": NULL_TIME, "updated_at": NULL_TIME, "expires_at": NULL_TIME,
        "first_message_id": NULL_STR, "first_message_at": NULL_TIME, "last_message_id": NULL_STR,
        "last_message_at": NULL_TIME, "merged_from": {"type": "array", "items": STR,
                                                      "description": "Profiles merged into this one"}})}),
    "Link": closed({"to_collection": {**STR, "enum": list(COLLECTIONS)},
                    "external_ids": {"type": "array", "items": ref("ExternalId")}}),
    "Links": closed({"data": {"type": "array", "items": ref("Link")}, "cursor": ref("Cursor")}),
    "ProfileEvent": closed({
        "external_ids": {"type": "array", "items": closed({"collection": STR, "type": STR, "id": STR,
                                                           "encoding": STR})},
        "context": OBJECT, "type": STR, "message_id": NULL_STR, "source_id": NULL_STR,
        "timestamp": {**NULL_STR, "description": "As sent (ISO-8601)"},
        "event": {**NULL_STR, "description": "track"}, "name": {**NULL_STR, "description": "page and screen"},
        "properties": {**OBJECT, "description": "track, page and screen"},
        "traits": {**OBJECT, "description": "identify and group"}, "group_id": {**NULL_STR, "description": "group"},
        "previous_id": {**NULL_STR, "description": "alias"},
        "related": closed({"users": {**STR, "description": "The profile the event is served for"}}),
    }, required=["external_ids", "context", "type", "message_id", "source_id", "timestamp", "related"],
        description="One event from the log, in the shape of Segment's /events items."),
    "Events": closed({"data": {"type": "array", "items": ref("ProfileEvent")}, "cursor": ref("Cursor")}),
}

# part -> (summary, query parameters, response schema)
PARTS: dict[str, tuple[str, list[dict[str, Any]], str]] = {
    "traits": ("The profile's traits (audience membership shows as boolean traits)", [
        _query("include", "Comma-separated trait names to return", STR),
        _query("class", "Only audiences or computed traits", {**STR, "enum": ["audience", "computed_trait"]}),
        _limit(10, 200), NEXT,
        _query("verbose", "Each value as {value, source_id, updated_at}", {"type": "boolean", "default": False}),
    ], "Traits"),
    "external_ids": ("The profile's identifiers", [
        _query("include", "Comma-separated identifier types, e.g. user_id,email", STR), _limit(25, 100), NEXT,
    ], "ExternalIds"),
    "metadata": ("When the profile was created and last seen, and what was merged into it", [], "Metadata"),
    "links": ("The profiles of the other collection this one is linked to (a user's accounts through group "
              "calls, an account's users)", [_limit(20, 100), NEXT], "Links"),
    "events": ("The profile's events from the log, including those of profiles merged into it", [
        _query("start", "ISO-8601 date or time of the oldest event (default: 14 days before `end`)", STR),
        _query("end", "ISO-8601 date or time of the newest event (default: now)", STR),
        _query("include", "Comma-separated event names and call types (default: track events only; a call "
                          "type such as page or identify adds that type)", STR),
        _query("exclude", "Comma-separated event names and call types to leave out", STR),
        _query("sort", "By timestamp", {**STR, "enum": ["asc", "desc"], "default": "desc"}),
        _limit(10, 100), NEXT,
    ], "Events"),
}

def _operation(collection: str, part: str) -> dict[str, Any]:
    summary, query, schema = PARTS[part]
    description, example = IDENTS[collection]
    ident = {"name": "ident", "in": "path", "required": True, "schema": STR, "example": example,
             "description": description}
    return {"tags": ["Profile API"], "operationId": f"{collection}_{part}", "summary": summary,
            "security": [{"profileToken": []}],
            "parameters": [{"$ref": "#/components/parameters/spacePath"}, ident, *query],
            "responses": {"200": ok(summary, ref(schema)), **errors(400, 401, 404, 429, 503)}}


def paths() -> dict[str, Any]:
    return {BASE % (collection, part): {"get": _operation(collection, part)}
            for collection, parts in COLLECTIONS.items() for part in parts}
