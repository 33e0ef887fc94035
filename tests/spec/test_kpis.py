"""The KPI cards: the specification's 40-customer example, TF-IDF ordering, the insight rule and request checks."""

from __future__ import annotations

import copy
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.spec.kpis import (
    GROWTH,
    RETENTION,
    BadRequest,
    InsightRule,
    _scaled_exact,
    cluster_kpis,
    round_ratio,
    scaled,
    to_cents,
    validate_request,
)

# The specification's example request, verbatim: (id, frequency, amount_spent, product_types, label).
SEED_ROWS = [
    ("C001", 28, 4120.75, ["laptop", "mouse", "keyboard", "monitor"], 2),
    ("C002", 5, 190.4, ["tea", "coffee"], 0),
    ("C003", 12, 845.1, ["jeans", "t-shirt", "sneakers"], 0),
    ("C004", 2, 75.0, ["notebook"], 0),
    ("C005", 17, 1324.55, ["smartphone", "earbuds"], 0),
    ("C006", 8, 510.3, ["dog food", "cat food"], 0),
    ("C007", 24, 2780.9, ["smart-tv", "soundbar", "hdmi-cable"], 1),
    ("C008", 10, 660.0, ["yogurt", "milk", "cheese"], 0),
    ("C009", 3, 120.0, ["stationery"], 0),
    ("C010", 15, 975.65, ["beer", "wine", "snacks"], 0),
    ("C011", 7, 450.25, ["books", "pens"], 0),
    ("C012", 25, 3015.9, ["tablet", "stylus", "cover"], 1),
    ("C013", 6, 210.1, ["pasta", "sauce"], 0),
    ("C014", 20, 1884.0, ["fitness-watch"], 1),
    ("C015", 1, 40.0, ["batteries"], 0),
    ("C016", 13, 1105.35, ["printer", "ink"], 0),
    ("C017", 4, 160.0, ["flour", "sugar", "eggs"], 0),
    ("C018", 30, 4522.6, ["gaming-pc", "rgb-mouse", "gaming-chair", "headset"], 2),
    ("C019", 11, 720.0, ["makeup", "skincare"], 0),
    ("C020", 9, 585.4, ["toys", "board-games"], 0),
    ("C021", 2, 55.0, ["candles"], 0),
    ("C022", 18, 1410.7, ["camera", "sd-card"], 0),
    ("C023", 14, 992.0, ["office-chair", "desk-lamp"], 0),
    ("C024", 3, 135.0, ["juice", "cookies"], 0),
    ("C025", 12, 830.2, ["running-shoes", "sports-socks"], 0),
    ("C026", 23, 2560.0, ["fridge", "water-filter"], 1),
    ("C027", 6, 260.4, ["vitamins"], 0),
    ("C028", 5, 195.99, ["wine", "cheese"], 0),
    ("C029", 19, 1599.95, ["e-reader", "ebooks"], 0),
    ("C030", 22, 2345.0, ["washing-machine", "detergent"], 1),
    ("C031", 4, 175.5, ["herbs", "spices"], 0),
    ("C032", 8, 540.0, ["diapers", "baby-wipes", "formula"], 0),
    ("C033", 27, 3350.8, ["console", "controller", "games"], 1),
    ("C034", 10, 705.35, ["sunscreen", "after-sun"], 0),
    ("C035", 3, 150.0, ["frozen-pizza"], 0),
    ("C036", 16, 1240.6, ["tool-set", "drill"], 0),
    ("C037", 9, 610.1, ["organic-vegetables"], 0),
    ("C038", 21, 2105.0, ["air-fryer", "cookbook"], 1),
    ("C039", 7, 435.75, ["flowers", "vase"], 0),
    ("C040", 14, 1015.9, ["winter-jacket", "gloves", "scarf"], 0),
]
SEED_BODY = {
    "customers": [{"id": i, "frequency": f, "amount_spent": a, "product_types": p} for i, f, a, p, _ in SEED_ROWS],
    "labels": {i: label for i, _, _, _, label in SEED_ROWS},
}
# The specification's example response figures.
SEED_FIGURES = {
    0: {"n_customers": 31, "avg_spend": 591.11, "median_spend": 540.0, "avg_frequency": 8.81,
        "share_of_revenue_pct": 40.71},
    1: {"n_customers": 7, "avg_spend": 2577.37, "median_spend": 2560.0, "avg_frequency": 23.14,
        "share_of_revenue_pct": 40.08},
    2: {"n_customers": 2, "avg_spend": 4321.68, "median_spend": 4321.68, "avg_frequency": 29.0,
        "share_of_revenue_pct": 19.2},
}
CARD_KEYS = ["cluster_id", "n_customers", "avg_spend", "median_spend", "avg_frequency", "top_categories",
             "share_of_revenue_pct", "insight"]


