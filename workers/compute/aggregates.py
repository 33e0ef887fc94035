"""Incremental per-group aggregates (a group is a cluster or a channel pattern).

A refresh moves one profile's ``Contribution`` out of its old group (``remove``) and into its new one (``add``)
instead of re-reading every profile. Everything is held in integers (money in cents, churn in millionths, a
spend -> count multiset for the exact median, category -> number of profiles having it), so any sequence of adds
and removes ends in exactly the aggregate a from-scratch build of the remaining contributions gives, and the
seed-000 summary, seed-001 pattern summary and seed-004 KPI card computed from it are identical too.

Averages are rounded half up from exact ratios: money and counts to 2 decimals, churn to 4.
Top plans / industries: count descending, then name ascending; profiles without a value are not counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from service.spec import kpis
from workers.compute.features import Features

CHURN_SCALE = 1_000_000
TOP_N = 3
_SUMS = ("ltv_cents", "purchases", "churn_ppm", "spend_cents", "frequency",
         "web_sessions", "mobile_sessions", "email_sessions", "identifier_count")
_COUNTERS = ("spend_counts", "categories", "plans", "industries")


class AggregateError(ValueError):
    """A remove that does not match what was added, or stored JSON that is not an aggregate: rebuild from scratch."""


@dataclass(frozen=True)
class Contribution:
    """One profile's share of a group aggregate; stored per profile so it can be removed later."""

    ltv_cents: int = 0
    purchases: int = 0
    churn_ppm: int = 0
    spend_cents: int = 0
    frequency: int = 0
    web_sessions: int = 0
    mobile_sessions: int = 0
    email_sessions: int = 0
    identifier_count: int = 0
    categories: tuple[str, ...] = ()
    plan: str | None = None
    industry: str | None = None

    def __post_init__(self) -> None:  # one canonical form, so a JSON round trip compares equal
        object.__setattr__(self, "categories", tuple(sorted(set(self.categories))))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {name: getattr(self, name) for name in _SUMS}
        d.update(categories=list(self.categories), plan=self.plan, industry=self.industry)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Contribution:
        """Strict inverse of ``to_dict``: a contribution we cannot trust must not be subtracted."""
        if not isinstance(d, Mapping):
            raise AggregateError("contribution must be an object")
        values: dict[str, Any] = {}
        for name in _SUMS:
            v = d.get(name, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise AggregateError(f"contribution.{name} must be a non-negative integer")
            values[name] = v
        cats = d.get("categories", [])
        if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
            raise AggregateError("contribution.categories must be a list of strings")
        for name in ("plan", "industry"):
            if d.get(name) is not None and not isinstance(d.get(name), str):
                raise AggregateError(f"contribution.{name} must be a string or null")
        return cls(**values, categories=tuple(cats), plan=d.get("plan"), industry=d.get("industry"))


def contribution_from_features(f: Features) -> Contribution:
    """The integer form of the features the aggregates need."""
    return Contribution(
        ltv_cents=kpis.to_cents(f.ltv), purchases=f.purchases, churn_ppm=kpis.scaled(f.churn_risk, 6),
        spend_cents=kpis.to_cents(f.spend), frequency=f.frequency,
        web_sessions=f.web_sessions, mobile_sessions=f.mobile_sessions, email_sessions=f.email_sessions,
        identifier_count=f.identifier_count, categories=f.categories,
        plan=f.plan, industry=f.industry,
    )


def _top(counter: Mapping[str, int], n: int = TOP_N) -> list[str]:
    return [k for k, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


@dataclass
class GroupAggregate:
    n: int = 0
    ltv_cents: int = 0
    purchases: int = 0
    churn_ppm: int = 0
    spend_cents: int = 0
    frequency: int = 0
    web_sessions: int = 0
    mobile_sessions: int = 0
    email_sessions: int = 0
    identifier_count: int = 0
    spend_counts: dict[int, int] = field(default_factory=dict)
    categories: dict[str, int] = field(default_factory=dict)
    plans: dict[str, int] = field(default_factory=dict)
    industries: dict[str, int] = field(default_factory=dict)
    # Stored aggregates leave the spend histogram out (it grows with the distinct spend values and a refresh would
    # parse and rewrite it every time): the recompute keeps one sorted set per cluster instead and sets the median
    # from it. ``has_histogram`` says whether ``spend_counts`` is kept; ``median_x2`` is twice the median when given.
    has_histogram: bool = field(default=True, compare=False, repr=False)
    median_x2: int | None = field(default=None, compare=False, repr=False)

    @classmethod
    def build(cls, contributions: Iterable[Contribution], histogram: bool = True) -> GroupAggregate:
        agg = cls(has_histogram=histogram)
        for c in contributions:
            agg.add(c)
        return agg

    def _keys(self, c: Contribution) -> list[tuple[str, Any]]:
        keys: list[tuple[str, Any]] = [("spend_counts", c.spend_cents)] if self.has_histogram else []
        keys += [("categories", cat) for cat in set(c.categories)]
        if c.plan:
            keys.append(("plans", c.plan))
        if c.industry:
            keys.append(("industries", c.industry))
        return keys

    def add(self, c: Contribution) -> None:
        # The sums of ``_SUMS`` spelt out (a full recompute adds every profile twice; a test keeps them in step)
        self.n += 1
        self.ltv_cents += c.ltv_cents
        self.purchases += c.purchases
        self.churn_ppm += c.churn_ppm
        self.spend_cents += c.spend_cents
        self.frequency += c.frequency
        self.web_sessions += c.web_sessions
        self.mobile_sessions += c.mobile_sessions
        self.email_sessions += c.email_sessions
        self.identifier_count += c.identifier_count
        if self.has_histogram:
            self.spend_counts[c.spend_cents] = self.spend_counts.get(c.spend_cents, 0) + 1
        if c.categories:
            categories = self.categories
            for cat in c.categories:  # canonical: sorted, no repeats
                categories[cat] = categories.get(cat, 0) + 1
        if c.plan:
            self.plans[c.plan] = self.plans.get(c.plan, 0) + 1
        if c.industry:
            self.industries[c.industry] = self.industries.get(c.industry, 0) + 1

    def remove(self, c: Contribution) -> None:
        """Undo one ``add(c)``; checks everything first so a mismatch leaves the aggregate untouched."""
        keys = self._keys(c)
        if self.n < 1 or any(getattr(self, name) < getattr(c, name) for name in _SUMS) \
                or any(getattr(self, counter).get(key, 0) < 1 for counter, key in keys):
            raise AggregateError("contribution was not part of this aggregate")
        if self.n == 1 and self != GroupAggregate.build([c], self.has_histogram):
            raise AggregateError("last contribution does not match what is left in the aggregate")
        self.n -= 1
        for name in _SUMS:
            setattr(self, name, getattr(self, name) - getattr(c, name))
        for counter, key in keys:
            bucket = getattr(self, counter)
            bucket[key] -= 1
            if bucket[key] == 0:
                del bucket[key]

    def merge(self, other: GroupAggregate) -> None:
        """Add every member of ``other``: the parallel full recompute joins its per-process partial aggregates."""
        self.n += other.n
        for name in _SUMS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if not other.has_histogram:
            self.has_histogram, self.spend_counts = False, {}
        for name in _COUNTERS if self.has_histogram else _COUNTERS[1:]:
            mine = getattr(self, name)
            for k, v in getattr(other, name).items():
                mine[k] = mine.get(k, 0) + v

    def to_dict(self, histogram: bool = True) -> dict[str, Any]:
        """JSON-able form; ``histogram=False`` is the stored form (see ``has_histogram``)."""
        d: dict[str, Any] = {"n": self.n, **{name: getattr(self, name) for name in _SUMS}}
        if histogram:
            if not self.has_histogram:
                raise AggregateError("this aggregate was read without its spend histogram")
            d["spend_counts"] = dict(zip(map(str, self.spend_counts), self.spend_counts.values(), strict=True))
        for name in _COUNTERS[1:]:
            d[name] = dict(getattr(self, name))
        return d

    @classmethod
    def from_dict(cls, d: Any, histogram: bool = True) -> GroupAggregate:
        """Inverse of ``to_dict``; ``histogram=False`` reads the stored form (no spend histogram)."""
        if not isinstance(d, Mapping):
            raise AggregateError("aggregate must be an object")
        agg = cls(has_histogram=histogram)
        for name in ("n", *_SUMS):
            v = d.get(name, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise AggregateError(f"aggregate.{name} must be a non-negative integer")
            setattr(agg, name, v)
        for name in _COUNTERS if histogram else _COUNTERS[1:]:
            raw = d.get(name, {})
            # type() over the values runs at C speed: these maps are large and read on every refresh
            if not isinstance(raw, Mapping) or (raw and (set(map(type, raw.values())) != {int}
                                                         or min(raw.values()) <= 0)):
                raise AggregateError(f"aggregate.{name} must map keys to positive integers")
            try:
                if name == "spend_counts":
                    setattr(agg, name, dict(zip(map(int, raw), raw.values(), strict=True)))
                else:
                    setattr(agg, name, {str(k): v for k, v in raw.items()})
            except ValueError:
                raise AggregateError("aggregate.spend_counts keys must be integers (cents)") from None
        if histogram and sum(agg.spend_counts.values()) != agg.n:
            raise AggregateError("aggregate.spend_counts does not add up to n")
        return agg

    def cluster_summary(self, label: str) -> dict[str, Any] | None:
        """The per-cluster summary (N, average LTV / purchases / churn, top industries and plans); None for an empty
        group."""
        if self.n == 0:
            return None
        return {
            "label": label, "n": self.n,
            "avg_ltv": kpis.round_ratio(self.ltv_cents, self.n * 100),
            "avg_purchases": kpis.round_ratio(self.purchases, self.n),
            "avg_churn": kpis.round_ratio(self.churn_ppm, self.n * CHURN_SCALE, 4),
            "industries": _top(self.industries), "plans": _top(self.plans),
        }

    def pattern_summary(self, label: str) -> dict[str, Any] | None:
        """The per-channel-pattern summary; None for an empty group."""
        if self.n == 0:
            return None
        return {
            "label": label, "n": self.n,
            "avg_ltv": kpis.round_ratio(self.ltv_cents, self.n * 100),
            "avg_web_sessions": kpis.round_ratio(self.web_sessions, self.n),
            "avg_mobile_sessions": kpis.round_ratio(self.mobile_sessions, self.n),
            "avg_email_sessions": kpis.round_ratio(self.email_sessions, self.n),
            "avg_identifiers": kpis.round_ratio(self.identifier_count, self.n),
            "plans": _top(self.plans),
        }

    def kpi_totals(self, cluster_id: Any) -> kpis.ClusterTotals:
        if not self.has_histogram and self.median_x2 is None:
            raise AggregateError(f"the median of {cluster_id!r} is unknown: it was read without its histogram")
        return kpis.ClusterTotals(cluster_id, self.n, self.spend_cents, self.frequency,
                                  dict(self.spend_counts), dict(self.categories), self.median_x2)


def kpi_cards(aggregates: Mapping[Any, GroupAggregate], insight_rule: kpis.InsightRule | None = None) -> dict[str, Any]:
    """The KPI API's response over every group at once (share of revenue and TF-IDF need all of them)."""
    return kpis.kpi_cards([agg.kpi_totals(cid) for cid, agg in aggregates.items()], insight_rule)


def build_groups(assigned: Iterable[tuple[Any, Contribution]]) -> dict[Any, GroupAggregate]:
    """Aggregates from scratch out of ``(group, contribution)`` pairs (the full recompute)."""
    groups: dict[Any, GroupAggregate] = {}
    for group, c in assigned:
        groups.setdefault(group, GroupAggregate()).add(c)
    return groups


def move(groups: dict[Any, GroupAggregate], old: tuple[Any, Contribution] | None,
         new: tuple[Any, Contribution] | None) -> None:
    """Replace one profile's previous ``(group, contribution)`` by its current one (either may be None).

    Groups left empty are dropped, so the dict equals a from-scratch ``build_groups``. On ``AggregateError``
    nothing has changed and the caller should rebuild from scratch.
    """
    if old is not None:
        if old[0] not in groups:
            raise AggregateError(f"group {old[0]!r} has no aggregate")
        groups[old[0]].remove(old[1])
        if groups[old[0]].n == 0:
            del groups[old[0]]
    if new is not None:
        groups.setdefault(new[0], GroupAggregate()).add(new[1])
