"""Does a flag change move units of what is running? A check of a new allocation against the old.

An experiment's analysis assumes that a unit, once in an arm, stays in that arm and never
enters an experiment it is exclusive with. A change of a flags folder can break that in ways
the analysis cannot detect afterwards (a partner's ramp reshuffling the allocation, a new
`exclusive_with` between experiments that already overlap, new arm weights, a rule slipped in
ahead of a running experiment), so every change is compared with the allocation that was
served, both by `twofold flags validate` (against `allocations.lock.json`) and by the server's
hot reload (against its own record of what it served), and refused when it would move anyone.

Both sides are allocation locks (`allocator.allocate` writes the segments, the compiler adds
the account and the experiments' arm layouts). "Running" means present in the old lock.
What a change may do to a running segment S:

- ramp up: S keeps every bucket it had (old active set within the new one);
- ramp down: S keeps a subset of what it had (a unit leaves, it never arrives from elsewhere);
- exclusivity: no segment exclusive with S (before or after the change) gets a bucket S ever
  held while it runs (its reservation), so a unit of S never enters a partner of S;
- arms (experiments): same bucket count, arm ranges and targeting key, unless the experiment
  was and stays sticky (materialized units keep their variant whatever the layout);
- rules ahead (experiments): a new rule placed ahead of S in its flag, or a rule ahead that
  grows, takes no bucket of S (rules that list units, `overrides`, are exempt: listing a unit
  is an explicit decision about it);
- the account (whose name salts every allocation bucket) does not change.

Counts are in allocation buckets; each is 1/1,000,000 of all units (contract 1), so a count
reads directly as a share of units.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from assignment_server.authoring.allocator import entry_mask, lock_segments, reserved_positions
from twofold.resolver.bucketing import ALLOCATION_BUCKETS

ARM_SAMPLE = 1 << 20  # arm buckets compared when two layouts' bucket counts have a large lcm


@dataclass(frozen=True)
class Move:
    """Units a change would move: `buckets` of the running `segment`, caused by `culprit`'s definition."""

    segment: str
    culprit: str  # the segment (or "account") whose new definition moves them: where the error points
    what: str  # "allocation", "arms", "ahead", "account": which line of the culprit to point at
    buckets: int
    message: str


def share(buckets: int) -> str:
    """`buckets` as the share of all units they hold."""
    return f"{buckets:,} allocation buckets ({100 * buckets / ALLOCATION_BUCKETS:.4g}% of all units)"


class _Masks:
    """Bucket masks of one lock's segments, computed once each."""

    def __init__(self, lock: Mapping | None) -> None:
        self.entries = lock_segments(lock)
        self._active: dict[str, np.ndarray] = {}
        self._reserved: dict[str, np.ndarray] = {}

    def active(self, segment: str) -> np.ndarray:
        """The segment's active buckets; a segment the lock does not allocate spans every bucket."""
        if segment not in self._active:
            entry = self.entries.get(segment)
            self._active[segment] = entry_mask(entry) if entry else np.ones(ALLOCATION_BUCKETS, dtype=bool)
        return self._active[segment]

    def reserved(self, segment: str) -> np.ndarray:
        if segment not in self._reserved:
            entry = self.entries.get(segment)
            self._reserved[segment] = (entry_mask(entry, active_only=False) if entry
                                       else np.ones(ALLOCATION_BUCKETS, dtype=bool))
        return self._reserved[segment]

    def partners(self, segment: str) -> set[str]:
        return set(self.entries.get(segment, {}).get("partners", []))


def _variant_at(layout: Mapping, buckets: np.ndarray) -> np.ndarray:
    """Index into the layout's arms of the arm each arm bucket gives (-1: no arm)."""
    out = np.full(buckets.shape, -1, dtype=np.int64)
    for index, (_variant, lower, upper) in enumerate(layout["arms"]):
        out[(buckets >= lower) & (buckets < upper)] = index
    return out


