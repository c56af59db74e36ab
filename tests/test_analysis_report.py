"""The HTML report's charts and numbers at every size of experiment (one day to many, 2 to 8 variants).

Geometry here is checked on the SVG text (estimated label widths); tests/test_results_browser.py
checks the same pages as Chromium lays them out.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import re
from pathlib import Path

import pytest
import yaml

from analysis_worker.analyze import analyze
from analysis_worker.charts import fmt_number, nice_ticks, pick_labels, text_width
from analysis_worker.compute import compute_results
from analysis_worker.inputs import parse_input
from analysis_worker.report import render_html, render_table
from analysis_worker.synthetic import write_synthetic_lake

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "data" / "home-ranking-analysis.yaml"  # matches the synthetic lake
STATS = ROOT / "examples" / "experiments" / "stats-input.json"
LATER = dt.datetime(2026, 12, 31, tzinfo=dt.UTC)


def _definition(units: int) -> dict:
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["sequential"]["expected_units"] = units
    return cfg


@pytest.fixture(scope="module")
def one_day_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("one-day")
    write_synthetic_lake(root, exposures=3000, events=9000, days=1, seed=3, chunk=50_000)
    return root


def _charts(page: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in re.finditer(r"<svg class='chart'[^>]*aria-label='([^']*)'.*?</svg>", page)}


def test_people_read_counts_with_separators_not_exponents() -> None:
    assert fmt_number(49960.0) == "49,960"
    assert fmt_number(1234.567) == "1,235"
    assert fmt_number(0.0123456) == "0.01235"
    assert fmt_number(12) == "12"
    doc = compute_results(parse_input(json.loads(STATS.read_text())))
    doc["srm"]["expected"] = {k: v * 5 for k, v in doc["srm"]["expected"].items()}  # 50,125: once 5.012e+04
    page = render_html(doc)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", page) + re.findall(r"<text[^>]*>([^<]*)</text>", page)
    assert "50,125" in cells and not [c for c in cells if re.search(r"\d\.\d+e[+-]\d", c)]
    assert "e+0" not in render_table(doc)


def test_a_one_day_experiment_draws_every_chart_with_a_point_and_its_interval(one_day_lake: Path) -> None:
    result = analyze(_definition(3000), one_day_lake, now=LATER)
    assert result.error is None
    charts = _charts(result.html)
    for label in ("cumulative relative effect by day", "daily relative effect", "units per day per variant",
                  "z statistic vs sequential bounds"):
        assert label in charts, label
        svg = charts[label]
        assert "class='mark" in svg, label
    cumulative = charts["cumulative relative effect by day"]
    assert "<circle class='mark'" in cumulative and "errorbar" in cumulative
    # The single date appears once (it was drawn twice: as the first and as the last look).
    assert len(re.findall(r"class='xtick'[^>]*>Nov 1<", cumulative)) == 1


def test_the_document_has_daily_units_and_daily_effects(one_day_lake: Path) -> None:
    result = analyze(_definition(3000), one_day_lake, now=LATER)
    daily = result.document["daily"]
    assert daily["dates"] == ["2026-11-01"]
    assert sum(daily["units"][v][0] for v in daily["units"]) == sum(result.document["units"].values())
    effect = daily["metrics"]["purchase_rate"][0][0]
    assert effect["variant"] == "bandit" and effect["relative_ci_lower"] < effect["relative_diff"] < \
        effect["relative_ci_upper"]


@pytest.mark.parametrize("n", [1, 2, 7, 28, 120])
def test_date_labels_never_overlap_nor_leave_the_frame_and_keep_both_ends(n: int) -> None:
    labels = [(dt.date(2026, 11, 1) + dt.timedelta(days=i)).strftime("%b %-d") for i in range(n)]
    left, right = 40.0, 468.0
    xs = [left + (right - left) * (i + 0.5) / n for i in range(n)]
    chosen = pick_labels(xs, labels, 2.0, 478.0)
    texts = [t for _, _, t in chosen]
    assert texts[0] == labels[0] and texts[-1] == labels[-1] and len(set(texts)) == len(texts)
    boxes = []
    for x, anchor, text in chosen:
        w = text_width(text, 10)
        x0 = x - w / 2 if anchor == "middle" else x if anchor == "start" else x - w
        boxes.append((x0, x0 + w))
        assert 0 <= x0 and x0 + w <= 480
    for (a0, a1), (b0, b1) in itertools.pairwise(boxes):
        assert a1 <= b0, (a0, a1, b0, b1)


@pytest.mark.parametrize(("lo", "hi"), [(-0.0696, 0.0), (-0.0333, 0.0819), (0.0, 49960.0), (1e-6, 3e-6), (5, 5)])
def test_ticks_are_round_cover_the_data_and_are_few(lo: float, hi: float) -> None:
    ticks = nice_ticks(lo, hi, 6)
    assert ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 6
    assert len(set(ticks)) == len(ticks)


def test_many_variants_and_huge_counts_render(tmp_path: Path) -> None:
    """Eight variants, millions of units: a legend that wraps, one colour per variant, no exponents."""
    raw = json.loads(STATS.read_text())
    names = ["control", *[f"treatment-{i}" for i in range(7)]]
    raw["expected_split"] = {n: 1 / 8 for n in names}
    for metric in raw["metrics"]:
        base = metric["variants"]["control"]
        metric["variants"] = {n: {k: v * 400 for k, v in base.items()} for n in names}
    page = render_html(compute_results(parse_input(raw)))
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", page) + re.findall(r"<text[^>]*>([^<]*)</text>", page)
    assert "4,000,000" in cells and not [c for c in cells if re.search(r"\d\.\d+e[+-]\d", c)]
    interval = _charts(page)["relative effect vs control (interval of the test)"]
    assert interval.count("<circle class='mark'") == 7


def test_one_look_points_of_several_variants_stand_side_by_side() -> None:
    from analysis_worker.charts import Chart, Series

    svg = Chart("units", ["Nov 1"], [Series(v, [(0, 1000.0 + i, None, None)], band=False)
                                      for i, v in enumerate(("a", "b", "c"))]).svg()
    xs = re.findall(r"<circle class='mark' cx='([\d.]+)'", svg)
    assert len(xs) == 3 and len(set(xs)) == 3


def test_an_unbounded_relative_interval_is_said_and_drawn_across_the_axis() -> None:
    """Fieller's interval is unbounded (null ends) when the control mean's interval includes zero."""
    doc = compute_results(parse_input(json.loads(STATS.read_text())))
    comparison = doc["metrics"][0]["comparisons"][0]
    comparison["relative_ci_lower"] = comparison["relative_ci_upper"] = None
    page = render_html(doc)
    assert "<td>unbounded</td>" in page and "class='mark unbounded'" in page
