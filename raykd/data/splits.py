"""Lesion- and patient-grouped, class-stratified train/val/test splits.

Several images of one lesion (and several lesions of one patient) are near-duplicates for a
model, so a lesion split across train and test inflates every test metric. Images are first
joined into groups (same lesion, or same patient when known: the union of both relations), then
whole groups are assigned greedily to the split whose per-class quota is furthest from full.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np


def group_ids(lesion_ids: Sequence[str | None], patient_ids: Sequence[str | None]) -> list[int]:
    """Connected components of the "same lesion or same patient" relation (union-find)."""
    n = len(lesion_ids)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen: dict[tuple[str, str], int] = {}
    for i in range(n):
        for kind, key in (("lesion", lesion_ids[i]), ("patient", patient_ids[i])):
            if key is None or key == "":
                continue
            j = first_seen.setdefault((kind, key), i)
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[ri] = rj
    roots = [find(i) for i in range(n)]
    remap: dict[int, int] = {}
    return [remap.setdefault(r, len(remap)) for r in roots]


def assign_splits(
    labels: Sequence[int],
    groups: Sequence[int],
    fractions: dict[str, float],
    seed: int,
) -> list[str]:
    """Split name for every item; no group spans two splits.

    Groups are visited largest first (random order among equal sizes, fixed by ``seed``); each goes
    to the split whose quota for the group's classes is least filled, relative to the quota
    (``fraction * class total``), so every split fills each class at the same pace and rare classes
    count as much as common ones. Ties (e.g. a class with fewer groups than splits) go to the split
    least filled overall.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    names = [s for s, f in fractions.items() if f > 0]
    if not names:
        raise ValueError("at least one split fraction must be > 0")
    totals = Counter(labels.tolist())
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups.tolist()):
        members[g].append(i)
    rng = np.random.default_rng(seed)
    order = list(members)
    rng.shuffle(order)
    order.sort(key=lambda g: -len(members[g]))  # stable: keeps the shuffled order within a size

    target = {s: {c: fractions[s] * n for c, n in totals.items()} for s in names}
    current = {s: Counter() for s in names}
    size_target = {s: fractions[s] * len(labels) for s in names}
    size_current = Counter()
    out = [""] * len(labels)
    for g in order:
        idx = members[g]
        counts = Counter(labels[idx].tolist())

        def score(s: str) -> tuple[float, float]:
            cls = sum(n * (target[s][c] - current[s][c]) / target[s][c] for c, n in counts.items())
            return cls, (size_target[s] - size_current[s]) / max(size_target[s], 1e-9)

        best = max(names, key=score)
        for i in idx:
            out[i] = best
        current[best].update(counts)
        size_current[best] += len(idx)
    return out
