"""Inline SVG charts for the results report: axes with round ticks, labels that never collide.

The report must read right at every size of experiment: one look or a hundred, two variants or
eight, a handful of units or millions. So the layout is computed, not fixed: tick values come from
a "nice numbers" rule, only as many date labels are drawn as fit (the first and the last always
inside the frame), a single look is drawn as a point with its interval instead of a line that
needs two points, and the legend wraps. Text widths are estimated from the character count (no
fonts are measured on the server); the estimate is deliberately generous.

Every mark that stands for a number carries `class='mark'`, so a browser test can count them.
No scripts and no external assets: the output is plain SVG inside the HTML.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

PALETTE = ("#1a73e8", "#e8710a", "#9334e6", "#188038", "#d01884", "#12b5cb", "#5f6368", "#b06000")
CHAR_WIDTH = 0.62  # of the font size: a generous average glyph width for system sans-serif fonts
FONT = 11
WIDTH = 480


def text_width(text: str, size: float = FONT) -> float:
    """Estimated rendered width of `text` in pixels."""
    return len(text) * size * CHAR_WIDTH


def fmt_number(value: float | int | None, digits: int = 4) -> str:
    """A number as a person reads it: 49,960 (not 4.996e+04), 0.1235, 1.2e-07 only when tiny."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return "-"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    if magnitude >= 1e-4:
        decimals = max(0, digits - 1 - math.floor(math.log10(magnitude)))
        text = f"{value:,.{decimals}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return f"{value:.{digits - 1}e}"


def fmt_pct(value: float | None, decimals: int = 2, sign: bool = True) -> str:
    """A relative value as a percentage: +1.25%."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{100 * value:{'+' if sign else ''}.{decimals}f}%"


def fmt_p(value: float | None) -> str:
    """A p-value with three significant digits, `<0.001` below that."""
    if value is None or not math.isfinite(value):
        return "-"
    return "<0.001" if value < 0.001 else f"{value:.3g}"


def nice_ticks(lo: float, hi: float, max_ticks: int = 6) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) covering [lo, hi], at most `max_ticks` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        span = abs(lo) * 0.1 or 1.0
        lo, hi = lo - span, hi + span
    max_ticks = max(2, max_ticks)
    raw = (hi - lo) / (max_ticks - 1)
    power = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 2.5, 5, 10):
        step = mult * power
        first_k = math.floor(lo / step + 1e-9)
        last_k = math.ceil(hi / step - 1e-9)
        if last_k - first_k + 1 <= max_ticks:
            break
    ticks = [0.0 if k == 0 else round(k * step, 12) for k in range(first_k, last_k + 1)]
    return ticks


def date_label(value: str, with_year: bool) -> str:
    """'2026-11-05' -> 'Nov 5' (or 'Nov 5 2026'); anything else unchanged."""
    try:
        day = dt.date.fromisoformat(value[:10])
    except ValueError:
        return value
    return f"{day:%b} {day.day}" + (f" {day.year}" if with_year else "")


def pick_labels(positions: Sequence[float], labels: Sequence[str], left: float, right: float,
                size: float = FONT - 1) -> list[tuple[float, str, str]]:
    """Which x labels to draw so that none overlaps another or leaves [left, right].

    Returns (x, anchor, text). The first and the last label are kept; between them an even
    stride; a label is anchored at its start or end when centring it would cross the frame.
    """
    n = len(labels)
    if n == 0:
        return []
    widest = max(text_width(s, size) for s in labels) + 8
    fit = max(1, int((right - left) // widest))
    stride = max(1, math.ceil((n - 1) / max(1, fit - 1))) if n > 1 else 1
    candidates = list(range(0, n, stride))
    if candidates[-1] != n - 1:
        candidates.append(n - 1)
    placed: list[tuple[float, float, float, str, str]] = []  # box start, box end, x, anchor, text
    for i in candidates:
        width = text_width(labels[i], size)
        x, anchor, x0 = positions[i], "middle", positions[i] - width / 2
        if x0 < left:
            x, anchor, x0 = max(x, left), "start", max(x, left)
        elif x0 + width > right:
            x, anchor, x0 = min(x, right), "end", min(x, right) - width
        box = (x0, x0 + width, x, anchor, labels[i])
        # The last label always stays: it displaces earlier ones it would touch.
        while i == n - 1 and len(placed) > 1 and placed[-1][1] + 6 > box[0]:
            placed.pop()
        if placed and placed[-1][1] + 6 > box[0]:
            continue
        placed.append(box)
    return [(x, anchor, text) for _, _, x, anchor, text in placed]


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


@dataclass
class Series:
    """One variant's values along the x categories: (index, value, lower, upper); None = missing."""

    name: str
    points: list[tuple[int, float | None, float | None, float | None]]
    colour: str = PALETTE[0]
    dashed: bool = False      # a bound rather than an estimate: dashed, no markers
    band: bool = True         # draw the interval (band for lines, error bars for points)


