"""Cross-channel patterns: which channel a profile mostly uses, summaries per pattern, the Mave prompt.

Pattern of a profile, over its 30-day web + mobile + email sessions: a channel with strictly more than half of
the total makes it ``<channel>_dominant``; otherwise ``omnichannel``; no sessions at all -> no pattern (the
profile is left out).

A change between two sets of summaries is "material" (worth a new Mave chat) when a pattern appears or disappears,
or, for a pattern present in both, its N or its average LTV moves by at least ``threshold`` (default 10 %) of the
old value (from 0, any change counts).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from fractions import Fraction
from typing import Any, Protocol

from workers.compute.aggregates import GroupAggregate, contribution_from_features
from workers.compute.features import Features

PATTERNS = ("web_dominant", "mobile_dominant", "email_dominant", "omnichannel")
MATERIAL_CHANGE = 0.10


class HasSessions(Protocol):
    @property
    def web_sessions(self) -> int: ...
    @property
    def mobile_sessions(self) -> int: ...
    @property
    def email_sessions(self) -> int: ...


def channel_pattern(x: HasSessions) -> str | None:
    """Pattern of a ``Features`` or ``Contribution`` (both carry 30-day sessions per channel)."""
    web, mobile, email = max(0, int(x.web_sessions)), max(0, int(x.mobile_sessions)), max(0, int(x.email_sessions))
    total = web + mobile + email  # spelt out for speed: this runs for every profile of a full recompute
    if total == 0:
        return None
    for ch, count in (("web", web), ("mobile", mobile), ("email", email)):
        if count * 2 > total:
            return f"{ch}_dominant"
    return "omnichannel"


def pattern_groups(features: Iterable[Features]) -> dict[str, GroupAggregate]:
    """Aggregates per pattern built from scratch; profiles without activity are left out."""
    groups: dict[str, GroupAggregate] = {}
    for f in features:
        pattern = channel_pattern(f)
        if pattern is not None:
            groups.setdefault(pattern, GroupAggregate()).add(contribution_from_features(f))
    return groups


def pattern_summaries(groups: Mapping[str, GroupAggregate]) -> dict[str, dict[str, Any]]:
    """Per-pattern summary (N, avg LTV, avg sessions per channel, avg identifiers, top plans), non-empty only."""
    out = {}
    for p in PATTERNS:
        summary = groups[p].pattern_summary(p) if p in groups else None
        if summary is not None:
            out[p] = summary
    return out


def summarize_patterns(features: Iterable[Features]) -> dict[str, dict[str, Any]]:
    return pattern_summaries(pattern_groups(features))


def _title(pattern: str) -> str:
    return pattern.replace("_", " ").title()


def pattern_block(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """One paragraph per pattern, in a fixed order, for the prompt."""
    parts = []
    for p in PATTERNS:
        s = summaries.get(p)
        if not s:
            continue
        plans = ", ".join(s.get("plans") or []) or "unknown"
        parts.append(
            f"**{_title(p)}** (N={s.get('n', 0)})\n"
            f"  Avg LTV: ${s.get('avg_ltv', 0):,.0f} | Web sessions: {s.get('avg_web_sessions', 0):.1f} | "
            f"Mobile sessions: {s.get('avg_mobile_sessions', 0):.1f} | "
            f"Email sessions: {s.get('avg_email_sessions', 0):.1f}\n"
            f"  Avg identifiers per profile: {s.get('avg_identifiers', 0):.1f} | Top plans: {plans}"
        )
    return "\n\n".join(parts)


def build_prompt(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """The Mave chat message asking for a unified cross-channel persona framework."""
    return f"""We want one persona framework that respects how the same customer behaves differently on our \
website, mobile app and email. The groups below come from identity-resolved profiles over the last 30 days; a \
session is a distinct 30-minute period with activity on that channel.

CROSS-CHANNEL PATTERNS:

{pattern_block(summaries)}

For every pattern above, give:
1. A persona name and a two-sentence description of who they are across channels.
2. What need their main channel meets, and why they favour it.
3. How to reach them on the channels they use less: which message and format would land.
4. Their usual journey between channels.
5. Recommended content formats for each channel.
6. Churn exposure: losing which channel would most likely lose the customer.

Then an overall strategy:
- What should stay consistent everywhere and what should be adapted per channel.
- Where identity resolution could link anonymous activity to known customers.
- Which moments or triggers make people switch channels."""


def _q(v: Any) -> Fraction:
    try:
        return Fraction(str(v)) if v is not None and not isinstance(v, bool) else Fraction(0)
    except (ValueError, ZeroDivisionError):
        return Fraction(0)


def material_changes(old: Mapping[str, Mapping[str, Any]], new: Mapping[str, Mapping[str, Any]],
                     threshold: float = MATERIAL_CHANGE) -> list[str]:
    """Reasons the patterns changed materially (empty list: not worth a new chat); see the module docstring."""
    limit = _q(threshold)
    reasons = []
    for p in PATTERNS:
        a, b = old.get(p), new.get(p)
        if bool(a) != bool(b):
            reasons.append(f"{p} {'appeared' if b else 'disappeared'}")
            continue
        if not a or not b:
            continue
        for key in ("n", "avg_ltv"):
            before, after = _q(a.get(key)), _q(b.get(key))
            if abs(after - before) >= limit * abs(before) and after != before:
                reasons.append(f"{p} {key} {a.get(key)} -> {b.get(key)}")
    return reasons


def patterns_changed(old: Mapping[str, Mapping[str, Any]], new: Mapping[str, Mapping[str, Any]],
                     threshold: float = MATERIAL_CHANGE) -> bool:
    return bool(material_changes(old, new, threshold))
