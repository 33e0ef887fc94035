"""Trait clusters: operator-editable rules in ``cluster_rules.json`` and the per-cluster summary.

The rules file is data, never code: each rule is a cluster name and a list of conditions that must all hold,
tried in order (first match wins), with a ``default`` cluster for everything else. A condition compares one
feature with a constant::

    {"feature": "ltv", "op": ">", "value": 500}
    {"feature": "plan", "op": "in", "value": ["pro", "enterprise"]}

Numeric features take ``> >= < <= == !=`` and a number; text features take ``== !=`` and a string, or
``in`` / ``not_in`` and a list of strings. A profile without a value for a text feature satisfies no condition on
it. Unknown keys, features and operators are rejected with a message naming where they are.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.compute.aggregates import GroupAggregate, contribution_from_features
from workers.compute.features import Features

DEFAULT_RULES_PATH = Path(__file__).with_name("cluster_rules.json")
NUMERIC = ("ltv", "purchases", "churn_risk", "spend", "frequency", "web_sessions", "mobile_sessions",
           "email_sessions", "identifier_count")
TEXT = ("plan", "industry", "engagement_tier")
NUMERIC_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
}
TEXT_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "in": lambda a, b: a in b, "not_in": lambda a, b: a not in b,
}
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class RulesError(ValueError):
    """The rules file is unusable; the message says where and why."""


@dataclass(frozen=True)
class Condition:
    feature: str
    op: str
    value: Any

    @property
    def test(self) -> Callable[[Any, Any], bool]:
        """The comparison ``op`` names for this feature's kind; a condition holds when the feature has a value and
        ``test(value, self.value)`` is true (``assign_cluster``)."""
        return (NUMERIC_OPS if self.feature in NUMERIC else TEXT_OPS)[self.op]


@dataclass(frozen=True)
class Rule:
    cluster: str
    all: tuple[Condition, ...]


@dataclass(frozen=True)
class Rules:
    rules: tuple[Rule, ...]
    default: str
    # (cluster, ((feature, test, value), ...)) per rule, resolved once: ``assign_cluster`` runs for every profile
    plan: tuple[tuple[str, tuple[tuple[str, Callable[[Any, Any], bool], Any], ...]], ...] = field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plan", tuple((r.cluster, tuple((c.feature, c.test, c.value) for c in r.all))
                                               for r in self.rules))

    @property
    def clusters(self) -> list[str]:
        """Every cluster a profile can land in, in rule order, default last."""
        names = [r.cluster for r in self.rules] + [self.default]
        return list(dict.fromkeys(names))


def _keys(obj: Any, where: str, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise RulesError(f"{where} must be an object")
    unknown = set(obj) - required - optional
    if unknown:
        raise RulesError(f"{where} has unknown key(s) {sorted(unknown)}; allowed: {sorted(required | optional)}")
    missing = required - set(obj)
    if missing:
        raise RulesError(f"{where} is missing {sorted(missing)}")
    return obj


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise RulesError(f"{where} must be 1-64 letters, digits, '_' or '-', got {value!r}")
    return value


def _condition(obj: Any, where: str) -> Condition:
    c = _keys(obj, where, {"feature", "op", "value"}, {"description"})
    feature, op, value = c["feature"], c["op"], c["value"]
    if not isinstance(feature, str) or not isinstance(op, str):
        raise RulesError(f"{where}: 'feature' and 'op' must be strings")
    if feature in NUMERIC:
        if op not in NUMERIC_OPS:
            raise RulesError(f"{where}.op {op!r} is not valid for number '{feature}'; use one of {list(NUMERIC_OPS)}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RulesError(f"{where}.value must be a finite number for '{feature}', got {value!r}")
    elif feature in TEXT:
        if op not in TEXT_OPS:
            raise RulesError(f"{where}.op {op!r} is not valid for text '{feature}'; use one of {list(TEXT_OPS)}")
        if op in ("in", "not_in"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise RulesError(f"{where}.value must be a list of strings for '{op}'")
            value = tuple(value)
        elif not isinstance(value, str):
            raise RulesError(f"{where}.value must be a string for '{feature}', got {value!r}")
    else:
        raise RulesError(f"{where}.feature {feature!r} is unknown; use one of {list(NUMERIC + TEXT)}")
    return Condition(feature, op, value)


LABELS = {"high_value": "High-value customers", "growth": "Growth customers", "at_risk": "At-risk customers",
          "new": "New customers"}


def label(cluster: str) -> str:
    """What a cluster is called where people read it, and in its Mavera persona's name."""
    return LABELS.get(cluster, cluster.replace("_", " ").capitalize())


def parse_rules(data: Any) -> Rules:
    """Validate decoded JSON into ``Rules``; raises ``RulesError`` with the position of the first problem."""
    top = _keys(data, "rules file", {"rules", "default"}, {"description"})
    if not isinstance(top["rules"], list):
        raise RulesError("'rules' must be a list")
    rules = []
    for i, raw in enumerate(top["rules"]):
        where = f"rules[{i}]"
        r = _keys(raw, where, {"cluster", "all"}, {"description"})
        if not isinstance(r["all"], list) or not r["all"]:
            raise RulesError(f"{where}.all must be a non-empty list of conditions (use 'default' for a catch-all)")
        conditions = tuple(_condition(c, f"{where}.all[{j}]") for j, c in enumerate(r["all"]))
        rules.append(Rule(_name(r["cluster"], f"{where}.cluster"), conditions))
    parsed = Rules(tuple(rules), _name(top["default"], "default"))
    named: dict[str, str] = {}
    for cluster in parsed.clusters:  # a persona is found again by its name: one name, one cluster
        other = named.setdefault(label(cluster), cluster)
        if other != cluster:
            raise RulesError(f"clusters {other!r} and {cluster!r} would both be named {label(cluster)!r}, and share "
                             "one Mavera persona: rename one")
    return parsed


def load_rules(path: str | Path | None = None) -> Rules:
    """Read and validate a rules file (default: ``workers/compute/cluster_rules.json``)."""
    p = Path(path) if path is not None else DEFAULT_RULES_PATH
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RulesError(f"cannot read rules file {p}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RulesError(f"rules file {p} is not valid JSON: {exc}") from None
    try:
        return parse_rules(data)
    except RulesError as exc:
        raise RulesError(f"{p}: {exc}") from None


def assign_cluster(features: Features, rules: Rules) -> str:
    """The first rule whose conditions all hold names the cluster; otherwise the default (over the resolved
    ``Rules.plan``)."""
    for cluster, conditions in rules.plan:
        for feature, test, value in conditions:
            actual = getattr(features, feature)
            if actual is None or not test(actual, value):
                break
        else:
            return cluster
    return rules.default


def cluster_groups(features: Iterable[Features], rules: Rules) -> dict[str, GroupAggregate]:
    """Aggregates per cluster built from scratch (only clusters with members appear)."""
    groups: dict[str, GroupAggregate] = {}
    for f in features:
        groups.setdefault(assign_cluster(f, rules), GroupAggregate()).add(contribution_from_features(f))
    return groups


def summarize_clusters(features: Iterable[Features], rules: Rules) -> dict[str, dict[str, Any]]:
    """The summary (N, avg ltv / purchases / churn, top 3 industries and plans) per non-empty cluster,
    in rule order."""
    groups = cluster_groups(features, rules)
    summaries = {name: groups[name].cluster_summary(name) for name in rules.clusters if name in groups}
    return {name: summary for name, summary in summaries.items() if summary is not None}  # groups have members
