"""False-positive rate of sequential verdicts under a recompute schedule (A/A simulation).

    python -m bench.sequential_fpr --method group-sequential --per-day 96 --plan-days 14 --days 21
    python bench/sequential_fpr.py --code /path/to/an/older/checkout ...   # the same on other code

Each recompute publishes the results document that `compute_results` gives for statistics of
exactly that size, with the earlier looks the lake path passes (the complete first-exposure days);
where the code has a look log (`analysis_worker.looks`), the document goes through it as
`serve-analysis` does. A/A paths are Brownian motion in information time; a run is a false
positive when its z ever reaches a published critical value. Arrivals follow a daily cycle and
reach the plan (`expected_n`) at the end of `--plan-days`. `--sides 1` tests one-sided
(risk-aware, one success metric: a crossing is a `ship`), `--sides 2` two-sided (correction none).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

PLAN = 100_000.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", help="root of the checkout whose analysis_worker to simulate (default: this one)")
    parser.add_argument("--method", choices=["group-sequential", "always-valid"], default="group-sequential")
    parser.add_argument("--per-day", type=int, default=96, help="recomputes a day (default 96: every 15 minutes)")
    parser.add_argument("--plan-days", type=int, default=14, help="days until the planned units are reached")
    parser.add_argument("--days", type=int, default=14, help="days the experiment runs (more than the plan: overrun)")
    parser.add_argument("--sides", type=int, choices=[1, 2], default=2)
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    if args.code:
        sys.path.insert(0, args.code)
    from analysis_worker.compute import compute_results
    from analysis_worker.inputs import MetricInput, SequentialInput, StatsInput, VariantStats

    log: Any = None
    try:
        from analysis_worker.looks import LookLog

        log = LookLog(experiment="simulated")
    except ImportError:
        pass
    slot = np.arange(args.days * args.per_day)
    weight = 1.0 + 0.8 * np.sin(2 * np.pi * (slot % args.per_day) / args.per_day) * (args.per_day > 1)
    units = np.cumsum(weight)
    units = units / units[args.plan_days * args.per_day - 1] * PLAN
    critical = np.full(units.size, np.nan)
    started = time.perf_counter()
    for k, n in enumerate(units):
        day_looks = [float(units[d * args.per_day - 1]) for d in range(1, k // args.per_day + 1)]
        half = float(n) / 2
        cell = VariantStats(n=half, sum=0.0, sum_sq=half - 1)  # unit variance exactly 1, no effect
        metric = MetricInput(name="m", kind="mean", role="success", direction="increase", nim=0.0,
                             variants={"control": cell, "treatment": cell}, test="z")
        inp = StatsInput(alpha=0.05, power=0.8, correction="none" if args.sides == 2 else "risk-aware",
                         control="control", expected_split={"control": 0.5, "treatment": 0.5}, metrics=[metric],
                         sequential=SequentialInput(args.method, PLAN, day_looks),
                         units={"control": half, "treatment": half})
        document = compute_results(inp)
        if log is not None:
            document = log.publish(document)
            if "current" in document:  # a closed test republishes an earlier look: nothing new
                continue
        critical[k] = document["metrics"][0]["comparisons"][0]["critical_value"]
    rng = np.random.default_rng(args.seed)
    t = units / PLAN
    step = np.sqrt(np.diff(t, prepend=0.0))
    bound = np.where(np.isfinite(critical), critical, np.inf)
    ever = 0
    for _ in range(args.runs // 2000):
        z = np.cumsum(rng.standard_normal((2000, t.size)) * step, axis=1) / np.sqrt(t)
        ever += int(((np.abs(z) if args.sides == 2 else z) >= bound).any(axis=1).sum())
    rate = ever / (args.runs // 2000 * 2000)
    print(f"{'with' if log is not None else 'without'} look log, {args.method}, {args.per_day}/day, plan "
          f"{args.plan_days} d, run {args.days} d, {args.sides}-sided: false-positive rate {rate:.4f} "
          f"(SE {np.sqrt(rate * (1 - rate) / args.runs):.4f}, {args.runs} runs, {units.size} recomputes, "
          f"{time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