def kpis_of(body: dict, rule: InsightRule | None = None) -> list[dict]:
    return cluster_kpis(*validate_request(body), insight_rule=rule)["cluster_profiles"]


def test_seed_example_figures_match_to_two_decimals() -> None:
    cards = kpis_of(SEED_BODY)
    assert [c["cluster_id"] for c in cards] == [0, 1, 2]
    for card in cards:
        assert list(card) == CARD_KEYS
        got = {k: card[k] for k in SEED_FIGURES[card["cluster_id"]]}
        assert got == SEED_FIGURES[card["cluster_id"]]


def test_seed_example_insights_with_share_only_rule_and_documented_default() -> None:
    seed_like = kpis_of(SEED_BODY, InsightRule(require_above_mean=False))
    assert [c["insight"] for c in seed_like] == [RETENTION, RETENTION, GROWTH]
    # Documented rule: cluster 0 holds 40.71 % of revenue but spends below the population mean (1125.24).
    default = kpis_of(SEED_BODY)
    assert [c["insight"] for c in default] == [GROWTH, RETENTION, GROWTH]


def test_insight_threshold_is_configurable() -> None:
    cards = kpis_of(SEED_BODY, InsightRule(min_share_pct=15.0, retention_text="keep", growth_text="grow"))
    assert [c["insight"] for c in cards] == ["grow", "keep", "keep"]


def test_top_categories_rank_repeated_categories_first_then_by_name() -> None:
    cards = {c["cluster_id"]: c for c in kpis_of(SEED_BODY)}
    # cheese and wine are the only categories two cluster-0 customers share.
    assert cards[0]["top_categories"].split(", ")[:2] == ["cheese", "wine"]
    # All of cluster 2's seven categories tie: alphabetical, five of them.
    assert cards[2]["top_categories"] == "gaming-chair, gaming-pc, headset, keyboard, laptop"


def test_tf_idf_prefers_categories_unique_to_the_cluster() -> None:
    body = {
        "customers": [
            {"id": "a", "frequency": 1, "amount_spent": 10, "product_types": ["milk", "zebra-toy"]},
            {"id": "b", "frequency": 1, "amount_spent": 10, "product_types": ["milk", "zebra-toy"]},
            {"id": "c", "frequency": 1, "amount_spent": 10, "product_types": ["milk"]},
        ],
        "labels": {"a": "x", "b": "x", "c": "y"},
    }
    cards = {c["cluster_id"]: c for c in kpis_of(body)}
    assert cards["x"]["top_categories"] == "zebra-toy, milk"  # same tf, but milk also appears in cluster y
    assert cards["y"]["top_categories"] == "milk"


def test_category_listed_twice_by_one_customer_counts_once() -> None:
    body = {
        "customers": [
            {"id": "a", "frequency": 1, "amount_spent": 1, "product_types": ["tea", "tea", "tea"]},
            {"id": "b", "frequency": 1, "amount_spent": 1, "product_types": ["coffee"]},
            {"id": "c", "frequency": 1, "amount_spent": 1, "product_types": ["coffee"]},
        ],
        "labels": {"a": 1, "b": 1, "c": 1},
    }
    assert kpis_of(body)[0]["top_categories"] == "coffee, tea"


def test_result_does_not_depend_on_customer_order() -> None:
    shuffled = copy.deepcopy(SEED_BODY)
    random.Random(7).shuffle(shuffled["customers"])
    assert kpis_of(shuffled) == kpis_of(SEED_BODY)


def test_even_median_and_zero_revenue() -> None:
    body = {
        "customers": [{"id": str(i), "frequency": 0, "amount_spent": 0, "product_types": []} for i in range(4)],
        "labels": {"0": "a", "1": "a", "2": "b", "3": "b"},
    }
    cards = kpis_of(body)
    assert [c["share_of_revenue_pct"] for c in cards] == [0.0, 0.0]
    assert cards[0]["top_categories"] == ""
    body = {
        "customers": [{"id": "p", "frequency": 1, "amount_spent": 10.0, "product_types": []},
                      {"id": "q", "frequency": 2, "amount_spent": 10.05, "product_types": []}],
        "labels": {"p": 0, "q": 0},
    }
    card = kpis_of(body)[0]
    assert (card["median_spend"], card["avg_frequency"], card["share_of_revenue_pct"]) == (10.03, 1.5, 100.0)


