"""Bloom filters of materialized segments, in the layout Confidence ships (Guava's MURMUR128_MITZ_64).

The filter bits are Guava's `long[]` written big-endian, so bit `i` lives in byte
`8 * (i // 64) + 7 - (i % 64) // 8` at position `i % 8`. Probing follows Guava: `h1`, `h2` are the
two halves of MurmurHash3_x64_128(key); probe `k` tests `((h1 + k * h2) & Long.MAX_VALUE) % bits`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import mmh3

from twofold.resolver.errors import StateError

STRATEGY_MURMUR128_MITZ_64 = 1
_MASK64 = (1 << 64) - 1
_MAX_LONG = (1 << 63) - 1


@dataclass(frozen=True)
class BloomFilter:
    """A read-only Bloom filter: `might_contain(unit)` is False only for units certainly absent."""

    data: bytes
    hash_function_count: int
    bit_count: int

    @classmethod
    def from_json(cls, name: str, doc: dict) -> BloomFilter:
        """Load `{"data": base64, "hashFunctionCount", "bitCount", "strategy"}`."""
        strategy = int(doc.get("strategy", STRATEGY_MURMUR128_MITZ_64))
        if strategy != STRATEGY_MURMUR128_MITZ_64:
            raise StateError(f"bloom filter {name}: unsupported strategy {strategy}")
        try:
            data = base64.b64decode(doc.get("data", ""), validate=True)
        except ValueError as exc:
            raise StateError(f"bloom filter {name}: data is not base64") from exc
        bits = int(doc.get("bitCount", len(data) * 8))
        k = int(doc.get("hashFunctionCount", 0))
        if bits <= 0 or bits > len(data) * 8 or k <= 0:
            raise StateError(f"bloom filter {name}: inconsistent bitCount/hashFunctionCount")
        return cls(data, k, bits)

    def might_contain(self, key: str) -> bool:
        h1, h2 = (h & _MASK64 for h in mmh3.hash64(key))
        combined = h1
        data = self.data
        for _ in range(self.hash_function_count):
            index = (combined & _MAX_LONG) % self.bit_count
            byte = data[8 * (index >> 6) + 7 - ((index & 63) >> 3)]
            if not (byte >> (index & 7)) & 1:
                return False
            combined = (combined + h2) & _MASK64
        return True
