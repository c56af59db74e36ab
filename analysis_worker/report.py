"""Render a results document as a self-contained HTML report and as a terminal table.

The report has no external assets (inline CSS and SVG, no scripts), so it can be attached to a
ticket, mailed or opened from an object store as is. Charts: per metric, the relative effect of
each treatment with its interval (and the guardrail's margin), the cumulative effect by day with
its interval band, and for group-sequential tests the z statistic against the Lan-DeMets bounds.
Everything shown is read from the document; nothing is recomputed here.
"""

from __future__ import annotations

import html
import math
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1b1f24;
padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:.9rem}.banner{padding:1rem;border-radius:6px;margin:1rem 0;font-size:1.1rem}
.ship{background:#e6f4ea;border:1px solid #34a853}.no-ship{background:#fce8e6;border:1px solid #d93025}
.keep-running{background:#fef7e0;border:1px solid #f9ab00}.error{background:#fce8e6;border:1px solid #d93025}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}th,td{border:1px solid #ddd;padding:.3rem .6rem;
text-align:right}th{background:#f5f5f5}td.l,th.l{text-align:left}.sig{font-weight:600}.bad{color:#d93025}
.good{color:#188038}.charts{display:flex;flex-wrap:wrap;gap:1rem}svg{background:#fff;border:1px solid #eee}
.warn{color:#8a5300}
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:+.2f}%"


def _scale(lo: float, hi: float, a: float, b: float) -> Any:
    span = hi - lo if hi > lo else 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def interval_svg(metric: dict[str, Any]) -> str:
    """Relative effect and interval per treatment, zero line and the guardrail margin."""
    rows = [c for c in metric.get("comparisons", []) if c.get("relative_diff") is not None]
    if not rows:
        return "<p class='warn'>no interval: not enough data</p>"
    width, row_h, left = 460, 34, 110
    height = 40 + row_h * len(rows)
    values = [0.0]
    for c in rows:
        values += [v for v in (c.get("relative_ci_lower"), c.get("relative_ci_upper"), c["relative_diff"])
                   if v is not None]
    if metric.get("role") == "guardrail" and rows[0].get("null_relative_diff") is not None:
        values.append(rows[0]["null_relative_diff"])
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.15 or 0.01
    x = _scale(lo - pad, hi + pad, left, width - 20)
    parts = [f"<svg width='{width}' height='{height}' role='img' aria-label='intervals'>",
             f"<line x1='{x(0):.1f}' y1='10' x2='{x(0):.1f}' y2='{height - 25}' stroke='#888'/>"]
    margin = rows[0].get("null_relative_diff")
    if metric.get("role") == "guardrail" and margin is not None:
        parts.append(f"<line x1='{x(margin):.1f}' y1='10' x2='{x(margin):.1f}' y2='{height - 25}' stroke='#d93025' "
                     "stroke-dasharray='4 3'/><text x='{0:.1f}' y='{1}' font-size='10' fill='#d93025'>margin</text>"
                     .format(x(margin) + 2, 20))
    for i, c in enumerate(rows):
        y = 30 + i * row_h
        colour = "#188038" if c.get("better") else "#d93025" if c.get("worse") else "#1a73e8"
        lo_v, hi_v = c.get("relative_ci_lower"), c.get("relative_ci_upper")
        if lo_v is not None and hi_v is not None:
            parts.append(f"<line x1='{x(lo_v):.1f}' y1='{y}' x2='{x(hi_v):.1f}' y2='{y}' stroke='{colour}' "
                         "stroke-width='3'/>")
        parts.append(f"<circle cx='{x(c['relative_diff']):.1f}' cy='{y}' r='5' fill='{colour}'/>")
        parts.append(f"<text x='5' y='{y + 4}' font-size='12'>{html.escape(c['variant'])}</text>")
    for v in (lo - pad * 0.5, 0.0, hi + pad * 0.5):
        parts.append(f"<text x='{x(v):.1f}' y='{height - 8}' font-size='10' text-anchor='middle'>{_pct(v)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _path(points: list[tuple[float, float]]) -> str:
    return " ".join(f"{'M' if i == 0 else 'L'}{px:.1f},{py:.1f}" for i, (px, py) in enumerate(points))


def cumulative_svg(metric: dict[str, Any], labels: list[str], key: str = "relative") -> str:
    """Cumulative effect by look with its interval band, or the z statistic against the bounds."""
    rows = [r for r in metric.get("cumulative", []) if r.get("relative_diff") is not None]
    if len(rows) < 2:
        return ""
    width, height, left, bottom = 460, 200, 50, 30
    variants = sorted({r["variant"] for r in rows})
    looks = sorted({r["look"] for r in rows})
    x = _scale(min(looks), max(looks), left, width - 15)
    if key == "relative":
        series = {v: [(r["look"], r["relative_diff"], r.get("relative_ci_lower"), r.get("relative_ci_upper"))
                      for r in rows if r["variant"] == v] for v in variants}
        title = "cumulative relative effect"
    else:
        series = {v: [(r["look"], r.get("statistic"), -(r.get("sequential_bound") or math.nan),
                       r.get("sequential_bound")) for r in rows if r["variant"] == v] for v in variants}
        title = "z statistic vs sequential bounds"
    values = [0.0] + [val for pts in series.values() for p in pts for val in p[1:]
                      if val is not None and math.isfinite(val)]
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.1 or 0.01
    y = _scale(lo - pad, hi + pad, height - bottom, 10)
    colours = ["#1a73e8", "#e8710a", "#9334e6", "#188038"]
    parts = [f"<svg width='{width}' height='{height}' role='img' aria-label='{title}'>",
             f"<text x='{left}' y='12' font-size='11'>{title}</text>",
             f"<line x1='{left}' y1='{y(0):.1f}' x2='{width - 15}' y2='{y(0):.1f}' stroke='#888'/>"]
    for n, (variant, pts) in enumerate(series.items()):
        colour = colours[n % len(colours)]
        band = [(x(p[0]), y(p[3])) for p in pts if p[3] is not None and math.isfinite(p[3])]
        band_lo = [(x(p[0]), y(p[2])) for p in pts if p[2] is not None and math.isfinite(p[2])]
        if key == "relative" and band and band_lo:
            poly = " ".join(f"{px:.1f},{py:.1f}" for px, py in band + band_lo[::-1])
            parts.append(f"<polygon points='{poly}' fill='{colour}' fill-opacity='0.15'/>")
        elif band and band_lo:
            parts.append(f"<path d='{_path(band)}' stroke='#d93025' fill='none' stroke-dasharray='4 3'/>")
            parts.append(f"<path d='{_path(band_lo)}' stroke='#d93025' fill='none' stroke-dasharray='4 3'/>")
        line = [(x(p[0]), y(p[1])) for p in pts if p[1] is not None and math.isfinite(p[1])]
        if line:
            parts.append(f"<path d='{_path(line)}' stroke='{colour}' fill='none' stroke-width='2'/>")
        parts.append(f"<text x='{width - 110}' y='{24 + 12 * n}' font-size='10' fill='{colour}'>"
                     f"{html.escape(variant)}</text>")
    fmt = _pct if key == "relative" else (lambda v: f"{v:.1f}")
    for v in (lo, hi):
        parts.append(f"<text x='2' y='{y(v) + 3:.1f}' font-size='9'>{fmt(v)}</text>")
    if labels:
        for look in (looks[0], looks[-1]):
            if look < len(labels):
                parts.append(f"<text x='{x(look):.1f}' y='{height - 10}' font-size='9' text-anchor='middle'>"
                             f"{html.escape(labels[look])}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _comparison_table(metric: dict[str, Any]) -> str:
    head = ("<tr><th class='l'>variant</th><th>n</th><th>mean</th><th>diff</th><th>interval</th><th>relative</th>"
            "<th>relative interval</th><th>p-value</th><th>test</th><th>significant</th></tr>")
    means = {v["variant"]: v for v in metric.get("variants", [])}
    body = []
    control = next(iter(means.values()), None)
    if control is not None:
        body.append(f"<tr><td class='l'>{html.escape(control['variant'])} (control)</td><td>{_fmt(control['n'])}</td>"
                    f"<td>{_fmt(control['mean'])}</td><td colspan='7'></td></tr>")
    for c in metric.get("comparisons", []):
        v = means.get(c["variant"], {})
        cls = "good" if c.get("better") else "bad" if c.get("worse") else ""
        body.append(
            f"<tr class='{cls}'><td class='l'>{html.escape(c['variant'])}</td><td>{_fmt(v.get('n'))}</td>"
            f"<td>{_fmt(v.get('mean'))}</td><td>{_fmt(c.get('diff'))}</td>"
            f"<td>[{_fmt(c.get('ci_lower'))}, {_fmt(c.get('ci_upper'))}]</td><td>{_pct(c.get('relative_diff'))}</td>"
            f"<td>[{_pct(c.get('relative_ci_lower'))}, {_pct(c.get('relative_ci_upper'))}]</td>"
            f"<td>{_fmt(c.get('p_value'), 3)}</td><td>{html.escape(str(c.get('method')))}, "
            f"{html.escape(str(c.get('alternative')))}</td>"
            f"<td class='{'sig' if c.get('significant') else ''}'>{_fmt(c.get('significant'))}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def render_html(document: dict[str, Any]) -> str:
    """The report for one results document."""
    name = html.escape(str(document.get("experiment", "")))
    decision = document.get("decision") or {}
    rec = str(decision.get("recommendation", ""))
    out = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
           f"<title>{name}: experiment results</title><style>{_CSS}</style></head><body>",
           f"<h1>{name}</h1>",
           f"<div class='meta'>flag {_fmt(document.get('flag'))} · computed {_fmt(document.get('computed_at'))} · "
           f"confidence {_fmt(document.get('confidence_level'))} · correction {_fmt(document.get('correction'))}"]
    seq = document.get("sequential")
    if seq:
        out.append(f" · sequential {_fmt(seq.get('method'))} (expected {_fmt(seq.get('expected_n'))} units, "
                   f"information {_pct(seq.get('information_fraction')).lstrip('+')})")
    out.append("</div>")
    if document.get("error"):
        out.append(f"<div class='banner error'><b>Not computed:</b> {html.escape(str(document['error']))}</div>")
    reasons = "".join(f"<li>{html.escape(str(r))}</li>" for r in decision.get("reasons", []))
    out.append(f"<div class='banner {html.escape(rec)}'><b>Recommendation: {html.escape(rec or 'none')}</b>"
               f"<ul>{reasons}</ul></div>")
    srm = document.get("srm")
    if srm:
        status = "<span class='bad'>MISMATCH</span>" if srm.get("mismatch") else "<span class='good'>ok</span>"
        rows = "".join(f"<tr><td class='l'>{html.escape(v)}</td><td>{_fmt(srm['observed'].get(v))}</td>"
                       f"<td>{_fmt(srm['expected'].get(v))}</td><td>{_pct(srm['expected_split'].get(v)).lstrip('+')}"
                       f"</td></tr>" for v in srm.get("observed", {}))
        out.append(f"<h2>Sample ratio check: {status}</h2><p>chi-square p-value {_fmt(srm.get('p_value'), 3)} "
                   f"(mismatch below {_fmt(srm.get('threshold'))})</p><table><tr><th class='l'>variant</th>"
                   f"<th>units</th><th>expected</th><th>expected share</th></tr>{rows}</table>")
    exclusions = document.get("exclusions")
    if exclusions:
        out.append(f"<p class='meta'>excluded units: {_fmt(exclusions.get('multiple_variants'))} exposed to several "
                   f"variants, {_fmt(exclusions.get('unknown_variant'))} to unknown variants; "
                   f"lake rows scanned: {_fmt(document.get('rows_scanned'))}</p>")
    labels = [str(d) for d in document.get("look_dates", [])]
    for metric in document.get("metrics", []):
        role = metric.get("role")
        extra = f", margin {_pct(metric.get('nim')).lstrip('+')}" if role == "guardrail" else ""
        out.append(f"<h2>{html.escape(str(metric.get('metric')))} <span class='meta'>({_fmt(metric.get('kind'))}, "
                   f"{_fmt(role)}, {_fmt(metric.get('direction'))} is better{extra})</span></h2>")
        cuped = metric.get("cuped")
        if cuped:
            reduction = ", ".join(f"{html.escape(k)} {_pct(v).lstrip('+')}"
                                  for k, v in cuped.get("variance_reduction", {}).items())
            out.append(f"<p class='meta'>CUPED theta {_fmt(cuped.get('theta'))}; variance reduction {reduction}</p>")
        out.append(_comparison_table(metric))
        charts = [interval_svg(metric), cumulative_svg(metric, labels)]
        if seq and seq.get("method") == "group-sequential":
            charts.append(cumulative_svg(metric, labels, key="z"))
        out.append(f"<div class='charts'>{''.join(c for c in charts if c)}</div>")
    warnings = document.get("warnings") or []
    if warnings:
        out.append("<h2>Warnings</h2><ul>" + "".join(f"<li class='warn'>{html.escape(str(w))}</li>"
                                                     for w in warnings) + "</ul>")
    out.append("</body></html>\n")
    return "".join(out)


def render_table(document: dict[str, Any]) -> str:
    """A plain-text summary for the terminal: SRM, one line per comparison, the recommendation."""
    lines = [f"experiment {document.get('experiment')}  computed {document.get('computed_at')}"]
    if document.get("error"):
        lines.append(f"ERROR: {document['error']}")
    srm = document.get("srm")
    if srm:
        units = ", ".join(f"{k}={v:,}" for k, v in srm["observed"].items())
        flag = "MISMATCH" if srm["mismatch"] else "ok"
        lines.append(f"units: {units}   SRM p={_fmt(srm.get('p_value'), 3)} {flag}")
    header = f"{'metric':<22} {'role':<9} {'variant':<12} {'control':>11} {'treatment':>11} {'relative':>9} " \
             f"{'interval':>21} {'p-value':>9}  sig"
    rows = []
    for metric in document.get("metrics", []):
        means = {v["variant"]: v for v in metric.get("variants", [])}
        control = next(iter(means.values()), {})
        for c in metric.get("comparisons", []):
            interval = f"[{_pct(c.get('relative_ci_lower'))}, {_pct(c.get('relative_ci_upper'))}]"
            mark = "better" if c.get("better") else "WORSE" if c.get("worse") else "yes" if c.get("significant") else ""
            rows.append(f"{metric['metric'][:22]:<22} {metric['role']:<9} {c['variant'][:12]:<12} "
                        f"{_fmt(control.get('mean')):>11} {_fmt(means.get(c['variant'], {}).get('mean')):>11} "
                        f"{_pct(c.get('relative_diff')):>9} {interval:>21} {_fmt(c.get('p_value'), 3):>9}  {mark}")
    if rows:
        lines += [header, "-" * len(header), *rows]
    decision = document.get("decision") or {}
    lines.append(f"recommendation: {decision.get('recommendation')}")
    lines += [f"  - {r}" for r in decision.get("reasons", [])]
    lines += [f"warning: {w}" for w in document.get("warnings", [])]
    return "\n".join(lines)
