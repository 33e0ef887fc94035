"""The cluster KPI cards (``POST /api/v1/segment_cluster_profiles`` and the personas): pure maths over exact
per-cluster totals.

Both the batch endpoint (``cluster_kpis`` over a request body) and the incremental path (``workers.compute.aggregates``)
reduce their input to ``ClusterTotals`` and call ``kpi_cards``, so the two produce identical numbers. Money is held
in integer cents and every average, median and share is rounded from an exact ratio (half up, 2 decimals), so the
result does not depend on the order in which customers were added.

Choices (the KPI API's specification leaves them open):
- ``top_categories``: TF-IDF with each cluster as one document. tf = number of the cluster's customers whose
  ``product_types`` contain the category (a category listed twice by one customer counts once);
  idf = ln((1 + D) / (1 + df)) + 1 (smoothed, as scikit-learn) with D = number of clusters and df = clusters
  containing the category. Top 5 by score descending, ties by name ascending; joined with ", " as in the
  specification's example.
- ``insight``: the documented rule (avg_spend > population mean AND share >= 30 %) by default. The specification's
  worked example follows "share >= 30 %" alone; ``InsightRule(require_above_mean=False)`` reproduces it.
  Both comparisons use exact values, not the rounded figures.
- A customer without a label is rejected (dropping it would silently change every share of revenue).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction
from typing import Any

TOP_CATEGORIES = 5
MAX_VALUE = 1e9  # per customer; keeps every stored sum far inside 64-bit integers (JSON encoders' limit)
RETENTION = "Focus on retention & upsell"
GROWTH = "Growth-potential segment"


class BadRequest(ValueError):
    """A request body the KPI endpoint cannot use; ``message`` is safe to show the caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class InsightRule:
    """Thresholds of the insight narrative, so an operator can match the specification's worked example or the
    documented rule."""

    min_share_pct: float = 30.0
    require_above_mean: bool = True
    retention_text: str = RETENTION
    growth_text: str = GROWTH


@dataclass(frozen=True)
class Customer:
    id: str
    frequency: int
    amount_spent: float
    product_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClusterTotals:
    """Everything a KPI card needs about one cluster, in exact integers."""

    cluster_id: Any
    n: int
    spend_cents: int
    frequency: int
    spend_counts: Mapping[int, int]  # spend in cents -> how many customers spent exactly that
    category_counts: Mapping[str, int] = field(default_factory=dict)  # category -> customers having it
    median_x2: int | None = None  # twice the median when already known (then spend_counts may be empty)


_POW10: tuple[int, ...] = tuple(10**i for i in range(7))


def to_cents(amount: float) -> int:
    """Money to integer cents, half up on the shortest decimal form (so 1.005 -> 101, as a person would expect)."""
    return scaled(amount, 2)


def scaled(amount: float, places: int) -> int:
    """``amount * 10**places`` as an integer, rounded half up on the shortest decimal form of ``amount``.

    Most values need no rounding (at most ``places`` decimals): a full recompute calls this a few million times, so
    those are found without text at all. ``k = round(amount * 10**places)`` is the answer exactly when ``k /
    10**places`` (a correctly rounded division) gives ``amount`` back and ``|amount| < 1e9``: below that, two
    numbers of ``places`` <= 6 decimals never share a float and the product's error stays far under 0.5. The
    rest are read off the shortest text, or go through ``Decimal``."""
    amount = float(amount)
    if -1e9 <= amount <= 1e9 and places <= 6:  # NaN fails the comparison
        k = round(amount * _POW10[places])
        if k / _POW10[places] == amount:
            return k
    text = repr(amount)
    whole, dot, frac = text.partition(".")
    if dot and len(frac) <= places and frac.isdigit() and whole.lstrip("-").isdigit():
        return int(whole + frac.ljust(places, "0"))
    return _scaled_exact(text, places)


