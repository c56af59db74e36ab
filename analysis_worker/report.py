"""Render a results document as a self-contained HTML report and as a terminal table.

The report has no external assets (inline CSS and SVG, no scripts), so it can be attached to a
ticket, mailed or opened from an object store as is. Charts: per metric, the relative effect of
each treatment with its interval (and the guardrail's margin), the cumulative effect by day with
its interval band, and for group-sequential tests the z statistic against the Lan-DeMets bounds.
Everything shown is read from the document; nothing is recomputed here.
"""

from __future__ import annotations

import html
from typing import Any

from analysis_worker.charts import (
    PALETTE,
    Chart,
    IntervalRow,
    Series,
    date_label,
    fmt_number,
    fmt_p,
    fmt_pct,
    interval_chart,
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1b1f24;
padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:.9rem}.banner{padding:1rem;border-radius:6px;margin:1rem 0;font-size:1.1rem}
.ship{background:#e6f4ea;border:1px solid #34a853}.no-ship{background:#fce8e6;border:1px solid #d93025}
.keep-running{background:#fef7e0;border:1px solid #f9ab00}.error{background:#fce8e6;border:1px solid #d93025}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}th,td{border:1px solid #ddd;padding:.3rem .6rem;
text-align:right}th{background:#f5f5f5}td.l,th.l{text-align:left}.sig{font-weight:600}.bad{color:#d93025}
.good{color:#188038}.charts{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
svg{background:#fff;border:1px solid #eee;max-width:100%;height:auto}.warn{color:#8a5300}
.scroll{overflow-x:auto;max-width:100%}nav{font-size:.9rem;margin-bottom:1rem}nav a{margin-right:1rem}
@media (max-width:600px){body{margin:1rem auto;padding:0 .5rem}table{font-size:.8rem}th,td{padding:.2rem .35rem}
.opt{display:none}}
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or isinstance(value, (bool, int, float)):
        return fmt_number(value, digits)
    return html.escape(str(value))


def _pct(value: Any) -> str:
    return fmt_pct(value)


def _relative_interval(c: dict[str, Any]) -> str:
    """The relative interval; null ends mean Fieller's set is unbounded (the control mean may be 0)."""
    lo, hi = c.get("relative_ci_lower"), c.get("relative_ci_upper")
    if lo is None and hi is None and c.get("relative_diff") is not None:
        return "unbounded"
    return f"[{_pct(lo)}, {_pct(hi)}]"


def _colours(document: dict[str, Any]) -> dict[str, str]:
    """One colour per variant, the same in every chart of the report."""
    names = list((document.get("units") or {}).keys())
    for metric in document.get("metrics", []):
        names += [v["variant"] for v in metric.get("variants", []) if v["variant"] not in names]
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(dict.fromkeys(names))}


def _comparisons(metric: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in metric.get("comparisons", []) if c.get("relative_diff") is not None]


def interval_svg(metric: dict[str, Any], colours: dict[str, str] | None = None) -> str:
    """Relative effect and interval per treatment, zero line and the guardrail's margin.

    The interval is the one the document gives beside the verdict (the test's own interval).
    """
    rows = _comparisons(metric)
    if not rows:
        return "<p class='warn'>no interval: not enough data</p>"
    colours = colours or {}
    out = [IntervalRow(label=str(c["variant"]), value=c["relative_diff"], lower=c.get("relative_ci_lower"),
                       upper=c.get("relative_ci_upper"),
                       colour="#188038" if c.get("better") else "#d93025" if c.get("worse")
                       else colours.get(c["variant"], PALETTE[0])) for c in rows]
    margin = rows[0].get("null_relative_diff") if metric.get("role") == "guardrail" else None
    return interval_chart(out, margin=margin, title="relative effect vs control (interval of the test)")


def cumulative_svg(metric: dict[str, Any], labels: list[str], key: str = "relative",
                   colours: dict[str, str] | None = None) -> str:
    """Cumulative effect by look with its interval band, or the z statistic against the bounds.

    With one look the chart is a point with its interval (a line needs two looks).
    """
    rows = [r for r in metric.get("cumulative", []) if r.get("relative_diff") is not None]
    if not rows:
        return ""
    colours = colours or {}
    looks = sorted({r["look"] for r in rows})
    index = {look: i for i, look in enumerate(looks)}
    x_labels = _look_labels(looks, labels)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    series: list[Series] = []
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        colour = colours.get(v, PALETTE[len(series) % len(PALETTE)])
        if key == "relative":
            series.append(Series(v, [(index[r["look"]], r["relative_diff"], r.get("relative_ci_lower"),
                                      r.get("relative_ci_upper")) for r in mine], colour))
        else:
            series.append(Series(v, [(index[r["look"]], r.get("statistic"), None, None) for r in mine], colour,
                                 band=False))
    if key == "relative":
        chart = Chart("cumulative relative effect", x_labels, series, y_format=_axis_pct,
                      aria="cumulative relative effect by day")
    else:
        bound = [(index[r["look"]], r.get("sequential_bound")) for r in rows if r["variant"] == variants[0]]
        series.append(Series("upper bound", [(i, b, None, None) for i, b in bound], "#d93025", dashed=True))
        series.append(Series("lower bound", [(i, -b if b is not None else None, None, None) for i, b in bound],
                             "#d93025", dashed=True))
        chart = Chart("z statistic vs sequential bounds", x_labels, series,
                      y_format=lambda v: f"{v:.1f}", aria="z statistic vs sequential bounds")
    return chart.svg()


def _axis_pct(value: float) -> str:
    return fmt_pct(value, 1 if abs(value) >= 0.001 or value == 0 else 3, sign=value != 0)


def _look_labels(looks: list[int], labels: list[str]) -> list[str]:
    with_year = len({d[:4] for d in labels}) > 1
    return [date_label(labels[k], with_year) if k < len(labels) else f"look {k + 1}" for k in looks]


def daily_effect_svg(document: dict[str, Any], metric: dict[str, Any], colours: dict[str, str]) -> str:
    """Each day's own effect (units first exposed that day), with its nominal interval."""
    daily = document.get("daily") or {}
    per_day = (daily.get("metrics") or {}).get(metric.get("metric"))
    dates = daily.get("dates") or []
    if not per_day or not dates:
        return ""
    with_year = len({d[:4] for d in dates}) > 1
    variants = list(dict.fromkeys(c["variant"] for day in per_day for c in day))
    series = [Series(v, [(i, c.get("relative_diff"), c.get("relative_ci_lower"), c.get("relative_ci_upper"))
                         for i, day in enumerate(per_day) for c in day if c["variant"] == v],
                     colours.get(v, PALETTE[n % len(PALETTE)])) for n, v in enumerate(variants)]
    return Chart("daily relative effect (units first exposed that day)", [date_label(d, with_year) for d in dates],
                 series, y_format=_axis_pct, style="points", aria="daily relative effect").svg()


def segments_html(document: dict[str, Any], colours: dict[str, str]) -> str:
    """Per dimension and metric: each segment's relative effect and nominal interval, chart and table."""
    segments = document.get("segments") or {}
    if not segments.get("dimensions"):
        error = segments.get("error")
        return f"<h2>Segments</h2><p class='warn'>{html.escape(str(error))}</p>" if error else ""
    out = ["<h2>Segments</h2>", f"<p class='meta'>{html.escape(str(segments.get('note', '')))}</p>"]
    for dim in segments["dimensions"]:
        name = html.escape(str(dim["dimension"]))
        left = ""
        if dim.get("other_values"):
            left = (f" (the {len(dim['values'])} largest segments; {fmt_number(dim['other_values'])} more with "
                    f"{fmt_number(dim['other_units'])} exposed units not shown)")
        out.append(f"<h3>by {name}{html.escape(left)}</h3>")
        units = "".join(f"<tr><td class='l'>{html.escape(str(v['value']))}</td>"
                        + "".join(f"<td>{fmt_number(n)}</td>" for n in v["units"].values()) + "</tr>"
                        for v in dim["values"])
        variants = list(dim["values"][0]["units"]) if dim["values"] else []
        out.append("<div class='scroll'><table><tr><th class='l'>segment</th>"
                   + "".join(f"<th>{html.escape(v)} units</th>" for v in variants) + f"</tr>{units}</table></div>")
        charts = []
        for metric in document.get("metrics", []):
            rows = [IntervalRow(label=f"{v['value']} · {c['variant']}" if len(variants) > 2 else str(v["value"]),
                                value=c["relative_diff"], lower=c.get("relative_ci_lower"),
                                upper=c.get("relative_ci_upper"), colour=colours.get(c["variant"], PALETTE[0]))
                    for v in dim["values"] for c in v.get("metrics", {}).get(metric["metric"], [])
                    if c.get("relative_diff") is not None]
            chart = interval_chart(rows, title=f"{metric['metric']}: relative effect by {dim['dimension']}")
            if chart:
                charts.append(chart)
        out.append(f"<div class='charts'>{''.join(charts)}</div>")
    return "".join(out)


def units_svg(document: dict[str, Any], colours: dict[str, str]) -> str:
    """Units first exposed per day, per variant."""
    daily = document.get("daily") or {}
    dates = daily.get("dates") or []
    units = daily.get("units") or {}
    if not dates or not units:
        return ""
    with_year = len({d[:4] for d in dates}) > 1
    series = [Series(v, [(i, float(n), None, None) for i, n in enumerate(counts)], colours.get(v, PALETTE[0]),
                     band=False) for v, counts in units.items()]
    return Chart("units first exposed per day", [date_label(d, with_year) for d in dates], series,
                 y_format=lambda v: fmt_number(round(v) if float(v).is_integer() else v, 3),
                 aria="units per day per variant").svg()


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
            f"<td>{_relative_interval(c)}</td>"
            f"<td>{fmt_p(c.get('p_value'))}</td><td>{html.escape(str(c.get('method')))}, "
            f"{html.escape(str(c.get('alternative')))}</td>"
            f"<td class='{'sig' if c.get('significant') else ''}'>{_fmt(c.get('significant'))}</td></tr>")
    return f"<div class='scroll'><table>{head}{''.join(body)}</table></div>"


def page_head(title: str) -> str:
    """The start of a standalone page (shared by the report and the results web UI)."""
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>")


def render_html(document: dict[str, Any], nav: str = "") -> str:
    """The report for one results document; `nav` is HTML placed above it (the web UI's links)."""
    name = html.escape(str(document.get("experiment", "")))
    decision = document.get("decision") or {}
    rec = str(decision.get("recommendation", ""))
    out = [page_head(f"{document.get('experiment', '')}: experiment results"), nav,
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
        out.append(f"<h2>Sample ratio check: {status}</h2><p>chi-square p-value {fmt_p(srm.get('p_value'))} "
                   f"(mismatch below {_fmt(srm.get('threshold'))})</p><table><tr><th class='l'>variant</th>"
                   f"<th>units</th><th>expected</th><th>expected share</th></tr>{rows}</table>")
    exclusions = document.get("exclusions")
    if exclusions:
        out.append(f"<p class='meta'>excluded units: {_fmt(exclusions.get('multiple_variants'))} exposed to several "
                   f"variants, {_fmt(exclusions.get('unknown_variant'))} to unknown variants; "
                   f"lake rows scanned: {_fmt(document.get('rows_scanned'))}</p>")
    labels = [str(d) for d in document.get("look_dates", [])]
    colours = _colours(document)
    units_chart = units_svg(document, colours)
    if units_chart:
        out.append(f"<h2>Units</h2><div class='charts'>{units_chart}</div>")
    if document.get("daily"):
        out.append(f"<p class='meta'>{html.escape(str(document['daily'].get('note', '')))}</p>")
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
        charts = [interval_svg(metric, colours), cumulative_svg(metric, labels, colours=colours),
                  daily_effect_svg(document, metric, colours)]
        if seq and seq.get("method") == "group-sequential":
            charts.append(cumulative_svg(metric, labels, key="z", colours=colours))
        out.append(f"<div class='charts'>{''.join(c for c in charts if c)}</div>")
    out.append(segments_html(document, colours))
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
        lines.append(f"units: {units}   SRM p={fmt_p(srm.get('p_value'))} {flag}")
    header = f"{'metric':<22} {'role':<9} {'variant':<12} {'control':>11} {'treatment':>11} {'relative':>9} " \
             f"{'interval':>21} {'p-value':>9}  sig"
    rows = []
    for metric in document.get("metrics", []):
        means = {v["variant"]: v for v in metric.get("variants", [])}
        control = next(iter(means.values()), {})
        for c in metric.get("comparisons", []):
            interval = _relative_interval(c)
            mark = "better" if c.get("better") else "WORSE" if c.get("worse") else "yes" if c.get("significant") else ""
            rows.append(f"{metric['metric'][:22]:<22} {metric['role']:<9} {c['variant'][:12]:<12} "
                        f"{_fmt(control.get('mean')):>11} {_fmt(means.get(c['variant'], {}).get('mean')):>11} "
                        f"{_pct(c.get('relative_diff')):>9} {interval:>21} {fmt_p(c.get('p_value')):>9}  {mark}")
    if rows:
        lines += [header, "-" * len(header), *rows]
    decision = document.get("decision") or {}
    lines.append(f"recommendation: {decision.get('recommendation')}")
    lines += [f"  - {r}" for r in decision.get("reasons", [])]
    lines += [f"warning: {w}" for w in document.get("warnings", [])]
    return "\n".join(lines)
