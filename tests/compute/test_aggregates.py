"""Incremental aggregates: add/remove must land exactly where a from-scratch build does, and batch == incremental."""

from __future__ import annotations

import copy
import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.spec import kpis
from service.spec.kpis import Customer, InsightRule, cluster_kpis
from workers.compute import aggregates as agg
from workers.compute.aggregates import (
    AggregateError,
    Contribution,
    GroupAggregate,
    build_groups,
    contribution_from_features,
)
from workers.compute.clusters import assign_cluster, cluster_groups, load_rules
from workers.compute.features import Features

CATS = ["tea", "coffee", "milk", "shoes", "socks"]
names = st.none() | st.sampled_from(["pro", "free", "starter", "SaaS", "Retail"])
contributions = st.builds(
    Contribution,
    ltv_cents=st.integers(0, 10**8), purchases=st.integers(0, 50), churn_ppm=st.integers(0, 10**6),
    spend_cents=st.integers(0, 30) | st.integers(0, 10**8),  # small range: repeated spend values for the median
    frequency=st.integers(0, 40), web_sessions=st.integers(0, 60), mobile_sessions=st.integers(0, 60),
    email_sessions=st.integers(0, 60), identifier_count=st.integers(0, 8),
    categories=st.lists(st.sampled_from(CATS), max_size=4).map(tuple), plan=names, industry=names,
)


def views(a: GroupAggregate) -> tuple:
    return a.to_dict(), a.cluster_summary("g"), a.pattern_summary("g"), agg.kpi_cards({"g": a})


@given(st.lists(st.tuples(contributions, st.booleans()), max_size=25), st.randoms())
def test_add_then_remove_equals_build_from_remaining(items: list, rnd) -> None:
    full = GroupAggregate.build(c for c, _ in items)
    removed = [c for c, drop in items if drop]
    rnd.shuffle(removed)
    for c in removed:
        full.remove(c)
    assert views(full) == views(GroupAggregate.build(c for c, drop in items if not drop))


@given(st.lists(st.tuples(st.sampled_from("abc"), contributions, st.none() | st.tuples(st.sampled_from("abcd"),
                                                                                       contributions)), max_size=20))
def test_moving_profiles_between_groups_equals_rebuild(profiles: list) -> None:
    groups = build_groups((g, c) for g, c, _ in profiles)
    for g, c, new in profiles:
        agg.move(groups, (g, c), new)
    expected = build_groups(new for _, _, new in profiles if new is not None)
    assert {k: v.to_dict() for k, v in groups.items()} == {k: v.to_dict() for k, v in expected.items()}
    assert agg.kpi_cards(groups) == agg.kpi_cards(expected)


features = st.builds(
    Features,
    profile_id=st.just(""), ltv=st.floats(0, 5000, allow_nan=False), purchases=st.integers(0, 9),
    churn_risk=st.floats(0, 1), plan=names, industry=names, engagement_tier=st.just("low"),
    spend=st.floats(0, 10**6, allow_nan=False), frequency=st.integers(0, 30),
    categories=st.lists(st.sampled_from(CATS), max_size=3, unique=True).map(lambda c: tuple(sorted(c))),
    web_sessions=st.integers(0, 9), mobile_sessions=st.integers(0, 9), email_sessions=st.integers(0, 9),
    identifier_count=st.integers(0, 3),
)


@given(st.lists(features, min_size=1, max_size=30), st.booleans())
def test_batch_endpoint_and_incremental_path_give_identical_cards(fs: list, above_mean: bool) -> None:
    rules = load_rules()
    customers = [Customer(f"c{i}", f.frequency, f.spend, f.categories) for i, f in enumerate(fs)]
    labels = {f"c{i}": assign_cluster(f, rules) for i, f in enumerate(fs)}
    rule = InsightRule(require_above_mean=above_mean)
    assert cluster_kpis(customers, labels, rule) == agg.kpi_cards(cluster_groups(fs, rules), rule)


@given(st.lists(contributions, max_size=10))
def test_json_round_trips(cs: list) -> None:
    a = GroupAggregate.build(cs)
    assert GroupAggregate.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    for c in cs:
        assert Contribution.from_dict(json.loads(json.dumps(c.to_dict()))) == c
        assert orjson.loads(orjson.dumps(c)) == c.to_dict()  # the recompute stores orjson's own dataclass form


