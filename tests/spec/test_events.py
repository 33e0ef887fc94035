"""Segment Spec normalisation (pure)."""

from __future__ import annotations

import hashlib

import pytest

from service.spec.events import InvalidEvent, dedupe_digest, legacy_dedupe_field, normalise, parse_timestamp
from service.spec.identity import IdentityRules
from tests.conftest import fixture_json

RULES = IdentityRules()
NOW = 1_773_800_000_000


def test_identify_fixture() -> None:
    e = normalise(fixture_json("identify.json"), NOW, RULES)
    assert e.type == "identify" and e.user_id == "usr_001"
    assert e.identifiers == (("user_id", "usr_001"), ("email", "j.doe@example.com"),
                             ("anonymous_id", "507f191e810c19729de860ea"))
    assert dict((n, v) for n, v, _ in e.traits)["plan"] == '"pro"'
    assert e.activity is not None and e.activity[0] == "web"
    assert e.ts == parse_timestamp("2026-03-15T10:00:00.000Z")


def test_screen_device_ids_by_platform() -> None:
    e = normalise(fixture_json("screen.json"), NOW, RULES)
    kinds = {k for k, _ in e.identifiers}
    assert kinds == {"user_id", "ios.id", "ios.idfa", "ios.push_token"}
    assert e.activity[0] == "mobile"


@pytest.mark.parametrize("device_type, os_name", [("watchos", "watchOS"), ("tvos", "tvOS"), (None, "iOS"),
                                                  ("ipad", "iPadOS")])
def test_device_ids_only_from_an_ios_or_android_device_type(device_type: str | None, os_name: str) -> None:
    """Segment's identifier table: ios.id is context.device.id when context.device.type is 'ios' (android
    alike); a watch, a TV or an event that only names its OS brings no device identifier (still a mobile event)."""
    raw = fixture_json("screen.json")
    raw["context"]["device"]["type"] = device_type
    raw["context"]["os"] = {"name": os_name}
    e = normalise(raw, NOW, RULES)
    assert {k for k, _ in e.identifiers} == {"user_id"} and e.activity[0] == "mobile"
    raw["context"]["device"]["type"] = "Android"
    assert {k for k, _ in normalise(raw, NOW, RULES).identifiers} == {"user_id", "android.id", "android.idfa",
                                                                      "android.push_token"}


def test_a_configured_custom_identifier_is_read_from_properties_and_context_traits_too() -> None:
    """Segment promotes a configured custom externalID (a phone number) from ``context.externalIds``, the
    ``properties`` object or ``context.traits``; unconfigured names stay properties."""
    rules = IdentityRules(priority=("user_id", "email", "phone"), limits={"user_id": 1, "crm_id": 2, "*": 5})
    base = {"type": "track", "event": "Subscription Upgraded", "userId": "u1", "messageId": "m"}
    for extra in ({"properties": {"plan": "Pro", "phone": " 123-456-7890 "}},
                  {"context": {"traits": {"phone": "123-456-7890"}}},
                  {"context": {"externalIds": [{"id": "123-456-7890", "type": "phone", "collection": "users"}]}}):
        e = normalise({**base, **extra}, NOW, rules)
        assert e.identifiers == (("user_id", "u1"), ("phone", "123-456-7890")), extra
    ident = normalise({"type": "identify", "userId": "u1", "messageId": "i", "traits": {"crm_id": 42}}, NOW, rules)
    assert ("crm_id", "42") in ident.identifiers
    # Segment reads a custom identifier's key in camelCase and in snake_case alike
    for holder in ("properties", "context.traits", "traits"):
        event = {"type": "identify", "userId": "u1", "messageId": "c"}
        if holder == "context.traits":
            event["context"] = {"traits": {"crmId": "C-7"}}
        else:
            event[holder] = {"crmId": "C-7"}
        assert ("crm_id", "C-7") in normalise(event, NOW, rules).identifiers, holder
    camel = IdentityRules(limits={"user_id": 1, "appId": 2, "*": 5})
    assert ("appId", "A-1") in normalise({**base, "properties": {"app_id": "A-1"}}, NOW, camel).identifiers
    unconfigured = normalise({**base, "properties": {"phone": "123"}}, NOW, RULES)
    assert unconfigured.identifiers == (("user_id", "u1"),)
    group = normalise({"type": "group", "userId": "u1", "groupId": "g", "messageId": "g", "traits": {"phone": "1"}},
                      NOW, rules)
    assert group.identifiers == (("user_id", "u1"),)  # an account's traits are not the person's


