"""Repeat factors per dataset (InternVL's and a stable fractional mode) and the mixture solver."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import xxhash


def internvl_copies(lines: np.ndarray, n_lines: int, repeat_time: float) -> np.ndarray:
    """InternVL: r < 1 keeps the first int(n·r) lines of the file; r >= 1 repeats int(r) times.

    ``lines`` are 1-based line numbers in the annotation file, ``n_lines`` its line count
    (bad lines included, as InternVL's ``readlines`` counts them).
    """
    lines = np.asarray(lines, dtype=np.int64)
    if repeat_time < 1:
        return (lines <= int(n_lines * repeat_time)).astype(np.int32)
    return np.full(len(lines), int(repeat_time), dtype=np.int32)


def unit_hash(sample_id: str, seed: int) -> float:
    """A uniform number in [0, 1) decided by the sample id and seed alone."""
    return xxhash.xxh3_64_intdigest(sample_id.encode(), seed=seed) / 2.0**64


def stable_copies(sample_ids: list[str], repeat_time: float, seed: int = 0) -> np.ndarray:
    """floor(r) copies, plus one with probability frac(r) decided per sample by a seeded hash.

    Reruns agree, and adding or removing another dataset changes nothing here.
    """
    whole = math.floor(repeat_time)
    frac = repeat_time - whole
    u = np.fromiter(
        (unit_hash(s, seed) for s in sample_ids), dtype=np.float64, count=len(sample_ids)
    )
    return (whole + (u < frac)).astype(np.int32)


def solve_repeat_factors(
    tokens_per_dataset: Mapping[str, int],
    target_tokens: int,
    weights: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Repeat factor r per dataset so that r·tokens gives each dataset its weight's share of
    ``target_tokens`` (equal shares without weights). A dataset with no tokens gets r = 0."""
    weights = weights or {}
    unknown = set(weights) - set(tokens_per_dataset)
    if unknown:
        raise ValueError(f"weights name unknown datasets: {sorted(unknown)}")
    w = {d: float(weights.get(d, 0.0 if weights else 1.0)) for d in tokens_per_dataset}
    total_w = sum(w.values())
    if total_w <= 0:
        raise ValueError("mixture weights must not all be zero")
    return {
        d: (target_tokens * w[d] / total_w / n if n else 0.0) for d, n in tokens_per_dataset.items()
    }
