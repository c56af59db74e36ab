"""The allocator: which of the 1,000,000 allocation buckets each segment owns.

Contract 1 keeps one allocation salt per account, so namespaces, exclusivity and holdouts can
only be expressed by *which* buckets a segment owns. The allocator guarantees:

(a) ramping a proportion up only adds buckets and ramping down only removes them: a segment
    claims positions of a permutation in a fixed order and keeps them, in claim order, in the
    allocation lock (`allocations.lock.json`, or the copy the server keeps of what it served);
(b) segments that are exclusive to each other own disjoint sets: experiments of one namespace,
    a namespace's holdout and every experiment of that namespace, and explicit `exclusive_with`.
    A partner never gets a bucket a segment ever held (its reservation), so a ramp down frees
    nothing for partners until the segment is removed from the folder;
(c) a holdout is placed first, so its buckets are in no experiment of its namespace;
(d) the result is a pure function of the inputs and the lock (permutations come from a fixed
    hash, never from a random generator whose stream could change between library versions).

Each namespace has its own permutation, so experiments of different namespaces overlap at
random (independently), as they should. A segment outside any namespace uses a permutation of
its own. Whether a change keeps these promises against what was served is checked by
`assignment_server.authoring.integrity`, which refuses the change otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from twofold.resolver.bucketing import ALLOCATION_BUCKETS, hash_key

LOCK_VERSION = 2
READABLE_LOCK_VERSIONS = (1, 2)  # version 1: no partners, positions sorted
_U64 = np.uint64


@dataclass(frozen=True)
class SegmentRequest:
    """A segment that needs allocation buckets."""

    segment: str
    proportion: float
    namespace: str | None = None
    exclusive_with: frozenset[str] = field(default_factory=frozenset)
    holdout: bool = False

    @property
    def permutation_key(self) -> str:
        return f"namespace:{self.namespace}" if self.namespace else f"segment:{self.segment}"


@lru_cache(maxsize=16)  # 4 MB each; namespaces are few, private ones are recomputed (~0.1 s)
def permutation(key: str) -> np.ndarray:
    """Bucket ids in the claim order of `key`: argsort of a SplitMix64 stream (stable, numpy-version proof)."""
    seed = _U64(hash_key(f"twofold-allocation|{key}"))
    with np.errstate(over="ignore"):
        z = np.arange(ALLOCATION_BUCKETS, dtype=_U64) * _U64(0x9E3779B97F4A7C15) + seed
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        z = z ^ (z >> _U64(31))
    order = np.argsort(z, kind="stable").astype(np.int32)
    order.setflags(write=False)
    return order


def _to_ranges(positions: np.ndarray) -> list[list[int]]:
    """Positions as [start, end) ranges, in the order given (claim order is what the lock stores)."""
    if positions.size == 0:
        return []
    p = np.asarray(positions, dtype=np.int64)
    breaks = np.nonzero(np.diff(p) != 1)[0]
    starts = np.concatenate(([p[0]], p[breaks + 1]))
    ends = np.concatenate((p[breaks], [p[-1]])) + 1
    return [[int(s), int(e)] for s, e in zip(starts, ends, strict=True)]


def _from_ranges(ranges: Iterable[Iterable[int]]) -> np.ndarray:
    parts = [np.arange(max(0, int(s)), min(ALLOCATION_BUCKETS, int(e)), dtype=np.int64) for s, e in ranges]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def lock_segments(lock: Mapping | None) -> dict[str, dict]:
    """The segment entries of a lock this version can read (version 1 is version 2 without partners)."""
    if not lock or lock.get("version", LOCK_VERSION) not in READABLE_LOCK_VERSIONS:
        return {}
    segments = lock.get("segments", {})
    return segments if isinstance(segments, dict) else {}


def reserved_positions(entry: Mapping) -> np.ndarray:
    """Every position a lock entry holds, in claim order (its active ones first)."""
    return _from_ranges(entry.get("positions", []))


def entry_mask(entry: Mapping, active_only: bool = True) -> np.ndarray:
    """A lock entry's buckets as a mask: the active ones, or every reserved one."""
    positions = reserved_positions(entry)
    if active_only:
        positions = positions[:int(entry.get("buckets", positions.size))]
    mask = np.zeros(ALLOCATION_BUCKETS, dtype=bool)
    mask[permutation(str(entry.get("permutation")))[positions]] = True
    return mask