def _scaled_exact(text: str, places: int) -> int:
    with localcontext() as ctx:
        ctx.prec = 400  # any finite float fits
        return int(Decimal(text).scaleb(places).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def round_ratio(num: int, den: int, places: int = 2) -> float:
    """``num / den`` rounded half up to ``places`` decimals, computed exactly in integers."""
    if den == 0:
        return 0.0
    if den < 0:
        num, den = -num, -den
    scale: int = 10**places
    q = (2 * abs(num) * scale + den) // (2 * den)
    return (q if num >= 0 else -q) / scale


def median_cents_x2(spend_counts: Mapping[int, int], n: int) -> int:
    """Twice the median (so an even-sized median stays an integer) from a value -> count multiset."""
    if n <= 0:
        return 0
    lo_rank, hi_rank = (n - 1) // 2, n // 2
    seen, lo = 0, None
    for value in sorted(spend_counts):
        seen += spend_counts[value]
        if lo is None and seen > lo_rank:
            lo = value
        if seen > hi_rank:
            assert lo is not None  # lo_rank <= hi_rank: set at this value or before
            return lo + value
    raise ValueError("spend counts do not add up to n")


def top_categories(totals: Sequence[ClusterTotals], k: int = TOP_CATEGORIES) -> dict[Any, list[str]]:
    """Top ``k`` categories per cluster by TF-IDF (each cluster one document); see the module docstring."""
    docs = [t for t in totals if t.n > 0]
    df = Counter(cat for t in docs for cat, c in t.category_counts.items() if c > 0)
    n_docs = len(docs)
    out: dict[Any, list[str]] = {}
    for t in docs:
        scored = [(-(c * (math.log((1 + n_docs) / (1 + df[cat])) + 1)), cat)
                  for cat, c in t.category_counts.items() if c > 0]
        out[t.cluster_id] = [cat for _, cat in sorted(scored)[:k]]
    return out


def _label_key(label: Any) -> tuple[int, Any]:
    return (0, label) if isinstance(label, int) else (1, str(label))


def kpi_cards(totals: Sequence[ClusterTotals], insight_rule: InsightRule | None = None) -> dict[str, Any]:
    """The KPI API's response ``{"cluster_profiles": [...]}`` for every non-empty cluster, ordered by cluster id."""
    rule = insight_rule or InsightRule()
    live = sorted((t for t in totals if t.n > 0), key=lambda t: _label_key(t.cluster_id))
    pop_n = sum(t.n for t in live)
    pop_cents = sum(t.spend_cents for t in live)
    tops = top_categories(live)
    min_share = Fraction(str(rule.min_share_pct))
    cards = []
    for t in live:
        share = Fraction(t.spend_cents * 100, pop_cents) if pop_cents else Fraction(0)
        above_mean = t.spend_cents * pop_n > pop_cents * t.n  # avg_spend > population mean, exactly
        retention = share >= min_share and (above_mean or not rule.require_above_mean)
        cards.append({
            "cluster_id": t.cluster_id,
            "n_customers": t.n,
            "avg_spend": round_ratio(t.spend_cents, t.n * 100),
            "median_spend": round_ratio(t.median_x2 if t.median_x2 is not None
                                        else median_cents_x2(t.spend_counts, t.n), 200),
            "avg_frequency": round_ratio(t.frequency, t.n),
            "top_categories": ", ".join(tops[t.cluster_id]),
            "share_of_revenue_pct": round_ratio(share.numerator, share.denominator),
            "insight": rule.retention_text if retention else rule.growth_text,
        })
    return {"cluster_profiles": cards}


def totals_from_customers(customers: Sequence[Customer], labels: Mapping[str, Any]) -> list[ClusterTotals]:
    """Group validated customers by label into exact totals."""
    groups: dict[Any, list[Customer]] = {}
    for c in customers:
        groups.setdefault(labels[c.id], []).append(c)
    out = []
    for label, members in groups.items():
        cents = [to_cents(c.amount_spent) for c in members]
        out.append(ClusterTotals(
            cluster_id=label, n=len(members), spend_cents=sum(cents), frequency=sum(c.frequency for c in members),
            spend_counts=Counter(cents), category_counts=Counter(p for c in members for p in set(c.product_types)),
        ))
    return out


def cluster_kpis(customers: Sequence[Customer], labels: Mapping[str, Any],
                 insight_rule: InsightRule | None = None) -> dict[str, Any]:
    """KPI cards for a validated request (see ``validate_request``)."""
    return kpi_cards(totals_from_customers(customers, labels), insight_rule)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{where} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise BadRequest(f"{where} must be finite")
    if value < 0:
        raise BadRequest(f"{where} must not be negative")
    if value > MAX_VALUE:
        raise BadRequest(f"{where} is out of range (at most {MAX_VALUE:.0f})")
    return value


def _customer(raw: Any, i: int) -> Customer:
    where = f"customers[{i}]"
    if not isinstance(raw, dict):
        raise BadRequest(f"{where} must be an object")
    for key in ("id", "frequency", "amount_spent", "product_types"):
        if key not in raw:
            raise BadRequest(f"{where} is missing '{key}'")
    cid = raw["id"]
    if not isinstance(cid, str) or not cid.strip():
        raise BadRequest(f"{where}.id must be a non-empty string")
    freq = _number(raw["frequency"], f"{where}.frequency")
    if freq != int(freq):
        raise BadRequest(f"{where}.frequency must be a whole number of orders")
    spent = _number(raw["amount_spent"], f"{where}.amount_spent")
    types = raw["product_types"]
    if not isinstance(types, list) or not all(isinstance(p, str) and p.strip() for p in types):
        raise BadRequest(f"{where}.product_types must be a list of non-empty strings")
    return Customer(cid, int(freq), float(spent), tuple(p.strip() for p in types))


def validate_request(body: Any) -> tuple[list[Customer], dict[str, Any]]:
    """Check a seed-004 request body; raise ``BadRequest`` naming the first problem found."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object with 'customers' and 'labels'")
    raw_customers, labels = body.get("customers"), body.get("labels")
    if not isinstance(raw_customers, list) or not raw_customers:
        raise BadRequest("'customers' must be a non-empty list")
    if not isinstance(labels, dict) or not labels:
        raise BadRequest("'labels' must be a non-empty object mapping customer id to cluster id")
    customers, seen = [], set()
    for i, raw in enumerate(raw_customers):
        c = _customer(raw, i)
        if c.id in seen:
            raise BadRequest(f"duplicate customer id '{c.id}'")
        seen.add(c.id)
        customers.append(c)
    for cid, label in labels.items():
        if cid not in seen:
            raise BadRequest(f"labels names unknown customer '{cid}'")
        if isinstance(label, bool) or not isinstance(label, int | str):
            raise BadRequest(f"label of '{cid}' must be an integer or a string")
    missing = [c.id for c in customers if c.id not in labels]
    if missing:
        raise BadRequest(f"customer '{missing[0]}' has no label ({len(missing)} unlabelled in total)")
    return customers, dict(labels)
