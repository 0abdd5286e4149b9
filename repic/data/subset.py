"""subset_2k: the seeded training subset, stratified by reward type (RePIC trained on 2K of its 5K JSON).

RePIC did not publish its selection rule; ours: allocate `size` over the `accu_reward_method` strata in
proportion to their sizes (largest remainder), draw each stratum's share with a seeded RNG, keep source order.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any


def stratified_subset(samples: list[dict[str, Any]], size: int, seed: int) -> tuple[list[int], dict[str, Any]]:
    """Indices of the subset (source order) and a manifest of the rule, seed and per-stratum counts."""
    strata: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        strata[s["accu_reward_method"]].append(i)
    size = min(size, len(samples))
    total = len(samples)
    quotas = {m: size * len(ix) / total for m, ix in strata.items()}
    alloc = {m: int(q) for m, q in quotas.items()}
    # Largest remainder, ties broken by method name so the allocation is deterministic.
    for m in sorted(strata, key=lambda m: (alloc[m] - quotas[m], m))[: size - sum(alloc.values())]:
        alloc[m] += 1
    rng = random.Random(seed)
    chosen: list[int] = []
    for m in sorted(strata):
        chosen.extend(rng.sample(strata[m], alloc[m]))
    chosen.sort()
    manifest = {
        "rule": "proportional allocation over accu_reward_method (largest remainder), seeded draw per stratum",
        "seed": seed,
        "size": len(chosen),
        "source_size": total,
        "counts": {m: alloc[m] for m in sorted(strata)},
        "source_counts": {m: len(strata[m]) for m in sorted(strata)},
    }
    return chosen, manifest