def test_mixed_label_types_sort_numbers_before_strings() -> None:
    body = {
        "customers": [{"id": i, "frequency": 1, "amount_spent": 1, "product_types": []} for i in "abc"],
        "labels": {"a": "z", "b": 10, "c": 2},
    }
    assert [c["cluster_id"] for c in kpis_of(body)] == [2, 10, "z"]


def test_rounding_is_half_up_and_exact() -> None:
    assert to_cents(1.005) == 101
    assert to_cents(4120.75) == 412075
    assert round_ratio(864335, 200) == 4321.68
    assert round_ratio(1, 3) == 0.33
    assert round_ratio(2, 3) == 0.67
    assert round_ratio(5, 0) == 0.0


def _with(mutate) -> dict:
    body = copy.deepcopy(SEED_BODY)
    mutate(body)
    return body


def _set(path_key: str, value):
    def f(body: dict) -> None:
        body["customers"][0][path_key] = value
    return f


@pytest.mark.parametrize(("body", "fragment"), [
    ([], "JSON object"),
    ("customers", "JSON object"),
    ({"labels": {"a": 1}}, "'customers' must be a non-empty list"),
    ({"customers": [], "labels": {"a": 1}}, "'customers' must be a non-empty list"),
    ({"customers": {"id": "a"}, "labels": {"a": 1}}, "'customers' must be a non-empty list"),
    (_with(lambda b: b.update(labels={})), "'labels' must be a non-empty object"),
    (_with(lambda b: b.pop("labels")), "'labels' must be a non-empty object"),
    (_with(lambda b: b["labels"].update(C999=1)), "unknown customer 'C999'"),
    (_with(lambda b: b["labels"].pop("C040")), "customer 'C040' has no label"),
    (_with(lambda b: b["labels"].update(C001=None)), "label of 'C001'"),
    (_with(lambda b: b["labels"].update(C001=True)), "label of 'C001'"),
    (_with(_set("amount_spent", -1)), "customers[0].amount_spent must not be negative"),
    (_with(_set("frequency", -2)), "customers[0].frequency must not be negative"),
    (_with(_set("amount_spent", "12.5")), "customers[0].amount_spent must be a number"),
    (_with(_set("amount_spent", True)), "customers[0].amount_spent must be a number"),
    (_with(_set("amount_spent", float("nan"))), "must be finite"),
    (_with(_set("frequency", 2.5)), "whole number"),
    (_with(_set("amount_spent", 1e10)), "customers[0].amount_spent is out of range"),
    (_with(_set("frequency", None)), "customers[0].frequency must be a number"),
    (_with(_set("id", "")), "customers[0].id must be a non-empty string"),
    (_with(_set("id", 17)), "customers[0].id must be a non-empty string"),
    (_with(_set("product_types", "laptop")), "product_types must be a list"),
    (_with(_set("product_types", ["ok", 3])), "product_types must be a list"),
    (_with(lambda b: b["customers"][0].pop("frequency")), "customers[0] is missing 'frequency'"),
    (_with(lambda b: b["customers"].__setitem__(0, "C001")), "customers[0] must be an object"),
    (_with(lambda b: b["customers"].append(dict(b["customers"][1]))), "duplicate customer id 'C002'"),
])
def test_bad_requests_are_rejected_with_a_clear_message(body, fragment: str) -> None:
    with pytest.raises(BadRequest) as err:
        validate_request(body)
    assert fragment in err.value.message


def test_valid_request_accepts_integral_float_frequency() -> None:
    customers, _ = validate_request(_with(_set("frequency", 28.0)))
    assert customers[0].frequency == 28 and isinstance(customers[0].frequency, int)


@given(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0, 2, 6]))
def test_fast_scaling_matches_exact_decimal_rounding(x: float, places: int) -> None:
    assert scaled(x, places) == _scaled_exact(repr(x), places)


@given(st.integers(-10**15, 10**15), st.integers(0, 8), st.sampled_from([0, 2, 6]))
def test_fast_scaling_matches_exact_rounding_on_short_decimals(k: int, decimals: int, places: int) -> None:
    x = k / 10**decimals  # the amounts money and churn actually take: few decimals, up to and past 1e9
    assert scaled(x, places) == _scaled_exact(repr(x), places)


def test_scaling_rounds_half_up_past_the_kept_places() -> None:
    assert scaled(0.1234565, 6) == 123457 and scaled(2.5, 0) == 3 and scaled(-1.005, 2) == -101
