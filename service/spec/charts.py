"""Chart geometry for the console's server-drawn SVG (pure): numbers in, rectangles and labels out.

The console draws its charts as inline SVG from these shapes, so a page needs no JavaScript, no chart library and
nothing fetched at run time. Colours are not chosen here: every shape carries the name of its series, which the
style sheet maps to a colour, and a ``title`` (the tooltip and what a screen reader announces).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    series: str  # the field it stands for: a CSS class picks its colour
    title: str


@dataclass(frozen=True)
class Tick:
    at: float  # y of a horizontal grid line, or x of a column label
    label: str


@dataclass(frozen=True)
class StackedBars:
    """Columns of stacked bars in a ``width`` x ``height`` box (``plot_left`` and ``plot_bottom`` leave room for
    the labels)."""

    width: int
    height: int
    plot_left: float
    plot_bottom: float
    bars: tuple[Bar, ...]
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]
    peak: float  # the tallest column's total, in the chart's unit


@dataclass(frozen=True)
class Segment:
    """One part of a 100 % bar: where it starts and how wide it is, in percent."""

    series: str
    start_pct: float
    width_pct: float
    value: float
    share_pct: float


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 x 10^k at or above ``value`` (1 for nothing): a y axis that reads easily."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power * (1 + 1e-9):
            return float(step * power)
    return float(10 * power)  # not reached


def number_label(value: float) -> str:
    """A short axis label: 0, 0.5, 12, 1.5k, 2M."""
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}".rstrip("0").rstrip(".") + suffix
    return f"{value:.2f}".rstrip("0").rstrip(".") if value else "0"


def stacked_bars(columns: Sequence[Mapping[str, float]], fields: Sequence[str], labels: Sequence[str],
                 width: int = 720, height: int = 220, scale: float = 1.0, unit: str = "",
                 x_labels: Mapping[int, str] | None = None) -> StackedBars:
    """One column per item of ``columns`` (oldest first), ``fields`` stacked bottom up, each value divided by
    ``scale`` (60: counts per minute shown as per second). ``labels[i]`` names column i in its bars' titles;
    ``x_labels`` puts a label under some columns (index -> text)."""
    left, bottom, top = 44.0, 22.0, 8.0
    plot_w, plot_h = width - left - 4.0, height - bottom - top
    totals = [sum(float(c.get(f, 0)) for f in fields) / scale for c in columns]
    peak = max(totals, default=0.0)
    ceiling = nice_ceiling(peak)
    slot = plot_w / max(len(columns), 1)
    gap = min(2.0, slot * 0.2)
    bars: list[Bar] = []
    for i, column in enumerate(columns):
        y = top + plot_h
        for f in fields:
            value = float(column.get(f, 0)) / scale
            if value <= 0:
                continue
            h = value / ceiling * plot_h
            y -= h
            bars.append(Bar(round(left + i * slot + gap / 2, 2), round(y, 2), round(slot - gap, 2), round(h, 2), f,
                            f"{labels[i]}: {number_label(value)}{unit} {f}"))
    y_ticks = tuple(Tick(round(top + plot_h - k / 4 * plot_h, 2), number_label(ceiling * k / 4)) for k in range(5))
    x_ticks = tuple(Tick(round(left + (i + 0.5) * slot, 2), text) for i, text in sorted((x_labels or {}).items()))
    return StackedBars(width, height, left, top + plot_h, tuple(bars), y_ticks, x_ticks, peak)


def shares(values: Mapping[str, float], fields: Sequence[str]) -> tuple[Segment, ...]:
    """``values`` as parts of a 100 % bar, in ``fields`` order; empty parts are left out (all empty: none)."""
    total = sum(max(float(values.get(f, 0)), 0.0) for f in fields)
    if total <= 0:
        return ()
    out, start = [], 0.0
    for f in fields:
        v = max(float(values.get(f, 0)), 0.0)
        if v <= 0:
            continue
        pct = 100 * v / total
        out.append(Segment(f, round(start, 3), round(pct, 3), v, round(pct, 1)))
        start += pct
    return tuple(out)
