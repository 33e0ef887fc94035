"""Trait clusters: the default rules, the operator-editable rules file, and the per-cluster summary."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from workers.compute.clusters import RulesError, assign_cluster, label, load_rules, parse_rules, summarize_clusters
from workers.compute.features import Features

BASE = Features(profile_id="p", ltv=0.0, purchases=0, churn_risk=0.0, plan=None, industry=None,
                engagement_tier="low", spend=0.0, frequency=0, categories=(), web_sessions=0, mobile_sessions=0,
                email_sessions=0, identifier_count=1)


def feat(**kw) -> Features:
    return replace(BASE, **kw)


@pytest.fixture(scope="module")
def rules():
    return load_rules()


# The specification's fallback sample: three trait combinations, 20 profiles each.
SEED_SAMPLE = [
    feat(ltv=1200, purchases=8, churn_risk=0.05, plan="pro", industry="SaaS", engagement_tier="high"),
    feat(ltv=450, purchases=3, churn_risk=0.22, plan="starter", industry="E-commerce", engagement_tier="medium"),
    feat(ltv=85, purchases=1, churn_risk=0.65, plan="free", industry="Agency"),
] * 20


def test_seed_sample_lands_in_the_seed_clusters(rules) -> None:
    summaries = summarize_clusters(SEED_SAMPLE, rules)
    assert list(summaries) == ["high_value", "growth", "at_risk"]
    got = {k: (s["n"], s["avg_ltv"], s["avg_churn"], s["avg_purchases"]) for k, s in summaries.items()}
    assert got == {"high_value": (20, 1200.0, 0.05, 8.0), "growth": (20, 450.0, 0.22, 3.0),
                   "at_risk": (20, 85.0, 0.65, 1.0)}
    assert summaries["growth"]["industries"] == ["E-commerce"] and summaries["growth"]["plans"] == ["starter"]


@pytest.mark.parametrize(("kw", "cluster"), [
    ({"ltv": 500.01, "churn_risk": 0.1499}, "high_value"),
    ({"ltv": 500, "churn_risk": 0.0, "purchases": 1}, "new"),  # ltv must be strictly above 500
    ({"ltv": 900, "churn_risk": 0.15, "purchases": 2}, "growth"),  # churn must be strictly below 0.15
    ({"ltv": 100.01, "purchases": 2}, "growth"),
    ({"ltv": 100, "purchases": 9}, "new"),
    ({"ltv": 600, "purchases": 3, "churn_risk": 0.9}, "growth"),  # first match wins over at_risk
    ({"ltv": 600, "purchases": 1, "churn_risk": 0.41}, "at_risk"),
    ({"churn_risk": 0.4}, "new"),
])
def test_default_rules_boundaries_and_order(rules, kw: dict, cluster: str) -> None:
    assert assign_cluster(feat(**kw), rules) == cluster


def test_operator_rules_file_with_text_conditions(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({
        "rules": [
            {"cluster": "enterprise", "all": [{"feature": "plan", "op": "in", "value": ["enterprise", "pro"]}]},
            {"cluster": "not_free", "all": [{"feature": "plan", "op": "!=", "value": "free"},
                                            {"feature": "web_sessions", "op": ">=", "value": 1}]},
        ],
        "default": "rest",
    }))
    rules = load_rules(path)
    assert rules.clusters == ["enterprise", "not_free", "rest"]
    assert assign_cluster(feat(plan="pro"), rules) == "enterprise"
    assert assign_cluster(feat(plan="starter", web_sessions=1), rules) == "not_free"
    assert assign_cluster(feat(plan="free", web_sessions=5), rules) == "rest"
    assert assign_cluster(feat(plan=None, web_sessions=5), rules) == "rest"  # no value: no condition holds


def good() -> dict:
    return {"rules": [{"cluster": "a", "all": [{"feature": "ltv", "op": ">", "value": 1}]}], "default": "b"}


def broken(path: list, value) -> dict:
    data = good()
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


COND = ["rules", 0, "all", 0]


@pytest.mark.parametrize(("data", "fragment"), [
    ([], "rules file must be an object"),
    (broken(["default"], KeyError), "rules file is missing ['default']"),
    (broken(["extra"], 1), "unknown key(s) ['extra']"),
    (broken(["rules"], {}), "'rules' must be a list"),
    (broken(["default"], "has space"), "default must be 1-64 letters"),
    (broken(["rules", 0, "cluster"], ""), "rules[0].cluster must be"),
    (broken(["rules", 0, "all"], []), "rules[0].all must be a non-empty list"),
    (broken(["rules", 0, "any"], []), "rules[0] has unknown key(s) ['any']"),
    (broken([*COND, "feature"], "ltv; import os"), "rules[0].all[0].feature 'ltv; import os' is unknown"),
    (broken([*COND, "op"], "=>"), "rules[0].all[0].op '=>' is not valid for number 'ltv'"),
    (broken([*COND, "op"], ["<"]), "'feature' and 'op' must be strings"),
    (broken([*COND, "value"], "500"), "rules[0].all[0].value must be a finite number"),
    (broken([*COND, "value"], True), "must be a finite number"),
    (broken(COND, {"feature": "plan", "op": ">", "value": "pro"}), "op '>' is not valid for text 'plan'"),
    (broken(COND, {"feature": "plan", "op": "in", "value": "pro"}), "must be a list of strings"),
    (broken(COND, {"feature": "plan", "op": "==", "value": 3}), "must be a string for 'plan'"),
    (broken(COND, {"feature": "plan", "op": "=="}), "rules[0].all[0] is missing ['value']"),
])
def test_invalid_rules_are_rejected_with_their_position(data, fragment: str) -> None:
    with pytest.raises(RulesError) as err:
        parse_rules(data)
    assert fragment in str(err.value)


@pytest.mark.parametrize(("names", "default"), [(["VIP_a", "vip_a"], "new"), (["high-value_customers"], "high_value")])
def test_clusters_that_would_share_a_persona_name_are_rejected(names: list[str], default: str) -> None:
    """A cluster's persona is found again by its name (the cluster's label and the space): two clusters of one
    label would share one persona, each overwriting the other's figures."""
    data = {"rules": [{"cluster": n, "all": [{"feature": "ltv", "op": ">", "value": 0}]} for n in names],
            "default": default}
    with pytest.raises(RulesError, match="would both be named"):
        parse_rules(data)
    assert label("VIP_a") == "Vip a" and label("high_value") == "High-value customers"


def test_unreadable_rules_files(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read rules file"):
        load_rules(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"rules": [,]}')
    with pytest.raises(RulesError, match="not valid JSON"):
        load_rules(bad)
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps(broken(["default"], KeyError)))
    with pytest.raises(RulesError, match=r"invalid\.json: rules file is missing"):
        load_rules(invalid)


def test_summary_top_three_industries_and_plans_ties_by_name(rules) -> None:
    members = [feat(industry=i, plan=p) for i, p in
               [("b", "x"), ("a", "x"), ("c", "y"), ("d", None), ("b", None), ("a", None), ("c", None)]]
    s = summarize_clusters(members, rules)["new"]
    assert s["n"] == 7
    assert s["industries"] == ["a", "b", "c"]  # a, b, c have 2 each; d has 1
    assert s["plans"] == ["x", "y"]  # profiles without a plan are not counted


def test_empty_clusters_are_left_out(rules) -> None:
    assert summarize_clusters([], rules) == {}
    assert list(summarize_clusters([feat(churn_risk=0.9)], rules)) == ["at_risk"]
