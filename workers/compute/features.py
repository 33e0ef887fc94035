"""Per-profile features: the plain numbers clustering, channel patterns and KPI cards are computed from.

Pure: the caller passes the decoded profile, the merged account traits and ``now`` (the recompute passes the
last millisecond of the current UTC day, ``workers.recompute.as_of``, so that every recompute of a day agrees).
Trait values come from whatever sources send them, so every read is defensive: a value of the wrong type (string
that is not a number, bool, None, list, dict, NaN, out of range) is ignored and the derived value is used instead.
Nothing here raises.

Every number read from a trait must lie in [0, 1e9] (``kpis.MAX_VALUE``); derived ltv and spend are capped there,
so the integer sums the aggregates keep stay far inside 64 bits.

Documented choices:
- ltv: trait ``ltv`` then ``lifetime_value`` (non-negative number or numeric string), else revenue of all orders.
- purchases: trait ``purchase_count`` then ``order_count`` (non-negative, fractions truncated), else order count.
- churn_risk: trait ``churn_risk`` then ``churn_probability`` when within [0, 1]; else derived from recency:
  ``min(1, days_since_last_activity / 90)`` (at ``now``: near 0 when active today, 0.5 after 45 days, 1 after 90
  days). Last activity is the latest channel activity slot or order; without either, the profile's last event;
  without any, 0.5 (the neutral default for an unknown risk).
- engagement_tier: trait ``engagement_tier`` (non-empty string, lower-cased), else from the 30-day sessions over all
  channels: >= 20 "high", >= 5 "medium", else "low".
- plan / industry: the profile's trait, else the account traits (non-empty strings only).
- spend / frequency / categories: orders with ``now - window <= ts <= now``; categories sorted, de-duplicated.
- sessions: computed traits ``web_sessions_30d``, ``mobile_sessions_30d``, ``email_sessions_30d`` (or
  ``emails_opened_30d``) win; else distinct active 30-minute slots over the last 30 UTC days including today.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from service.spec.keys import DAY_MS, SLOT_MS
from service.spec.kpis import MAX_VALUE
from service.spec.profile import Profile

CHURN_HORIZON_DAYS = 90
UNKNOWN_CHURN = 0.5
SESSION_DAYS = 30
TIER_HIGH, TIER_MEDIUM = 20, 5
SESSION_TRAITS = {
    "web": ("web_sessions_30d",),
    "mobile": ("mobile_sessions_30d",),
    "email": ("email_sessions_30d", "emails_opened_30d"),
}
# Every trait the features read: the recompute decodes only these.
TRAITS_USED = frozenset({"ltv", "lifetime_value", "purchase_count", "order_count", "churn_risk", "churn_probability",
                         "plan", "industry", "engagement_tier",
                         *(n for names in SESSION_TRAITS.values() for n in names)})


@dataclass(frozen=True)
class Features:
    profile_id: str
    ltv: float
    purchases: int
    churn_risk: float
    plan: str | None
    industry: str | None
    engagement_tier: str
    spend: float  # revenue of orders in the analysis window
    frequency: int  # orders in the analysis window
    categories: tuple[str, ...]
    web_sessions: int
    mobile_sessions: int
    email_sessions: int
    identifier_count: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (categories as a list)."""
        d = asdict(self)
        d["categories"] = list(self.categories)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Features:
        """Inverse of ``to_dict``; missing or malformed fields take neutral defaults so old JSON still loads."""
        return cls(
            profile_id=str(d.get("profile_id", "")),
            ltv=_num(d.get("ltv")) or 0.0,
            purchases=_count(d.get("purchases")) or 0,
            churn_risk=_or(_probability(d.get("churn_risk")), UNKNOWN_CHURN),
            plan=_text(d.get("plan")),
            industry=_text(d.get("industry")),
            engagement_tier=_text(d.get("engagement_tier")) or "low",
            spend=_num(d.get("spend")) or 0.0,
            frequency=_count(d.get("frequency")) or 0,
            categories=_categories(d.get("categories")),
            web_sessions=_count(d.get("web_sessions")) or 0,
            mobile_sessions=_count(d.get("mobile_sessions")) or 0,
            email_sessions=_count(d.get("email_sessions")) or 0,
            identifier_count=_count(d.get("identifier_count")) or 0,
        )


