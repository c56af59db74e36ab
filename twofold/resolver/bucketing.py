"""Contract 1 of DESIGN.md: the hash and the bucket, bit-for-bit as Confidence computes them.

`hash(key)` is MurmurHash3 x64 128 (seed 0) of the key's UTF-8 bytes, of which the low 64 bits
(`h1`) are kept as an unsigned integer; `bucket(key, n) = (hash(key) >> 4) % n`. The shift by 4
is inherited from Confidence's Java resolver and must stay for states to resolve identically.

`mmh3.hash64(key)` (x64 variant, seed 0) returns signed halves; they are masked to unsigned.
Positional `hash64(key, 0, True, False)` did *not* give the unsigned x64 result with mmh3 5.3,
so only the defaults are used: the contract's two test vectors guard this.
"""

from __future__ import annotations

import mmh3

ALLOCATION_BUCKETS = 1_000_000
MASK64 = (1 << 64) - 1

_hash64 = mmh3.hash64  # x64 variant, seed 0; signed by default, so results are masked to unsigned


def hash_key(key: str) -> int:
    """Low 64 bits of MurmurHash3_x64_128(key, seed 0), unsigned."""
    return (_hash64(key)[0] & MASK64)


def bucket(key: str, buckets: int) -> int:
    """The bucket of `key` among `buckets` buckets (0 <= result < buckets)."""
    if buckets <= 0:
        raise ValueError(f"bucket count must be positive, got {buckets}")
    return ((_hash64(key)[0] & MASK64) >> 4) % buckets


def allocation_salt(account: str) -> str:
    """`MegaSalt-<account id>` from an account name such as `accounts/<id>` (or a bare id)."""
    _, _, ident = account.rpartition("/")
    return f"MegaSalt-{ident}"


def allocation_bucket(salt: str, unit: str) -> int:
    """The unit's allocation bucket (one of 1,000,000), shared by every segment of the account."""
    return ((_hash64(f"{salt}|{unit}")[0] & MASK64) >> 4) % ALLOCATION_BUCKETS


def arm_bucket(segment: str, unit: str, bucket_count: int) -> int:
    """The unit's arm bucket within a rule: salted by the segment id (`segments/<id>` -> `<id>`)."""
    parts = segment.split("/")
    salt = parts[1] if len(parts) > 1 else parts[0]
    return ((_hash64(f"{salt}|{unit}")[0] & MASK64) >> 4) % bucket_count