@dataclass
class Allocation:
    """Result: a boolean mask over the 1,000,000 buckets per segment, and the lock to persist."""

    masks: dict[str, np.ndarray]
    lock: dict
    # segment -> (buckets wanted, buckets free for it): exclusivity left too little room.
    shortfalls: dict[str, tuple[int, int]] = field(default_factory=dict)

    def bits(self, segment: str) -> bytes:
        """The segment's bitset as bytes, LSB-first (Confidence's bit order)."""
        return np.packbits(self.masks[segment], bitorder="little").tobytes()


def exclusivity(requests: Iterable[SegmentRequest]) -> dict[str, set[str]]:
    """Symmetric partner sets: same namespace, a namespace's holdout, explicit exclusive_with."""
    reqs = list(requests)
    partners: dict[str, set[str]] = {r.segment: set() for r in reqs}
    by_namespace: dict[str, list[str]] = {}
    for r in reqs:
        if r.namespace:
            by_namespace.setdefault(r.namespace, []).append(r.segment)
    for members in by_namespace.values():
        for a in members:
            partners[a].update(m for m in members if m != a)
    for r in reqs:
        for other in r.exclusive_with:
            if other in partners and other != r.segment:
                partners[r.segment].add(other)
                partners[other].add(r.segment)
    return partners


def allocate(requests: Iterable[SegmentRequest], lock: Mapping | None = None) -> Allocation:
    """Give each request round(proportion * 1,000,000) buckets, honouring exclusivity and the lock.

    A segment found in the lock keeps its positions in claim order: its active buckets are the
    first ones it claimed, a ramp down deactivates the newest, a ramp up reactivates them before
    claiming free positions. Every position it ever held (while it stays in the folder) is
    *reserved*: exclusive partners never get those buckets, so a unit that was in a running
    experiment never enters one it is exclusive with. Removing a segment releases its buckets.
    """
    reqs = sorted(requests, key=lambda r: (not r.holdout, r.segment))
    partners = exclusivity(reqs)
    locked = lock_segments(lock)

    def previous(r: SegmentRequest) -> np.ndarray | None:
        entry = locked.get(r.segment)
        if entry and entry.get("permutation") == r.permutation_key:
            return reserved_positions(entry)
        return None

    # Buckets every locked segment has reserved, so a newcomer never takes them from a partner.
    held: dict[str, np.ndarray] = {}
    for r in reqs:
        positions = previous(r)
        if positions is not None:
            held[r.segment] = permutation(r.permutation_key)[positions]

    masks: dict[str, np.ndarray] = {}
    reserved: dict[str, np.ndarray] = {}
    new_lock: dict[str, dict] = {}
    shortfalls: dict[str, tuple[int, int]] = {}
    for r in reqs:
        order = permutation(r.permutation_key)
        wanted = round(min(max(r.proportion, 0.0), 1.0) * ALLOCATION_BUCKETS)
        forbidden = np.zeros(ALLOCATION_BUCKETS, dtype=bool)
        for p in partners[r.segment]:
            if p in reserved:
                forbidden |= reserved[p]
            elif p in held:
                forbidden[held[p]] = True
        eligible = ~forbidden[order]  # by position
        kept = previous(r)
        kept = kept[eligible[kept]] if kept is not None else np.zeros(0, dtype=np.int64)
        missing = wanted - kept.size
        if missing > 0:
            taken = np.zeros(ALLOCATION_BUCKETS, dtype=bool)
            taken[kept] = True
            kept = np.concatenate((kept, np.nonzero(eligible & ~taken)[0][:missing]))
        active = kept[:wanted]
        if active.size < wanted:
            shortfalls[r.segment] = (wanted, int(active.size))
        mask = np.zeros(ALLOCATION_BUCKETS, dtype=bool)
        mask[order[active]] = True
        masks[r.segment] = mask
        held_mask = np.zeros(ALLOCATION_BUCKETS, dtype=bool)
        held_mask[order[kept]] = True
        reserved[r.segment] = held_mask
        entry: dict = {"permutation": r.permutation_key, "buckets": int(active.size), "positions": _to_ranges(kept)}
        if partners[r.segment]:
            entry["partners"] = sorted(partners[r.segment])
        new_lock[r.segment] = entry
    return Allocation(masks, {"version": LOCK_VERSION, "segments": dict(sorted(new_lock.items()))}, shortfalls)