@dataclass
class Chart:
    """An x-by-category chart: lines with interval bands, or points with error bars."""

    title: str
    x_labels: list[str]
    series: list[Series]
    y_format: Callable[[float], str] = fmt_number
    style: str = "line"                  # line | points (dodged per series, error bars)
    reference: list[tuple[float, str]] = field(default_factory=list)  # horizontal lines (value, label)
    aria: str = ""
    height: int = 210

    def _legend(self, width: float) -> tuple[list[tuple[float, int, Series]], int]:
        placed: list[tuple[float, int, Series]] = []
        x, row = 0.0, 0
        for s in self.series:
            if s.dashed:
                continue
            w = 14 + text_width(s.name, FONT - 1) + 12
            if x > 0 and x + w > width:
                x, row = 0.0, row + 1
            placed.append((x, row, s))
            x += w
        return placed, (row + 1 if placed else 0)

    def svg(self) -> str:
        values = [v for s in self.series for p in s.points for v in p[1:]
                  if v is not None and math.isfinite(v)]
        if not values or not self.x_labels:
            return ""
        refs = [r for r in self.reference if math.isfinite(r[0])]
        # Zero is always on the axis: effects are read against it, counts from it.
        lo, hi = min([0.0, *values, *(r[0] for r in refs)]), max([0.0, *values, *(r[0] for r in refs)])
        ticks = nice_ticks(lo, hi, 5)
        lo, hi = min(ticks[0], lo), max(ticks[-1], hi)
        tick_text = [self.y_format(t) for t in ticks]
        left = 8 + max(text_width(t, FONT - 1) for t in tick_text)
        right = WIDTH - 12
        legend, rows = self._legend(right - left)
        top = 22 + 15 * rows + 6
        bottom = self.height + 15 * rows - 30
        height = self.height + 15 * rows
        n = len(self.x_labels)
        step = (right - left) / max(n, 1)
        xs = [left + step * (i + 0.5) for i in range(n)] if (n == 1 or self.style == "points") else \
            [left + 6 + (right - left - 12) * i / (n - 1) for i in range(n)]

        def y(v: float) -> float:
            return bottom - (v - lo) / (hi - lo or 1.0) * (bottom - top)

        out = [f"<svg class='chart' width='{WIDTH}' height='{height}' viewBox='0 0 {WIDTH} {height}' role='img' "
               f"aria-label='{_esc(self.aria or self.title)}'>",
               f"<text class='title' x='{left:.1f}' y='14' font-size='{FONT + 1}' font-weight='600'>"
               f"{_esc(self.title)}</text>"]
        for t, label in zip(ticks, tick_text, strict=True):
            out.append(f"<line x1='{left:.1f}' x2='{right:.1f}' y1='{y(t):.1f}' y2='{y(t):.1f}' "
                       f"stroke='{'#888' if t == 0 else '#eee'}'/>")
            out.append(f"<text class='ytick' x='{left - 4:.1f}' y='{y(t) + 3.5:.1f}' font-size='{FONT - 1}' "
                       f"text-anchor='end'>{_esc(label)}</text>")
        for value, label in refs:
            out.append(f"<line x1='{left:.1f}' x2='{right:.1f}' y1='{y(value):.1f}' y2='{y(value):.1f}' "
                       "stroke='#d93025' stroke-dasharray='4 3'/>")
            out.append(f"<text x='{right:.1f}' y='{y(value) - 3:.1f}' font-size='{FONT - 2}' fill='#d93025' "
                       f"text-anchor='end'>{_esc(label)}</text>")
        estimates = [s for s in self.series if not s.dashed]
        for k, s in enumerate(self.series):
            dodge = 0.0
            # Side by side where points of several series share an x (points, or a single look).
            if (self.style == "points" or n == 1) and len(estimates) > 1 and not s.dashed:
                j = estimates.index(s)
                dodge = (j - (len(estimates) - 1) / 2) * min(10.0, step * 0.7 / len(estimates))
            pts = [(xs[i] + dodge, v, lo_v, hi_v) for i, v, lo_v, hi_v in s.points if 0 <= i < n]
            out.append(self._series_svg(s, pts, y, step))
            del k
        for x, anchor, text in pick_labels(xs, self.x_labels, 2.0, WIDTH - 2.0):
            out.append(f"<text class='xtick' x='{x:.1f}' y='{bottom + 19:.1f}' font-size='{FONT - 1}' "
                       f"text-anchor='{anchor}'>{_esc(text)}</text>")
        for x, row, s in legend:
            ly = 30 + 15 * row
            out.append(f"<rect x='{left + x:.1f}' y='{ly - 8}' width='10' height='10' fill='{s.colour}'/>"
                       f"<text class='legend' x='{left + x + 14:.1f}' y='{ly + 1}' font-size='{FONT - 1}'>"
                       f"{_esc(s.name)}</text>")
        out.append("</svg>")
        return "".join(out)

    def _series_svg(self, s: Series, pts: list[tuple[float, float | None, float | None, float | None]],
                    y: Callable[[float], float], step: float) -> str:
        def ok(v: float | None) -> bool:
            return v is not None and math.isfinite(v)

        out: list[str] = []
        line = [(x, v) for x, v, _, _ in pts if ok(v)]
        if s.dashed:
            if len(line) == 1:
                x, v = line[0]
                half = min(20.0, step / 2)
                out.append(f"<line class='mark' x1='{x - half:.1f}' x2='{x + half:.1f}' y1='{y(v):.1f}' "  # type: ignore[arg-type]
                           f"y2='{y(v):.1f}' stroke='{s.colour}' stroke-dasharray='4 3' stroke-width='1.5'/>")  # type: ignore[arg-type]
            elif line:
                out.append(f"<path class='mark' d='{_path([(x, y(v)) for x, v in line])}' stroke='{s.colour}' "  # type: ignore[arg-type]
                           "fill='none' stroke-dasharray='4 3' stroke-width='1.5'/>")
            return "".join(out)
        banded = [(x, lo_v, hi_v) for x, _, lo_v, hi_v in pts if ok(lo_v) and ok(hi_v)]
        if s.band and self.style == "line" and len(banded) >= 2:
            upper = [(x, y(h)) for x, _, h in banded]  # type: ignore[arg-type]
            lower = [(x, y(lo_v)) for x, lo_v, _ in banded][::-1]  # type: ignore[arg-type]
            poly = " ".join(f"{px:.1f},{py:.1f}" for px, py in upper + lower)
            out.append(f"<polygon class='mark band' points='{poly}' fill='{s.colour}' fill-opacity='0.15'/>")
        elif s.band:
            for x, lo_v, hi_v in banded:
                out.append(f"<line class='mark errorbar' x1='{x:.1f}' x2='{x:.1f}' y1='{y(lo_v):.1f}' "  # type: ignore[arg-type]
                           f"y2='{y(hi_v):.1f}' stroke='{s.colour}' stroke-width='2'/>")  # type: ignore[arg-type]
        if self.style == "line" and len(line) >= 2:
            out.append(f"<path class='mark' d='{_path([(x, y(v)) for x, v in line])}' stroke='{s.colour}' "  # type: ignore[arg-type]
                       "fill='none' stroke-width='2'/>")
        radius = 3.5 if len(line) <= 40 else 2
        for x, v in line:
            out.append(f"<circle class='mark' cx='{x:.1f}' cy='{y(v):.1f}' r='{radius}' fill='{s.colour}'>"  # type: ignore[arg-type]
                       f"<title>{_esc(s.name)}: {_esc(self.y_format(v))}</title></circle>")  # type: ignore[arg-type]
        return "".join(out)