def _num(v: Any) -> float | None:
    """A finite number in [0, MAX_VALUE] (or such a numeric string), else None."""
    t = type(v)
    if t is float:  # the common cases first, without a call: this runs several times per profile
        return v if 0 <= v <= MAX_VALUE else None  # NaN fails both comparisons
    if t is int:
        return float(v) if 0 <= v <= MAX_VALUE else None
    if v is None or t is bool:
        return None
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            return None
    if not isinstance(v, int | float):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) and 0 <= f <= MAX_VALUE else None


def _count(v: Any) -> int | None:
    f = _num(v)
    return int(f) if f is not None else None


def _probability(v: Any) -> float | None:
    f = _num(v)
    return f if f is not None and f <= 1 else None


def _or(v: float | None, default: float) -> float:
    return default if v is None else v


def _text(v: Any) -> str | None:
    if isinstance(v, str):
        v = v.strip()
        return v or None
    return None


def _categories(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list | tuple):
        return ()
    return tuple(sorted({c.strip() for c in v if isinstance(c, str) and c.strip()}))


def _first(values: Mapping[str, Any], names: tuple[str, ...], read: Any) -> Any:
    for name in names:
        v = values.get(name)
        if v is not None:
            got = read(v)
            if got is not None:
                return got
    return None


def _last_activity_ms(profile: Profile) -> int | None:
    times = [o.ts for o in profile.orders if o.ts > 0]
    for days in profile.activity.values():
        for day, bits in days.items():
            if bits > 0:
                times.append(day * DAY_MS + (bits.bit_length() - 1) * SLOT_MS)
    if times:
        return max(times)
    return profile.last_seen or None


def recency_churn(last_activity_ms: int | None, now_ms: int) -> float:
    """Churn risk from days since last activity: linear from 0 (today) to 1 (90 days or more)."""
    if last_activity_ms is None:
        return UNKNOWN_CHURN
    days = (now_ms - last_activity_ms) / DAY_MS
    return min(1.0, max(0.0, days / CHURN_HORIZON_DAYS))


def engagement_tier(total_sessions_30d: int) -> str:
    """Tier from 30-day sessions (30-minute slots) across channels: >= 20 high, >= 5 medium, else low."""
    if total_sessions_30d >= TIER_HIGH:
        return "high"
    return "medium" if total_sessions_30d >= TIER_MEDIUM else "low"


def compute_features(profile: Profile, account_traits: Mapping[str, Any] | None, now_ms: int,
                     analysis_window_days: int = 365) -> Features:
    """Features of one profile at ``now_ms``; see the module docstring for every rule.

    Written for speed (a full recompute calls it for every profile): missing traits cost a dict lookup."""
    traits = profile.trait_values()
    account = account_traits if isinstance(account_traits, Mapping) else {}
    orders = profile.orders

    ltv = _first(traits, ("ltv", "lifetime_value"), _num)
    if ltv is None:
        ltv = min(MAX_VALUE, max(0.0, sum(o.revenue for o in orders if math.isfinite(o.revenue))))
    purchases = _first(traits, ("purchase_count", "order_count"), _count)
    if purchases is None:
        purchases = len(orders)
    churn = _first(traits, ("churn_risk", "churn_probability"), _probability)
    if churn is None:
        churn = recency_churn(_last_activity_ms(profile), now_ms)

    start = now_ms - analysis_window_days * DAY_MS
    window = [o for o in orders if start <= o.ts <= now_ms and math.isfinite(o.revenue)]
    categories = _categories([c for o in window for c in o.categories]) if window else ()

    today = now_ms // DAY_MS
    sessions = []
    for channel, names in SESSION_TRAITS.items():
        given = _first(traits, names, _count)
        if given is None:
            given = profile.sessions(channel, today - SESSION_DAYS + 1, today) if channel in profile.activity else 0
        sessions.append(given)

    tier = _text(traits.get("engagement_tier"))
    return Features(
        profile_id=profile.id,
        ltv=float(ltv),
        purchases=int(purchases),
        churn_risk=float(churn),
        plan=_text(traits.get("plan")) or _text(account.get("plan")),
        industry=_text(traits.get("industry")) or _text(account.get("industry")),
        engagement_tier=tier.lower() if tier else engagement_tier(sum(sessions)),
        spend=min(MAX_VALUE, max(0.0, sum(o.revenue for o in window))),
        frequency=len(window),
        categories=categories,
        web_sessions=sessions[0],
        mobile_sessions=sessions[1],
        email_sessions=sessions[2],
        identifier_count=profile.identifier_count,
    )
