"""Uniform random numbers derived from a decision id, fed to a policy graph as its `random` input.

ONNX Runtime's in-graph random operators start every session from the same seed, so two
workers (or a restarted server) would draw identical streams. Instead the server derives the
numbers from the decision id: BLAKE2b of the id seeds SplitMix64, vectorised in numpy. The same
decision id therefore replays the same decision, on any machine, which is what makes logged
decisions reproducible and auditable.
"""

from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_COUNTERS: dict[int, np.ndarray] = {}


def seed_of(decision_id: str) -> int:
    """A 64-bit seed for a decision id (stable across processes, platforms and versions)."""
    return int.from_bytes(hashlib.blake2b(decision_id.encode(), digest_size=8).digest(), "little")


_MASK = (1 << 64) - 1


def _splitmix_one(seed: int, counter: int) -> float:
    """The same number `uniforms` computes at position `counter`, in plain integers (faster for one)."""
    z = (seed + counter * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    z ^= z >> 31
    return ((z >> 40) + 0.5) * 2.0**-24


def uniforms(decision_id: str, count: int) -> np.ndarray:
    """`count` float32 numbers strictly inside (0, 1), as a `(1, count)` row."""
    if count <= 2:
        seed = seed_of(decision_id)
        return np.array([[_splitmix_one(seed, i) for i in range(1, count + 1)]], dtype=np.float32)
    counters = _COUNTERS.get(count)
    if counters is None:
        counters = _COUNTERS[count] = np.arange(1, count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed_of(decision_id)) + counters * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    # 24 high bits plus one half: exactly representable in float32 and never 0 or 1.
    return (((z >> np.uint64(40)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)).reshape(1, count)


def uniforms_for(decision_ids: list[str], count: int) -> np.ndarray:
    """One row of `uniforms` per decision id (offline evaluation replays many at once)."""
    if not decision_ids:
        return np.zeros((0, count), dtype=np.float32)
    return np.vstack([uniforms(d, count) for d in decision_ids])
