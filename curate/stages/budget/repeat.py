"""Repeat factors per dataset (InternVL's and a stable fractional mode) and the mixture solver."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import xxhash

from curate.core.errors import CurateError


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


class MixtureError(CurateError):
    """The mixture solver's weights do not fit the run's datasets."""


def check_weights(weights: Mapping[str, float] | None, datasets: Iterable[str]) -> None:
    """Weights may name only the run's datasets: a one-line error names the known ones."""
    known = list(datasets)
    unknown = sorted(set(weights or {}) - set(known))
    if unknown:
        raise MixtureError(
            f"weights name unknown datasets {unknown}; the run's datasets are {known}"
        )


def solve_repeat_factors(
    tokens_per_dataset: Mapping[str, int],
    target_tokens: int,
    weights: Mapping[str, float] | None = None,
    *,
    basis: str = "natural",
    repeat_times: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Repeat factor r per dataset so that the effective tokens sum(r·tokens) are
    ``target_tokens``. Datasets not named in ``weights`` have weight 1.

    - ``natural``: r = s · weight · repeat_time (the meta JSON's, default 1), one scale s for
      all: a weight is relative to the dataset's natural size as InternVL's repeat_time is, and
      weight 1 everywhere keeps the meta's mixture.
    - ``equal``: dataset d gets the share weight_d / sum(weights) of the target whatever its
      size.

    A dataset with no tokens gets r = 0 and takes no share from the others.
    """
    check_weights(weights, tokens_per_dataset)
    weights = weights or {}
    repeat_times = repeat_times or {}
    if basis not in ("natural", "equal"):
        raise MixtureError(f"weight_basis must be natural or equal, not {basis!r}")
    w = {d: float(weights.get(d, 1.0)) for d in tokens_per_dataset}
    # Each dataset's part of the target: weight x repeat_time x its tokens (natural) or its
    # weight alone (equal); r then turns that part into copies of the dataset's tokens.
    if basis == "natural":
        part = {
            d: w[d] * float(repeat_times.get(d, 1.0)) * n for d, n in tokens_per_dataset.items()
        }
    else:
        part = {d: (w[d] if n else 0.0) for d, n in tokens_per_dataset.items()}
    total = sum(part.values())
    if total <= 0:
        raise MixtureError("mixture weights are zero for every dataset with tokens")
    return {
        d: (target_tokens * part[d] / total / n if n else 0.0)
        for d, n in tokens_per_dataset.items()
    }
