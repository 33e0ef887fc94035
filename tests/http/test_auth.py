"""Signatures and credentials (pure)."""

from __future__ import annotations

import base64

import orjson
from hypothesis import given
from hypothesis import strategies as st

from service.http.auth import (
    SIGNED_ELEMENT_MAX,
    basic_username,
    bearer_token,
    signature_ok,
    signed_part,
    token_ok,
    write_key_space,
)
from tests.conftest import SECRET, fixture_bytes, fixture_json


def test_fixture_signatures_verify_on_raw_bytes() -> None:
    for name, sig in fixture_json("signatures.json")["x_signature"].items():
        assert signature_ok(fixture_bytes(name), sig, [SECRET]), name
        assert signature_ok(fixture_bytes(name), sig.upper(), ["rotated-out", SECRET]), name
        assert not signature_ok(fixture_bytes(name), sig, ["other"]), name


def test_signed_part_of_array_is_first_element_text() -> None:
    body = b'[ {"a": "\\u00e9", "b":[1,2]} , {"c":3}]'
    assert signed_part(body) == b'{"a": "\\u00e9", "b":[1,2]}'
    assert signed_part(b'{"x":1}') == b'{"x":1}'


def test_garbage_never_verifies() -> None:
    assert not signature_ok(b"[", "00", [SECRET])
    assert not signature_ok(b"\xff\xfe[", "00", [SECRET])
    assert not signature_ok(b"{}", None, [SECRET])


def test_credentials() -> None:
    header = "Basic " + base64.b64encode(b"wk:").decode()
    assert basic_username(header) == "wk" and basic_username("Basic ***") is None
    assert bearer_token("Bearer abc") == "abc" and bearer_token("Basic abc") is None
    assert token_ok("t", "t") and not token_ok("t", "") and not token_ok(None, "t")
    assert write_key_space([None, "k2"], {"k1": "a", "k2": "b"}) == "b"
    assert write_key_space(["zz"], {"k1": "a"}) is None


def test_signed_part_of_deep_or_broken_bodies_is_linear_and_never_recursive() -> None:
    deep = b"[" * 5000 + b"]" * 5000
    assert signed_part(b"[" + deep + b", 1]") == deep  # a recursive decoder raised RecursionError (a 500)
    assert not signature_ok(b"[" * 100_000, "00", [SECRET])
    assert not signature_ok(b'[{"a": "unterminated \\"}]', "00", [SECRET])
    assert signed_part(b'[ "a]b\\"c" ,{}]') == b'"a]b\\"c"' and signed_part(b"[1e400]") == b"1e400"
    for broken in (b"[", b"[]", b"[ ,1]", b'[{"a":"}', b"[{]"):
        try:
            signed_part(broken)
        except ValueError:
            continue
        raise AssertionError(broken)


def test_the_first_element_is_looked_for_in_a_bounded_stretch_of_the_body() -> None:
    """The scan runs before the signature is known to be good: a 16 KB gzip of 16 MB of brackets cost seconds of a
    blocked event loop. The first element is looked for within ``SIGNED_ELEMENT_MAX`` bytes (8 times the largest
    event Segment takes); past that the body is unsigned, however it goes on."""
    import hashlib
    import hmac

    event = orjson.dumps({"type": "track", "properties": {"p": "x" * (SIGNED_ELEMENT_MAX - 100)}})
    body = b"[" + event + b"]"
    good = hmac.new(SECRET.encode(), event, hashlib.sha1).hexdigest()
    assert signed_part(body) == event and signature_ok(body, good, [SECRET])
    longer = orjson.dumps({"type": "track", "properties": {"p": "x" * SIGNED_ELEMENT_MAX}})
    too_long = b"[" + longer + b"]"
    assert not signature_ok(too_long, hmac.new(SECRET.encode(), longer, hashlib.sha1).hexdigest(), [SECRET])
    for attack in (b"[" * (16 * 1024 * 1024), b"[[" + b"[]," * 5_000_000):
        try:
            signed_part(attack)
        except ValueError as exc:
            assert "does not end" in str(exc) or "unterminated" in str(exc)
            continue
        raise AssertionError(attack[:8])


@given(st.lists(st.recursive(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(),
                                       st.floats(allow_nan=False)),
                             lambda k: st.lists(k) | st.dictionaries(st.text(), k), max_leaves=20), min_size=1))
def test_signed_part_is_the_first_elements_exact_text(batch: list) -> None:
    import json

    for body in (orjson.dumps(batch), json.dumps(batch, indent=1).encode(), b" \n" + json.dumps(batch).encode()):
        start = body.index(b"[") + 1
        start += len(body[start:]) - len(body[start:].lstrip())
        text = body.decode()
        _, end = json.JSONDecoder().raw_decode(text, len(body[:start].decode()))
        assert signed_part(body) == text[:end].encode()[start:]