def arm_change(old: Mapping, new: Mapping) -> float:
    """Share of an experiment's units whose arm differs between two layouts (0 when identical).

    A unit's arm is `hash >> 4` modulo the bucket count, mapped through the arm ranges. With
    equal counts the answer is exact; with different counts it is exact over one period (the
    lcm) when that is small, else measured on a fixed sample of hash values.
    """
    if old.get("selector", "") != new.get("selector", ""):
        return 1.0  # another attribute is the unit: everyone is re-bucketed
    n_old, n_new = int(old["bucketCount"]), int(new["bucketCount"])
    period = np.lcm(n_old, n_new)
    if period <= ARM_SAMPLE:
        h = np.arange(period, dtype=np.int64)
    else:
        h = np.random.default_rng(0).integers(0, 1 << 59, ARM_SAMPLE, dtype=np.int64)
    v_old = np.asarray([*(a[0] for a in old["arms"]), "-"], dtype=object)[_variant_at(old, h % n_old)]
    v_new = np.asarray([*(a[0] for a in new["arms"]), "-"], dtype=object)[_variant_at(new, h % n_new)]
    return float(np.mean(v_old != v_new))


def extends(old: Mapping | None, new: Mapping) -> bool:
    """Whether `new` moves nothing of `old` and still reserves every bucket `old` reserved.

    Only such a lock may replace a server's record of what it served as the starting point of a
    compile: one that forgot a reservation (a lock rebuilt from scratch after a ramp down, say)
    would let a partner take units that were in a running experiment.
    """
    if moves(old, new):
        return False
    before, after = lock_segments(old), lock_segments(new)
    for s in set(before) & set(after):
        if before[s].get("permutation") != after[s].get("permutation"):
            return False
        kept = np.zeros(ALLOCATION_BUCKETS, dtype=bool)
        kept[reserved_positions(after[s])] = True
        if not kept[reserved_positions(before[s])].all():
            return False
    return True


def moves(old: Mapping | None, new: Mapping) -> list[Move]:
    """Every way `new` would move units of what `old` allocated (empty: the change is safe)."""
    before, after = _Masks(old), _Masks(new)
    running = sorted(set(before.entries) & set(after.entries))
    found: list[Move] = []
    if not before.entries:
        return found

    old_account, new_account = (old or {}).get("account"), new.get("account")
    if old_account and new_account and old_account != new_account:
        found.append(Move("*", "account", "account", ALLOCATION_BUCKETS,
                          f"changing the account from {old_account} to {new_account} re-buckets every unit "
                          f"of {len(before.entries)} running segment(s)"))
        return found

    for s in running:
        o, n = before.entries[s], after.entries[s]
        was, now = before.active(s), after.active(s)
        if int(n.get("buckets", 0)) >= int(o.get("buckets", 0)):
            lost = int((was & ~now).sum())
            if lost:
                found.append(Move(s, s, "allocation", lost,
                                  f"{s} would lose {share(lost)} it serves now ({lost / max(int(was.sum()), 1):.1%} "
                                  "of its units)"))
        else:
            arriving = int((now & ~was).sum())
            if arriving:
                found.append(Move(s, s, "allocation", arriving,
                                  f"ramping {s} down would also move it onto {share(arriving)} it does not serve "
                                  "now (a ramp down may only remove units)"))
        held = before.reserved(s)
        for t in sorted((before.partners(s) | after.partners(s)) & set(after.entries)):
            intruding = int((after.active(t) & held).sum())
            if intruding:
                found.append(Move(s, t, "allocation", intruding,
                                  f"{t} would take {share(intruding)} that are or were in running {s}, "
                                  "which it is exclusive with"))

    old_exp, new_exp = (old or {}).get("experiments", {}), new.get("experiments", {})
    for s in sorted(set(old_exp) & set(new_exp) & set(before.entries)):
        o, n = old_exp[s], new_exp[s]
        units = int(before.active(s).sum())
        if not (o.get("sticky") and n.get("sticky")):
            changed = arm_change(o, n)
            if changed > 0:
                moved = round(changed * units)
                found.append(Move(s, s, "arms", moved,
                                  f"the new arms of running {s} would switch {changed:.1%} of its units to another "
                                  f"arm: {share(moved)} (keep its arms, bucket_count and targeting_key; start a new "
                                  "experiment to change them)"))
        ahead_before = set(o.get("ahead", []))
        for p in n.get("ahead", []):
            grown = after.active(p) & ~before.active(p) if p in ahead_before else after.active(p)
            taken = int((grown & before.active(s)).sum())
            if taken:
                found.append(Move(s, p, "ahead", taken,
                                  f"rule {p} ahead of running {s} may take up to {share(taken)} of its units "
                                  "(place it after the experiment, or make it exclusive with it)"))
    return found
