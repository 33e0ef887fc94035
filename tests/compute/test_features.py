"""Per-profile features: trait precedence, fallbacks from orders and activity, windows, and junk tolerance."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from service.spec.keys import DAY_MS, SLOT_MS
from service.spec.profile import Identifier, Order, Profile, Trait, decode_profile
from workers.compute.features import Features, compute_features, engagement_tier, recency_churn

NOW = 20_000 * DAY_MS + 12 * 3_600_000  # noon UTC on day 20000
TODAY = NOW // DAY_MS


def make(traits: dict | None = None, orders: list[Order] | None = None, activity: dict | None = None,
         identifiers: int = 0, meta: dict | None = None) -> Profile:
    return Profile(
        id="p1",
        traits={k: Trait(v, NOW, None) for k, v in (traits or {}).items()},
        identifiers=[Identifier("email", f"u{i}@x.io", 0, "m") for i in range(identifiers)],
        orders=orders or [],
        activity=activity or {},
        meta=meta or {},
    )


def order(days_ago: float, revenue: float, *cats: str, key: str = "") -> Order:
    return Order(key or f"o{days_ago}-{revenue}", int(NOW - days_ago * DAY_MS), revenue, tuple(cats))


def test_traits_win_over_orders() -> None:
    p = make({"ltv": 1200, "purchase_count": 8, "churn_risk": 0.05}, orders=[order(1, 30.0)])
    f = compute_features(p, {}, NOW)
    assert (f.ltv, f.purchases, f.churn_risk) == (1200.0, 8, 0.05)


def test_alternative_trait_names_and_numeric_strings() -> None:
    p = make({"lifetime_value": " 450.5 ", "order_count": "3", "churn_probability": "0.22"})
    f = compute_features(p, {}, NOW)
    assert (f.ltv, f.purchases, f.churn_risk) == (450.5, 3, 0.22)


def test_junk_ltv_falls_back_to_order_revenue() -> None:
    orders = [order(400, 100.0), order(10, 25.5)]  # ltv counts every order, even outside the window
    for junk in ["abc", None, True, [1], {"v": 1}, "nan", "inf", -5, float("nan"), 10**400]:
        f = compute_features(make({"ltv": junk, "purchase_count": junk}, orders), {}, NOW)
        assert (f.ltv, f.purchases) == (125.5, 2), junk


def test_absurd_amounts_are_junk_or_capped() -> None:
    f = compute_features(make({"ltv": 5e12}, orders=[order(1, 1e300), order(2, 7.0)]), {}, NOW)
    assert (f.ltv, f.spend) == (1e9, 1e9)


def test_primary_junk_trait_falls_through_to_the_alternative_name() -> None:
    f = compute_features(make({"ltv": "n/a", "lifetime_value": 90}), {}, NOW)
    assert f.ltv == 90.0


def test_churn_trait_outside_unit_interval_is_ignored() -> None:
    p = make({"churn_risk": 65}, orders=[order(0, 1.0)])  # a percentage, not a probability
    assert compute_features(p, {}, NOW).churn_risk == 0.0  # derived: ordered just now


def test_churn_derived_from_recency() -> None:
    assert compute_features(make(orders=[order(45, 1.0)]), {}, NOW).churn_risk == 0.5
    assert compute_features(make(orders=[order(200, 1.0)]), {}, NOW).churn_risk == 1.0
    assert compute_features(make(), {}, NOW).churn_risk == 0.5  # nothing known
    # the latest of orders and activity counts: web activity 9 days ago beats an order 60 days ago
    slot = 5
    p = make(orders=[order(60, 1.0)], activity={"web": {TODAY - 9: 1 << slot}})
    expected = (NOW - ((TODAY - 9) * DAY_MS + slot * SLOT_MS)) / DAY_MS / 90
    assert compute_features(p, {}, NOW).churn_risk == expected
    # without orders or activity, the last event of any kind is used
    assert compute_features(make(meta={"ls": str(NOW - 18 * DAY_MS)}), {}, NOW).churn_risk == 0.2


def test_recency_churn_is_clamped() -> None:
    assert recency_churn(NOW + DAY_MS, NOW) == 0.0  # event timestamp in the future
    assert recency_churn(NOW - 1000 * DAY_MS, NOW) == 1.0
    assert recency_churn(None, NOW) == 0.5


def test_plan_and_industry_from_profile_then_account() -> None:
    account = {"plan": "enterprise", "industry": "SaaS"}
    f = compute_features(make({"plan": "pro"}), account, NOW)
    assert (f.plan, f.industry) == ("pro", "SaaS")
    f = compute_features(make({"plan": "  ", "industry": 7}), account, NOW)
    assert (f.plan, f.industry) == ("enterprise", "SaaS")
    f = compute_features(make(), {}, NOW)
    assert (f.plan, f.industry) == (None, None)


def test_window_limits_spend_frequency_and_categories() -> None:
    orders = [order(400, 999.0, "old"), order(100, 20.0, "tea", "cups"), order(1, 5.5, "tea"),
              order(-1, 50.0, "future")]
    f = compute_features(make(orders=orders), {}, NOW, analysis_window_days=365)
    assert (f.spend, f.frequency, f.categories) == (25.5, 2, ("cups", "tea"))
    f = compute_features(make(orders=orders), {}, NOW, analysis_window_days=30)
    assert (f.spend, f.frequency, f.categories) == (5.5, 1, ("tea",))
    assert f.purchases == 4 and f.ltv == 1074.5


def test_sessions_from_activity_over_the_last_30_days() -> None:
    activity = {
        "web": {TODAY: 0b111, TODAY - 29: 0b1, TODAY - 30: 0b1111},  # day -30 is outside the window
        "mobile": {TODAY - 3: (1 << 48) - 1},
    }
    f = compute_features(make(activity=activity), {}, NOW)
    assert (f.web_sessions, f.mobile_sessions, f.email_sessions) == (4, 48, 0)


def test_session_traits_win_over_activity() -> None:
    traits = {"web_sessions_30d": 14, "mobile_sessions_30d": "22", "emails_opened_30d": 8}
    f = compute_features(make(traits, activity={"web": {TODAY: 1}, "email": {TODAY: 0b11}}), {}, NOW)
    assert (f.web_sessions, f.mobile_sessions, f.email_sessions) == (14, 22, 8)
    f = compute_features(make({"email_sessions_30d": 3, "emails_opened_30d": 8}), {}, NOW)
    assert f.email_sessions == 3


def test_engagement_tier_from_trait_or_sessions() -> None:
    assert compute_features(make({"engagement_tier": " High "}), {}, NOW).engagement_tier == "high"
    assert compute_features(make({"web_sessions_30d": 20}), {}, NOW).engagement_tier == "high"
    assert compute_features(make({"web_sessions_30d": 4, "email_sessions_30d": 1}), {}, NOW).engagement_tier \
        == "medium"
    assert [engagement_tier(n) for n in (0, 4, 5, 19, 20)] == ["low", "low", "medium", "medium", "high"]


def test_identifier_count() -> None:
    assert compute_features(make(identifiers=3), {}, NOW).identifier_count == 3


def test_decoded_profile_hash() -> None:
    raw = {
        b"t:ltv": b"\"1200\"", b"T:ltv": str(NOW).encode(), b"t:plan": b"\"pro\"",
        b"x:user_id:u1": b"1|m1", b"x:email:a@b.io": b"1|m1",
        b"o:ord1": f"{NOW - DAY_MS}|99.5|shoes\x1fsocks".encode(),
        f"a:mobile:{TODAY}".encode(): b"7",
    }
    f = compute_features(decode_profile("p9", raw), {"industry": "Retail"}, NOW)
    assert (f.profile_id, f.ltv, f.purchases, f.plan, f.industry) == ("p9", 1200.0, 1, "pro", "Retail")
    assert (f.spend, f.categories, f.mobile_sessions, f.identifier_count) == (99.5, ("shoes", "socks"), 3, 2)


def test_json_round_trip() -> None:
    p = make({"ltv": 10, "plan": "pro"}, orders=[order(2, 3.0, "b", "a")], activity={"web": {TODAY: 1}})
    f = compute_features(p, {"industry": "SaaS"}, NOW)
    assert Features.from_dict(json.loads(json.dumps(f.to_dict()))) == f


def test_from_dict_tolerates_missing_and_bad_fields() -> None:
    f = Features.from_dict({"profile_id": "x", "ltv": "oops", "categories": "nope", "churn_risk": 7})
    assert (f.ltv, f.categories, f.churn_risk, f.engagement_tier) == (0.0, (), 0.5, "low")


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
TRAIT_NAMES = ["ltv", "lifetime_value", "purchase_count", "order_count", "churn_risk", "churn_probability", "plan",
               "industry", "engagement_tier", "web_sessions_30d", "mobile_sessions_30d", "email_sessions_30d",
               "emails_opened_30d"]


@given(st.dictionaries(st.sampled_from(TRAIT_NAMES), junk), st.dictionaries(st.sampled_from(["plan", "industry"]),
                                                                             junk))
def test_junk_traits_never_raise_and_stay_in_range(traits: dict, account: dict) -> None:
    f = compute_features(make(traits), account, NOW)
    assert f.ltv >= 0 and f.purchases >= 0 and 0 <= f.churn_risk <= 1
    assert f.plan is None or (isinstance(f.plan, str) and f.plan)
    assert min(f.web_sessions, f.mobile_sessions, f.email_sessions) >= 0
    json.dumps(f.to_dict(), allow_nan=False)