@given(st.lists(contributions, max_size=10), st.lists(contributions, max_size=5))
def test_stored_form_without_histogram_moves_like_the_full_one_given_the_median(cs: list, extra: list) -> None:
    """The stored form drops the spend histogram; with the median supplied (the recompute reads it from the
    cluster's sorted set) summaries and KPI cards are those of the full aggregate, after adds and removes too."""
    full = GroupAggregate.build(cs + extra)
    light = GroupAggregate.from_dict(json.loads(json.dumps(full.to_dict(histogram=False))), histogram=False)
    assert light.spend_counts == {} and not light.has_histogram
    for c in extra:
        full.remove(c)
        light.remove(c)
    with pytest.raises(AggregateError, match="median"):
        agg.kpi_cards({"g": light})  # never a made-up median
    light.median_x2 = kpis.median_cents_x2(full.spend_counts, full.n)
    assert light.cluster_summary("g") == full.cluster_summary("g")
    assert light.to_dict(histogram=False) == full.to_dict(histogram=False)
    assert agg.kpi_cards({"g": light}) == agg.kpi_cards({"g": full})
    with pytest.raises(AggregateError):
        light.to_dict()  # the full form would need the histogram it does not have


def test_add_counts_every_sum_field() -> None:
    """``add`` spells the sums out for speed: each one of ``_SUMS`` must reach the aggregate, and ``remove`` (which
    loops over ``_SUMS``) must undo it."""
    c = Contribution(**{name: 3 + i for i, name in enumerate(agg._SUMS)}, categories=("tea",), plan="pro",
                     industry="SaaS")
    a = GroupAggregate()
    a.add(c)
    a.add(c)
    assert {name: getattr(a, name) for name in agg._SUMS} == {name: 2 * (3 + i) for i, name in enumerate(agg._SUMS)}
    assert (a.n, a.categories, a.plans, a.industries, a.spend_counts) == (2, {"tea": 2}, {"pro": 2}, {"SaaS": 2},
                                                                          {c.spend_cents: 2})
    a.remove(c)
    assert a == GroupAggregate.build([c])


def test_contribution_from_features_is_exact_integers() -> None:
    f = Features("p", 1200.005, 8, 0.05, "pro", "SaaS", "high", 99.995, 3, ("b", "a"), 1, 2, 3, 4)
    c = contribution_from_features(f)
    assert (c.ltv_cents, c.churn_ppm, c.spend_cents, c.categories) == (120001, 50000, 10000, ("a", "b"))
    assert (c.web_sessions, c.mobile_sessions, c.email_sessions, c.identifier_count) == (1, 2, 3, 4)


def test_median_and_top_categories_follow_removals() -> None:
    cs = [Contribution(spend_cents=v, categories=cats) for v, cats in
          [(100, ("tea",)), (200, ("tea",)), (300, ("milk",)), (900, ("milk",)), (901, ("milk",))]]
    a = GroupAggregate.build(cs)
    card = agg.kpi_cards({0: a})["cluster_profiles"][0]
    assert (card["median_spend"], card["top_categories"]) == (3.0, "milk, tea")
    a.remove(cs[2])
    a.remove(cs[3])
    a.remove(cs[4])
    card = agg.kpi_cards({0: a})["cluster_profiles"][0]
    assert (card["n_customers"], card["median_spend"], card["top_categories"]) == (2, 1.5, "tea")


def test_remove_of_unknown_contribution_fails_and_changes_nothing() -> None:
    a = GroupAggregate.build([Contribution(spend_cents=5, plan="pro"), Contribution(spend_cents=7, ltv_cents=10)])
    before = copy.deepcopy(a)
    for stranger in (Contribution(spend_cents=6), Contribution(spend_cents=5, plan="free"),
                     Contribution(spend_cents=5, categories=("tea",)), Contribution(spend_cents=7, ltv_cents=11)):
        with pytest.raises(AggregateError):
            a.remove(stranger)
        assert a == before
    a.remove(Contribution(spend_cents=5, plan="pro"))
    with pytest.raises(AggregateError):  # the last member must match exactly (here: ltv 10 cents would remain)
        a.remove(Contribution(spend_cents=7))
    a.remove(Contribution(spend_cents=7, ltv_cents=10))
    assert a == GroupAggregate()
    with pytest.raises(AggregateError):
        a.remove(Contribution())


def test_move_from_a_group_that_does_not_exist_fails() -> None:
    groups = build_groups([("a", Contribution())])
    with pytest.raises(AggregateError):
        agg.move(groups, ("zzz", Contribution()), ("a", Contribution()))
    assert groups["a"].n == 1


@pytest.mark.parametrize("stored", [
    [], {"n": -1}, {"n": True}, {"n": 2, "spend_counts": {"5": 1}}, {"n": 1, "spend_counts": {"five": 1}},
    {"n": 1, "spend_counts": {"5": 1}, "plans": {"pro": 0}}, {"n": 1, "spend_counts": {"5": 1}, "ltv_cents": 1.5},
])
def test_corrupt_stored_aggregate_is_rejected(stored) -> None:
    with pytest.raises(AggregateError):
        GroupAggregate.from_dict(stored)


@pytest.mark.parametrize("stored", [
    "x", {"ltv_cents": -1}, {"spend_cents": "5"}, {"categories": "tea"}, {"categories": [1]}, {"plan": 3},
])
def test_corrupt_stored_contribution_is_rejected(stored) -> None:
    with pytest.raises(AggregateError):
        Contribution.from_dict(stored)
