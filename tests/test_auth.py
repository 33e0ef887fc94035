"""Signatures and credentials (pure)."""

from __future__ import annotations

import base64

from service.auth import basic_username, bearer_token, signature_ok, signed_part, token_ok, write_key_space
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