def test_an_event_with_too_many_identifiers_is_refused() -> None:
    """Matching costs Redis time per identifier (and more past the profile's limits): an event naming hundreds of
    external ids is refused, not applied."""
    from service.spec.events import MAX_EVENT_IDENTIFIERS

    ext = [{"id": f"d{i}", "type": "device_id", "collection": "users"} for i in range(MAX_EVENT_IDENTIFIERS)]
    raw = {"type": "track", "event": "E", "userId": "u1", "messageId": "m", "context": {"externalIds": ext}}
    with pytest.raises(InvalidEvent, match=f"{MAX_EVENT_IDENTIFIERS + 1} identifiers in one event"):
        normalise(raw, NOW, RULES)
    raw["context"]["externalIds"] = ext[1:]
    assert len(normalise(raw, NOW, RULES).identifiers) == MAX_EVENT_IDENTIFIERS


def test_a_numeric_id_too_large_to_be_exact_is_refused() -> None:
    """Past 2^53 a JSON number is no longer one id: 123...890 and 123...891 read as the same float."""
    import orjson

    raw = orjson.loads(b'{"type": "track", "event": "E", "messageId": "m", "userId": 123456789012345678901234567890}')
    with pytest.raises(InvalidEvent, match="send ids as strings"):
        normalise(raw, NOW, RULES)
    exact = normalise({"type": "track", "event": "E", "messageId": "m", "userId": 2 ** 53 - 1}, NOW, RULES)
    assert exact.user_id == str(2 ** 53 - 1)
    # an order id that large blurs only that order: the event still applies
    order = normalise({"type": "track", "event": "Order Completed", "messageId": "o", "userId": "u1",
                       "properties": {"order_id": 2e19, "revenue": 5}}, NOW, RULES)
    assert order.order is not None


def test_an_external_id_type_with_a_colon_or_a_person_id_too_large_is_refused() -> None:
    """A profile keeps an identifier as 'type:value': 'email:work' would read as an email. And a user_id in
    externalIds past 2^53 would merge two people, as a top-level userId would."""
    base = {"type": "track", "event": "E", "messageId": "m", "anonymousId": "a1"}
    with pytest.raises(InvalidEvent, match="contains ':'"):
        normalise({**base, "context": {"externalIds": [{"id": "x", "type": "email:work"}]}}, NOW, RULES)
    with pytest.raises(InvalidEvent, match="send ids as strings"):
        normalise({**base, "context": {"externalIds": [{"id": 1.2345678901234568e23, "type": "user_id"}]}}, NOW,
                  RULES)
    kept = normalise({**base, "context": {"externalIds": [{"id": 1e20, "type": "crm_id"}]}}, NOW, RULES)
    assert ("crm_id", "100000000000000000000") in kept.identifiers  # not a person's own id: kept


def test_ad_id_needs_tracking_consent() -> None:
    raw = fixture_json("screen.json")
    raw["context"]["device"]["adTrackingEnabled"] = False
    assert "ios.idfa" not in {k for k, _ in normalise(raw, NOW, RULES).identifiers}


def test_google_analytics_client_id_from_either_integrations() -> None:
    """analytics.js puts it in the call's own ``integrations``; Segment's identifier table names
    ``context.integrations``: both are read."""
    top = {"type": "page", "anonymousId": "a1", "integrations": {"Google Analytics": {"clientId": " 123.456 "}}}
    ga = {"Google Analytics": {"clientId": "789"}}
    nested = {"type": "page", "anonymousId": "a1", "context": {"integrations": ga}}
    assert ("ga_client_id", "123.456") in normalise(top, NOW, RULES).identifiers
    assert ("ga_client_id", "789") in normalise(nested, NOW, RULES).identifiers


def test_order_revenue_then_total_and_categories() -> None:
    e = normalise(fixture_json("track_order_completed.json"), NOW, RULES)
    assert e.order == ("50314b8e9bcf000000000000", 25.0, ("board-games", "toys"))
    raw = fixture_json("track_order_completed.json")
    del raw["properties"]["revenue"]
    assert normalise(raw, NOW, RULES).order[1] == 27.5


def test_email_engagement_is_email_channel() -> None:
    assert normalise(fixture_json("track_email_opened.json"), NOW, RULES).activity[0] == "email"