def _path(points: list[tuple[float, float]]) -> str:
    return " ".join(f"{'M' if i == 0 else 'L'}{px:.1f},{py:.1f}" for i, (px, py) in enumerate(points))


@dataclass
class IntervalRow:
    """One treatment's estimate and interval on a horizontal axis."""

    label: str
    value: float
    lower: float | None
    upper: float | None
    colour: str


def interval_chart(rows: list[IntervalRow], *, margin: float | None = None, title: str = "relative effect",
                   x_format: Callable[[float], str] = fmt_pct) -> str:
    """Each treatment's estimate with its interval, the zero line and, for guardrails, the margin."""
    if not rows:
        return ""
    values = [0.0] + [v for r in rows for v in (r.value, r.lower, r.upper) if v is not None and math.isfinite(v)]
    if margin is not None and math.isfinite(margin):
        values.append(margin)
    left = 10 + max(text_width(r.label, FONT) for r in rows)
    left = min(left, WIDTH * 0.4)
    right = WIDTH - 14
    max_ticks = max(2, int((right - left) // (text_width("+100.00%", FONT - 1) + 10)))
    ticks = nice_ticks(min(values), max(values), max_ticks)
    lo, hi = ticks[0], ticks[-1]
    row_h, top = 30, 44  # room for the title, then the margin's label above the plot
    height = top + row_h * len(rows) + 26

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo or 1.0) * (right - left)

    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    decimals = max(0, min(4, -math.floor(math.log10(abs(step) * 100)) + 1)) if step else 2

    def tick_fmt(v: float) -> str:
        return x_format(v) if x_format is not fmt_pct else fmt_pct(v, decimals, sign=v != 0)

    base = height - 26
    out = [f"<svg class='chart' width='{WIDTH}' height='{height}' viewBox='0 0 {WIDTH} {height}' role='img' "
           f"aria-label='{_esc(title)}'>",
           f"<text class='title' x='{left:.1f}' y='14' font-size='{FONT + 1}' font-weight='600'>{_esc(title)}</text>"]
    for t in ticks:
        out.append(f"<line x1='{x(t):.1f}' x2='{x(t):.1f}' y1='{top - 8}' y2='{base}' "
                   f"stroke='{'#888' if t == 0 else '#eee'}'/>")
    labels = [tick_fmt(t) for t in ticks]
    for px, anchor, text in pick_labels([x(t) for t in ticks], labels, 2.0, WIDTH - 2.0):
        out.append(f"<text class='xtick' x='{px:.1f}' y='{base + 15}' font-size='{FONT - 1}' "
                   f"text-anchor='{anchor}'>{_esc(text)}</text>")
    if margin is not None and math.isfinite(margin):
        out.append(f"<line x1='{x(margin):.1f}' x2='{x(margin):.1f}' y1='{top - 8}' y2='{base}' stroke='#d93025' "
                   "stroke-dasharray='4 3'/>")
        anchor = "start" if x(margin) < (left + right) / 2 else "end"
        dx = 3 if anchor == "start" else -3
        out.append(f"<text x='{x(margin) + dx:.1f}' y='{top - 10}' font-size='{FONT - 2}' fill='#d93025' "
                   f"text-anchor='{anchor}'>margin {_esc(fmt_pct(margin))}</text>")
    for i, r in enumerate(rows):
        cy = top + row_h * i + row_h / 2
        if r.lower is not None and r.upper is not None and math.isfinite(r.lower) and math.isfinite(r.upper):
            out.append(f"<line class='mark errorbar' x1='{x(r.lower):.1f}' x2='{x(r.upper):.1f}' y1='{cy:.1f}' "
                       f"y2='{cy:.1f}' stroke='{r.colour}' stroke-width='3'/>")
        elif r.lower is None and r.upper is None:  # an unbounded interval: dashed across the whole axis
            out.append(f"<line class='mark unbounded' x1='{left:.1f}' x2='{right:.1f}' y1='{cy:.1f}' y2='{cy:.1f}' "
                       f"stroke='{r.colour}' stroke-width='2' stroke-dasharray='2 3'><title>interval unbounded"
                       "</title></line>")
        out.append(f"<circle class='mark' cx='{x(r.value):.1f}' cy='{cy:.1f}' r='5' fill='{r.colour}'>"
                   f"<title>{_esc(r.label)}: {_esc(x_format(r.value))} [{_esc(x_format(r.lower))}, "
                   f"{_esc(x_format(r.upper))}]</title></circle>")
        label = r.label
        while text_width(label, FONT) > left - 8 and len(label) > 4:
            label = label[:-2] + "…"
        out.append(f"<text class='rowlabel' x='4' y='{cy + 4:.1f}' font-size='{FONT}'>{_esc(label)}</text>")
    out.append("</svg>")
    return "".join(out)
