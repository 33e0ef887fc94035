"""Cross-channel patterns: dominance rule, summaries, the Mave prompt and material-change detection."""

from __future__ import annotations

from dataclasses import replace

import pytest

from workers.compute.aggregates import contribution_from_features
from workers.compute.channels import (
    build_prompt,
    channel_pattern,
    material_changes,
    patterns_changed,
    summarize_patterns,
)
from workers.compute.features import Features

BASE = Features(profile_id="p", ltv=0.0, purchases=0, churn_risk=0.0, plan=None, industry=None,
                engagement_tier="low", spend=0.0, frequency=0, categories=(), web_sessions=0, mobile_sessions=0,
                email_sessions=0, identifier_count=1)


def feat(web: int = 0, mobile: int = 0, email: int = 0, **kw) -> Features:
    return replace(BASE, web_sessions=web, mobile_sessions=mobile, email_sessions=email, **kw)


@pytest.mark.parametrize(("sessions", "pattern"), [
    ((14, 22, 8), "omnichannel"),  # the specification's first sample: mobile has exactly half, not over half
    ((4, 1, 12), "email_dominant"),  # the specification's second sample
    ((28, 35, 15), "omnichannel"),  # the specification's third sample
    ((3, 1, 1), "web_dominant"),
    ((0, 1, 0), "mobile_dominant"),
    ((5, 5, 0), "omnichannel"),
    ((0, 0, 0), None),
])
def test_dominant_channel_needs_strictly_more_than_half(sessions: tuple, pattern: str | None) -> None:
    f = feat(*sessions)
    assert channel_pattern(f) == pattern
    assert channel_pattern(contribution_from_features(f)) == pattern  # a stored contribution gives the same


def sample() -> list[Features]:
    return [
        feat(14, 2, 1, ltv=890, plan="pro", identifier_count=3),
        feat(20, 0, 0, ltv=110, plan="starter", identifier_count=1),
        feat(4, 1, 12, ltv=340, plan="starter", identifier_count=2),
        feat(28, 35, 15, ltv=1450, plan="enterprise", identifier_count=4),
        feat(0, 0, 0, ltv=9999, plan="ghost"),  # no activity: left out
    ]


def test_summaries_per_pattern() -> None:
    s = summarize_patterns(sample())
    assert list(s) == ["web_dominant", "email_dominant", "omnichannel"]
    web = s["web_dominant"]
    assert (web["n"], web["avg_ltv"], web["avg_web_sessions"], web["avg_mobile_sessions"],
            web["avg_email_sessions"], web["avg_identifiers"], web["plans"]) == (2, 500.0, 17.0, 1.0, 0.5, 2.0,
                                                                                 ["pro", "starter"])
    assert s["omnichannel"]["plans"] == ["enterprise"]


def test_prompt_lists_each_non_empty_pattern_and_the_questions() -> None:
    prompt = build_prompt(summarize_patterns(sample()))
    assert "**Web Dominant** (N=2)" in prompt
    assert "**Email Dominant** (N=1)" in prompt
    assert "Avg LTV: $1,450" in prompt
    assert "Mobile Dominant" not in prompt and "ghost" not in prompt
    assert prompt.index("Web Dominant") < prompt.index("Email Dominant") < prompt.index("Omnichannel")
    for phrase in ("persona name", "journey", "content formats", "Churn exposure", "identity resolution"):
        assert phrase in prompt


def summary(n: int, ltv: float) -> dict:
    return {"n": n, "avg_ltv": ltv}


def test_material_change_rules() -> None:
    old = {"web_dominant": summary(100, 200.0), "omnichannel": summary(10, 50.0)}
    assert material_changes(old, old) == []
    assert not patterns_changed(old, {**old, "web_dominant": summary(109, 219.99)})
    assert material_changes(old, {**old, "web_dominant": summary(110, 200.0)}) == ["web_dominant n 100 -> 110"]
    assert material_changes(old, {**old, "web_dominant": summary(91, 180.0)}) == ["web_dominant avg_ltv 200.0 -> 180.0"]
    assert material_changes(old, {"web_dominant": old["web_dominant"]}) == ["omnichannel disappeared"]
    assert material_changes(old, {**old, "email_dominant": summary(1, 5.0)}) == ["email_dominant appeared"]
    assert patterns_changed({"omnichannel": summary(3, 0.0)}, {"omnichannel": summary(3, 0.01)})


def test_threshold_is_configurable() -> None:
    old = {"web_dominant": summary(100, 200.0)}
    new = {"web_dominant": summary(105, 200.0)}
    assert not patterns_changed(old, new)
    assert patterns_changed(old, new, threshold=0.05)
