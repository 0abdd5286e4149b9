"""subset_2k: the seeded training subset, stratified by reward type (RePIC trained on 2K of its 5K JSON).

RePIC did not publish its selection rule; ours: allocate `size` over the `accu_reward_method` strata in
proportion to their sizes (largest remainder), draw each stratum's share with a seeded RNG, keep source order.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from repic.core.io import RepicError
from repic.core.layout import REWARD_METHODS

REQUIRED = ("image", "problem", "solution", "accu_reward_method")


def validate_training(samples: Any, source: str) -> list[dict[str, Any]]:
    """Check RePIC's training schema; raise naming the sample index and the missing/bad key."""
    if not isinstance(samples, list):
        raise RepicError(f"{source}: expected a JSON list of training samples")
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            raise RepicError(f"{source}: sample {i}: expected an object")
        for key in REQUIRED:
            if key not in s:
                raise RepicError(f"{source}: sample {i}: missing key {key!r}")
        if s["accu_reward_method"] not in REWARD_METHODS:
            raise RepicError(f"{source}: sample {i}: accu_reward_method {s['accu_reward_method']!r} "
                             f"not one of {REWARD_METHODS}")
    return samples


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