def test_engage_audience_and_computed_trait_classes() -> None:
    entered = normalise(fixture_json("audience_entered.json"), NOW, RULES)
    assert ("high_value_users", "true", "audience") in entered.traits
    exited = normalise(fixture_json("audience_exited.json"), NOW, RULES)
    assert ("high_value_users", "false", "audience") in exited.traits
    computed = normalise(fixture_json("trait_computed_track.json"), NOW, RULES)
    assert ("mobile_sessions_30d", "22", "computed_trait") in computed.traits
    ident = normalise(fixture_json("audience_identify.json"), NOW, RULES)
    assert ("high_value_users", "true", "audience") in ident.traits and ("email", '"s.chen@example.com"', "") \
        in ident.traits


def test_external_ids_lowercase_types() -> None:
    e = normalise(fixture_json("external_ids_identify.json"), NOW, RULES)
    assert ("phone", "+1-555-0100") in e.identifiers and ("crm_id", "crm-77812") in e.identifiers


@pytest.mark.parametrize("raw, reason", [
    ({"type": "track", "event": "x"}, "neither userId nor anonymousId"),
    ({"type": "track", "userId": "u", "messageId": "x" * 101}, "at most 100"),
    ({"type": "boom", "userId": "u"}, "unknown type"),
    ({"type": "track", "userId": "u", "timestamp": "31/12/2025"}, "ISO-8601"),
    # before year 1 in UTC, which no reader could format; and before the epoch, which no clock means
    ({"type": "track", "userId": "u", "timestamp": "0001-01-01T00:00:00+14:00"}, "before 1970"),
    ({"type": "track", "userId": "u", "timestamp": "1969-12-31T23:59:59.999Z"}, "before 1970"),
    ({"type": "track", "userId": "u", "receivedAt": "0001-01-01T00:00:00Z"}, "before 1970"),
    ({"type": "delete"}, "delete needs a userId"),
    ({"type": "delete", "userId": "null"}, "identifies nobody"),
    ({"type": "delete", "userId": "  "}, "delete needs a userId"),
    ({"type": "identify", "userId": "anonymous"}, "no usable identifier"),
    ({"type": "identify", "userId": "u", "traits": {str(i): i for i in range(300)}}, "300"),
    ([], "not a JSON object"),
])
def test_invalid_events_say_why(raw, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        normalise(raw, NOW, RULES)


def test_version_type_is_not_validated_and_numbers_are_ids() -> None:
    for v in (1, 2, "1.1"):
        assert normalise({"type": "track", "userId": 42, "version": v, "messageId": "m"}, NOW, RULES).user_id == "42"


def test_events_without_a_message_id_are_never_deduplicated_by_content() -> None:
    """Segment deduplicates on messageId, not on the contents: two identical events without one are two events."""
    raw = {"type": "track", "userId": "u", "event": "x", "timestamp": "2026-01-01T00:00:00Z"}
    first, second = normalise(raw, NOW, RULES).message_id, normalise(dict(raw), NOW, RULES).message_id
    assert first != second and first.startswith("gen-") and second.startswith("gen-")


def test_missing_timestamp_falls_back_to_received() -> None:
    assert normalise({"type": "track", "userId": "u", "messageId": "m"}, NOW, RULES).ts == NOW


def test_dedupe_digest_is_stable_and_compact() -> None:
    shard, dedupe_id = dedupe_digest("ajs-1")
    assert (shard, dedupe_id) == dedupe_digest("ajs-1") and -2**63 <= dedupe_id < 2**63 and 0 <= shard < 65536
    assert dedupe_digest("ajs-2") != (shard, dedupe_id)
    # the older version's 8-byte field is the same 64 bits
    digest = hashlib.blake2b(b"ajs-1", digest_size=10).digest()
    assert legacy_dedupe_field(dedupe_id) == digest[2:] and shard == int.from_bytes(digest[:2], "big")


def test_identity_rules_priority_and_blocking() -> None:
    rules = IdentityRules(priority=("email", "user_id"))
    assert rules.prepare([("user_id", "u"), ("crm", "c"), ("email", " A@B.C "), ("anonymous_id", "null"),
                          ("anonymous_id", "-1"), ("ios.id", "0000-0000")]) == (
        ("email", "a@b.c"), ("user_id", "u"), ("crm", "c"))
    assert IdentityRules(limits={"user_id": 1, "*": 5, "email": 2}).limit("email") == 2


def test_non_string_event_names_are_ignored_not_fatal() -> None:
    for name in ([], {"a": 1}, 3):
        e = normalise({"type": "track", "userId": "u", "event": name, "messageId": "m"}, NOW, RULES)
        assert e.order is None and e.activity is None


def test_script_payload_is_plain_for_page_views_and_traits_and_json_otherwise() -> None:
    """The common call goes to the script as tab-separated text (no JSON for Redis to decode), traits and orders
    included; any value with one of the plain form's separators in it goes as JSON, which the script reads whatever
    its characters."""
    page = normalise({"type": "page", "userId": "u1", "anonymousId": "a1", "messageId": "m1",
                      "timestamp": "2026-03-15T10:00:00Z", "context": {"library": {"name": "analytics.js"}}},
                     NOW, RULES)
    assert page.script_payload().split(b"\t") == [
        b"page", str(page.ts).encode(), b"m1", b"u1", f"a:web:{page.activity[1]}".encode(),
        str(page.activity[2]).encode(), b"user_id:u1", b"anonymous_id:a1"]
    ident = normalise({"type": "identify", "userId": "u1", "messageId": "m3", "timestamp": "2026-03-15T10:00:00Z",
                       "traits": {"plan": "pro", "ltv": 1200}}, NOW, RULES)
    _, traits, head = ident.script_payload().split(b"\x1e")
    assert head.split(b"\t") == [b"identify", str(ident.ts).encode(), b"m3", b"u1", b"", b"", b"user_id:u1"]
    late = NOW - ident.ts  # received that much later: the traits' stamp says so
    assert traits.split(b"\x1f") == [str(NOW).encode(), f"{ident.ts}+{late}".encode(),
                                      b"ltv", b"1200", b"", b"plan", b'"pro"', b""]
    order = normalise(fixture_json("track_order_completed.json"), NOW, RULES)
    section, head = order.script_payload()[1:].split(b"\x1d")
    assert section.split(b"\x1f") == [b"o", order.order[0].encode(), b"25.0", b"board-games", b"toys"]
    assert head.split(b"\t")[:4] == [b"track", str(order.ts).encode(), b"ajs-6f0a1c2e-order-0002", b"usr_001"]
    refund = normalise({"type": "track", "event": "Order Refunded", "userId": "u1", "messageId": "m5",
                        "properties": {"order_id": "o-9"}}, NOW, RULES)
    assert refund.script_payload().startswith(b"\x1dr\x1fo-9\x1dtrack\t")
    for props in ({"order_id": "o\x1f1", "revenue": 5}, {"order_id": "o1", "products": [{"category": "a\x1db"}]}):
        odd_order = normalise({"type": "track", "event": "Order Completed", "userId": "u1", "messageId": "m6",
                               "properties": props}, NOW, RULES)
        assert odd_order.order and odd_order.script_payload().startswith(b"{")
    odd = normalise({"type": "identify", "userId": "u1", "messageId": "m4", "traits": {"a\x1fb": 1}}, NOW, RULES)
    assert odd.script_payload().startswith(b"{")
    tabbed = normalise({"type": "track", "event": "x", "userId": "u\t1", "messageId": "m2"}, NOW, RULES)
    assert tabbed.script_payload().startswith(b"{")


def test_iso_ms_is_exact_for_any_millisecond_and_any_order_of_calls() -> None:
    """Receipt stamps and Profile API times: the second's text is reused between calls, so a run of calls that go
    back and forth across seconds (and before 1970) must each still give their own exact time."""
    import random
    from datetime import UTC, datetime, timedelta

    from service.spec.events import iso_ms

    def exact(ms: int) -> str:
        return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")

    rng = random.Random(5)
    values = [0, 999, 1000, -1, -1000, -1001, 1_795_509_628_412, 1_795_509_628_999, 1_795_509_629_000]
    values += [rng.randint(-10**12, 10**13) for _ in range(2000)]
    assert [iso_ms(ms) for ms in values + values[::-1]] == [exact(ms) for ms in values + values[::-1]]
    assert iso_ms(1_795_509_628_412) == "2026-11-24T08:40:28.412Z"


def test_a_timestamp_is_read_to_the_exact_millisecond() -> None:
    """``timestamp() * 1000`` in floating point put one time in ~170 a millisecond early: two events a millisecond
    apart could tie, and a tie is broken by messageId rather than by time."""
    assert parse_timestamp("1987-01-16T06:48:02.045Z") == 537_778_082_045
    assert parse_timestamp("1970-01-01T00:00:01.001Z") == 1_001
    assert parse_timestamp("2026-03-01T12:00:00.123999+02:00") == 1_772_359_200_123  # microseconds are dropped
    with pytest.raises(InvalidEvent, match="before 1970"):
        parse_timestamp("0001-01-01T00:00:00+05:00")
