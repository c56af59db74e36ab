"""Allocation and bucketing properties on large samples (vectorised where it matters)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from assignment_server.authoring.compiler import DEFAULT_CLIENT_SECRET, compile_folder
from twofold.resolver import Resolver, ResolverState, allocation_bucket, allocation_salt

ROOT = Path(__file__).resolve().parent.parent
N = 1_000_000
SALT = allocation_salt("accounts/twofold")


@pytest.fixture(scope="module")
def unit_buckets() -> np.ndarray:
    """Allocation buckets of 1M distinct units (the expensive part, computed once)."""
    return np.fromiter((allocation_bucket(SALT, f"unit-{i}") for i in range(N)), dtype=np.int64, count=N)


def _bits(state: ResolverState, segment: str) -> np.ndarray:
    bitset = state.segments[segment].bitset
    if bitset is None:
        return np.ones(N, dtype=bool)
    return np.unpackbits(np.frombuffer(bitset.bits, dtype=np.uint8), bitorder="little")[:N].astype(bool)


def _write(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


EXPERIMENTS = """
namespace: search
holdout: 10%
---
flag: ranking
variants: {a: {x: 1}, b: {x: 2}, c: {x: 3}}
rules:
  - name: exp
    experiment: {allocation: {alloc}, namespace: search, arms: {a: 1, b: 2, c: 1}}
---
flag: snippets
variants: {a: {x: 1}, b: {x: 2}}
rules:
  - name: exp
    experiment: {allocation: 20%, namespace: search, arms: {a: 1, b: 1}}
---
flag: layout
variants: {a: {x: 1}, b: {x: 2}}
rules:
  - name: exp
    experiment: {allocation: 20%, arms: {a: 1, b: 1}, exclusive_with: [ranking/exp]}
---
flag: colors
variants: {a: {x: 1}, b: {x: 2}}
rules:
  - name: exp
    experiment: {allocation: 50%, arms: {a: 1, b: 1}}
"""


def test_allocation_buckets_are_uniform(unit_buckets: np.ndarray) -> None:
    counts = np.bincount(unit_buckets // 1000, minlength=1000)
    assert stats.chisquare(counts).pvalue > 0.001
    assert unit_buckets.min() >= 0 and unit_buckets.max() < N


def test_exclusive_experiments_and_holdout_share_no_unit_and_ramping_only_adds(
        tmp_path: Path, unit_buckets: np.ndarray) -> None:
    folder = tmp_path / "flags"
    _write(folder, "all.yaml", EXPERIMENTS.replace("{alloc}", "10%"))
    first = ResolverState.from_json(compile_folder(folder).state_json())
    assert subprocess.run([sys.executable, "-m", "twofold", "flags", "lock", str(folder)], cwd=ROOT,
                          capture_output=True, timeout=120).returncode == 0
    _write(folder, "all.yaml", EXPERIMENTS.replace("{alloc}", "50%"))
    second = ResolverState.from_json(compile_folder(folder).state_json())

    for state in (first, second):
        ranking = _bits(state, "segments/ranking--exp")[unit_buckets]
        snippets = _bits(state, "segments/snippets--exp")[unit_buckets]
        layout = _bits(state, "segments/layout--exp")[unit_buckets]
        colors = _bits(state, "segments/colors--exp")[unit_buckets]
        holdout = _bits(state, "segments/holdout--search")[unit_buckets]
        assert not (ranking & snippets).any()          # same namespace
        assert not (ranking & layout).any()            # exclusive_with across namespaces
        assert not (holdout & (ranking | snippets)).any()
        assert abs(holdout.mean() - 0.10) < 0.003
        # Independent experiments overlap at random: about 20% x 50% of units are in both.
        assert abs((layout & colors).mean() - 0.10) < 0.005

    before = _bits(first, "segments/ranking--exp")[unit_buckets]
    after = _bits(second, "segments/ranking--exp")[unit_buckets]
    assert abs(before.mean() - 0.10) < 0.003 and abs(after.mean() - 0.50) < 0.003
    assert not (before & ~after).any()  # nobody who was in moved out
    for other in ("segments/snippets--exp", "segments/layout--exp", "segments/holdout--search"):
        assert (_bits(first, other) == _bits(second, other)).all()  # partners untouched by the ramp


def test_lone_rollout_ramps_monotonically_without_a_lock(tmp_path: Path) -> None:
    shares = []
    previous = None
    for pct in (1, 10, 35, 50, 99):
        folder = tmp_path / f"f{pct}"
        _write(folder, "f.yaml", f"""
flag: feature
variants: {{"on": {{on: true}}, "off": {{on: false}}}}
default: "off"
rules:
  - name: ramp
    rollout: {{variant: "on", percentage: {pct}%}}
""")
        bits = _bits(ResolverState.from_json(compile_folder(folder).state_json()), "segments/feature--ramp")
        shares.append(bits.mean())
        if previous is not None:
            assert not (previous & ~bits).any()
        previous = bits
    assert np.allclose(shares, [0.01, 0.10, 0.35, 0.50, 0.99], atol=1e-6)


def test_arm_shares_match_weights_within_one_percent(tmp_path: Path) -> None:
    folder = tmp_path / "flags"
    _write(folder, "all.yaml", EXPERIMENTS.replace("{alloc}", "50%"))
    resolver = Resolver(ResolverState.from_json(compile_folder(folder).state_json()))
    counts: dict[str, int] = {}
    for i in range(400_000):
        f = resolver.resolve(["flags/ranking"], {"targeting_key": f"u{i}"}, DEFAULT_CLIENT_SECRET)[0]
        if f.variant:
            counts[f.variant_name] = counts.get(f.variant_name, 0) + 1
    total = sum(counts.values())
    assert abs(total / 400_000 - 0.5) < 0.005
    for arm, weight in (("a", 0.25), ("b", 0.5), ("c", 0.25)):
        assert abs(counts[arm] / total - weight) < 0.01, counts


def test_same_files_compile_to_identical_state(tmp_path: Path) -> None:
    a = compile_folder(ROOT / "examples" / "flags").state_json()
    shutil.copytree(ROOT / "examples" / "flags", tmp_path / "copy")
    b = compile_folder(tmp_path / "copy").state_json()
    assert a == b
