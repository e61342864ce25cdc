"""Offline 2-D bin packing: samples into packs of at most C tokens and K tiles.

InternVL packs online (first fit over a buffer of 20 open packs, see `internvl_packer`), which
costs a few percent more packs than needed when tiles bind and 10-30% more when tokens do.
Curation knows every sample's (tokens, tiles) before training, so it packs offline, close to
the lower bound max(ceil(sum tokens / C), ceil(sum tiles / K)).

No single method is good everywhere, so five packers cover the range of the mixture's load
ratio rho = (sum tokens / C) / (sum tiles / K) (above 1 tokens bind, below 1 tiles do). Those
whose range holds rho run in turn, in the order below, until one lands within 0.1% of the bound
(0.5% from 200k samples on, where a greedy pass costs seconds); the fewest packs win. All but
the plan and the combined fit place the image samples first and the text-only samples (0 tiles)
last, best fit on tokens: text is the only thing that can use the token room of packs whose
tiles are full, so it must not be spent before those packs exist.

- Plan (1,000 samples or more; first below rho 1.25, after token fit above). Where both caps
  bind, greedy packers end with packs full in one cap and short in the other. The plan solves
  the 2-D cutting-stock LP on at most 48 item types (tile count x token group, mean tokens),
  deals the samples to the slots of the LP's patterns, re-matches samples of equal tile count
  between packs until the token loads fit (tiles never move), and best-fits what is left.
  0-0.1% above the bound where both caps bind, against 1-4% for the greedy packers; see "the
  2-D pattern plan" below.
- Patterns (rho < 1; document-heavy mixtures of 13-tile images with short answers). Tile counts
  are small integers, so packing image samples by tiles is a cutting-stock problem; its LP
  (column generation, knapsack pricing) yields patterns such as 13+13+13+9 and 13+13+10+10+1+1
  that fill K exactly. Packs are built from the LP solution rounded down and samples dealt to
  their slots so token loads even out; leftovers (rounding, token overflow) go best fit on
  tiles. Greedy decreasing orders put the big sizes together first and strand the fillers.
- Tile fit (0.85 <= rho < 1.25; both caps bind): image samples by tokens descending, each into
  the pack with the tightest tile fit and, among those, the most token room for text.
- Combined fit (0.85 <= rho < 1.25; both caps bind): all samples by tokens / C + tiles / K
  descending, each into the pack it leaves with the least combined room (best fit by the L1
  norm, Panigrahy et al., "Heuristics for Vector Bin Packing"). Where both caps bind it is
  0-0.4% below tile fit on single-image mixtures and above it elsewhere: both run.
- Token fit (rho >= 1; tokens bind): best-fit decreasing on tokens, the tightest pack whose tiles
  fit too; failing that the tightest tile fit, as above.

Where the result is above the bound and the input small, or over 0.5% above it (big items the
bound cannot see), InternVL's greedy also runs and the fewer packs are kept, so never packing
worse than InternVL is built in where it could fail rather than only observed.

Best fit needs "the open pack with the least room >= x" fast. Token rooms are kept in a
two-level bitmap of Python ints (`_Bitset`: a lowest-set-bit query is a shift and `m & -m`,
run in C) with one stack of packs per room value; tile rooms in one heap per remaining-tile
count (at most K + 1). 1M samples take 1-3 CPU seconds where both caps bind (the plan's LP
costs the same at any size), a few seconds elsewhere.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain, pairwise

import numpy as np
from numpy.typing import ArrayLike

from curate.stages.pack.bounds import (
    PatternPricer,
    pattern_columns,
    solve_pattern_master,
    solve_tile_lp,
    tile_lp_bound,
)
from curate.stages.pack.internvl_packer import internvl_greedy_pack

# A packer: (tokens, tiles, C, K) -> the sample indices of each pack.
_Packer = Callable[[np.ndarray, np.ndarray, int, int], list[list[int]]]
# The pattern LP's knapsack pricing is O(K) numpy steps; above this tile cap (InternVL uses
# 40-48) the patterns packer is skipped.
_MAX_PATTERN_TILES = 128
# InternVL's greedy packer also runs (about 3 us per sample) when ours is above the lower bound
# and the input is small, or ours is this far above it (mixtures of big items the bound cannot
# see), so "never more packs than InternVL" holds by construction where it could fail.
_BASELINE_ALWAYS_BELOW = 50_000
_BASELINE_GAP = 0.005
# Below this load ratio the tile LP bound (a fraction of a second) sharpens the bound used to
# stop early and to decide on the baseline check.
_TILE_LP_BOUND_BELOW = 1.25
# A packing this close to the lower bound (the target curate aims at) ends the search: the other
# packers in range are not tried. On big inputs, where each greedy packer costs seconds, being
# within the 0.5% target ends it too.
_GOOD_ENOUGH = 0.001
_BIG_INPUT = 200_000
# The 2-D pattern plan (`_pack_by_plan`). Below this many samples the greedy packers (and
# InternVL's) are as good and its LP's fixed cost (0.1-1 s) is not worth paying.
_PLAN_MIN_SAMPLES = 1000
_PLAN_TYPES = 48  # item types of the plan's LP: tile count x token group; rounds grow with it
_PLAN_GROUPS = 8  # token groups per tile count at most
_PLAN_TOKEN_UNITS = 1024  # knapsack grid: the planned token room of a pack in units
_PLAN_SLACK = 0.0003  # packs are planned to 1 - this of C, on mean sizes
_PLAN_SEED_SAMPLES = 5000  # a combined-fit packing of a sample of this many seeds the LP
_PLAN_MAX_ROUNDS = 300  # column generation rounds (a count, not a time: deterministic)
_PLAN_SWEEPS = 6  # rebalancing sweeps over the slot layers


@dataclass(frozen=True)
class PackStats:
    """How full a packing is, and how far from the 2-D lower bound."""

    packs: int
    lower_bound: int
    token_fill: float  # sum tokens / (packs * C)
    tile_fill: float  # sum tiles / (packs * K)

    @property
    def ratio(self) -> float:
        """Packs over the lower bound (1.0 is optimal; 1.001 is 0.1% above)."""
        return self.packs / self.lower_bound if self.lower_bound else 1.0


def lower_bound(tokens: ArrayLike, tiles: ArrayLike, *, max_tokens: int, max_tiles: int) -> int:
    """The 2-D lower bound max(ceil(sum tokens / C), ceil(sum tiles / K)) on the pack count."""
    tok, til = _as_lengths(tokens, tiles)
    return max(_ceil_div(int(tok.sum()), max_tokens), _ceil_div(int(til.sum()), max_tiles))


def pack_stats(
    packs: list[list[int]],
    tokens: ArrayLike,
    tiles: ArrayLike,
    *,
    max_tokens: int,
    max_tiles: int,
) -> PackStats:
    """Measure a packing of (tokens, tiles) under caps (C, K): count, fills, lower bound."""
    tok, til = _as_lengths(tokens, tiles)
    n = len(packs)
    return PackStats(
        packs=n,
        lower_bound=lower_bound(tok, til, max_tokens=max_tokens, max_tiles=max_tiles),
        token_fill=float(tok.sum()) / (n * max_tokens) if n else 0.0,
        tile_fill=float(til.sum()) / (n * max_tiles) if n else 0.0,
    )


def pack_lengths(
    tokens: ArrayLike,
    tiles: ArrayLike,
    *,
    max_tokens: int,
    max_tiles: int,
    seed: int = 0,
) -> list[list[int]]:
    """Pack samples (tokens[i], tiles[i]) into packs with sum tokens <= C and sum tiles <= K.

    Returns the sample indices of each pack (ascending within a pack); every index appears
    exactly once. The packs' contents do not depend on `seed`; their order is a permutation
    drawn from it, so a manifest is not sorted by sample size (big videos first) yet the same
    seed gives the same list. Raises ValueError naming the first sample over either cap: the
    calling stage rejects those before packing.
    """
    tok, til = _as_lengths(tokens, tiles)
    _check_caps(tok, til, max_tokens, max_tiles)
    if tok.size == 0:
        return []
    bound = lower_bound(tok, til, max_tokens=max_tokens, max_tiles=max_tiles)
    rho = _load_ratio(tok, til, max_tokens, max_tiles)
    if rho < _TILE_LP_BOUND_BELOW and max_tiles <= _MAX_PATTERN_TILES:  # tiles may bind
        bound = max(bound, tile_lp_bound(til, max_tiles=max_tiles))
    good_enough = _BASELINE_GAP if tok.size >= _BIG_INPUT else _GOOD_ENOUGH
    runs: list[list[list[int]]] = []
    for packer in _packers_for(rho, max_tiles, tok.size):
        runs.append(packer(tok, til, max_tokens, max_tiles))
        if min(map(len, runs)) <= bound * (1 + good_enough):
            break
    if _baseline_could_win(min(map(len, runs)), bound, tok.size):
        runs.append(internvl_greedy_pack(tok, til, max_tokens=max_tokens, max_tiles=max_tiles))
    return _shuffled_sorted(min(runs, key=len), seed)


# --- input checks ---------------------------------------------------------------------------


def _as_lengths(tokens: ArrayLike, tiles: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Both lengths as 1-D int64 arrays of the same size, non-negative."""
    tok = np.asarray(tokens, dtype=np.int64).reshape(-1)
    til = np.asarray(tiles, dtype=np.int64).reshape(-1)
    if tok.shape != til.shape:
        raise ValueError(f"tokens and tiles differ in length: {tok.size} != {til.size}")
    neg = np.flatnonzero((tok < 0) | (til < 0))
    if neg.size:
        raise ValueError(f"sample {int(neg[0])} has a negative length")
    return tok, til


def _check_caps(tok: np.ndarray, til: np.ndarray, max_tokens: int, max_tiles: int) -> None:
    """Caps must be positive and every sample must fit an empty pack on its own."""
    if max_tokens < 1 or max_tiles < 1:
        raise ValueError(f"caps must be >= 1, got max_tokens={max_tokens}, max_tiles={max_tiles}")
    over = np.flatnonzero((tok > max_tokens) | (til > max_tiles))
    if over.size:
        i = int(over[0])
        raise ValueError(
            f"sample {i} is over the caps: {int(tok[i])} tokens (max {max_tokens}), "
            f"{int(til[i])} tiles (max {max_tiles}); {over.size} sample(s) over in all"
        )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _ceil_lp(x: float) -> int:
    """ceil(x) for an LP value, forgiving float noise just above an integer."""
    return int(np.ceil(x - 1e-6))


# --- the three packers ----------------------------------------------------------------------


def _load_ratio(tok: np.ndarray, til: np.ndarray, max_tokens: int, max_tiles: int) -> float:
    """(sum tokens / C) / (sum tiles / K): above 1 tokens bind, below 1 tiles do."""
    tiles = int(til.sum())
    return int(tok.sum()) * max_tiles / (tiles * max_tokens) if tiles else float("inf")


def _pack_by_tile_fit(
    tok: np.ndarray, til: np.ndarray, max_tokens: int, max_tiles: int
) -> list[list[int]]:
    """Image samples by tokens descending, each into the tightest tile fit (among those the
    most token room); then text-only samples best fit on tokens."""
    packs = _Packs(tok.tolist(), til.tolist(), max_tokens, max_tiles)
    _best_fit_tiles(packs, _decreasing(np.flatnonzero(til > 0), tok, til))
    _best_fit_tokens(packs, _decreasing(np.flatnonzero(til == 0), tok, til))
    return packs.members


def _pack_by_token_fit(
    tok: np.ndarray, til: np.ndarray, max_tokens: int, max_tiles: int
) -> list[list[int]]:
    """Best-fit decreasing on tokens: image samples, then text-only samples."""
    packs = _Packs(tok.tolist(), til.tolist(), max_tokens, max_tiles)
    _best_fit_image_tokens(packs, _decreasing(np.flatnonzero(til > 0), tok, til))
    _best_fit_tokens(packs, _decreasing(np.flatnonzero(til == 0), tok, til))
    return packs.members


def _pack_by_patterns(
    tok: np.ndarray, til: np.ndarray, max_tokens: int, max_tiles: int
) -> list[list[int]]:
    """Tile-LP patterns for the image samples, best fit for leftovers, then text on tokens."""
    packs = _Packs(tok.tolist(), til.tolist(), max_tokens, max_tiles)
    image = np.flatnonzero(til > 0)
    if image.size:
        itok, itil = tok[image], til[image]
        sizes, demand = np.unique(itil, return_counts=True)
        patterns, copies = _tile_patterns(sizes, demand, max_tiles)
        bin_of = _fill_patterns(itok, itil, sizes, patterns, copies)
        _evict_over_cap(bin_of, itok, max_tokens)
        _add_bins(packs, image, bin_of, itok, itil)
        _best_fit_tiles(packs, _decreasing(image[bin_of < 0], til, tok))
    _best_fit_tokens(packs, _decreasing(np.flatnonzero(til == 0), tok, til))
    return packs.members


def _pack_by_combined_fit(
    tok: np.ndarray, til: np.ndarray, max_tokens: int, max_tiles: int
) -> list[list[int]]:
    """Best-fit decreasing on the combined size tokens / C + tiles / K, all samples at once:
    each goes into the pack it leaves with the least combined room (Panigrahy et al.'s
    "Heuristics for Vector Bin Packing": best fit by the L1 norm of the remaining room)."""
    packs = _Packs(tok.tolist(), til.tolist(), max_tokens, max_tiles)
    size = tok / max_tokens + til / max_tiles
    order = np.lexsort((np.arange(tok.size), -til, -size)).tolist()
    _best_fit_combined(packs, order)
    return packs.members


def _pack_by_plan(
    tok: np.ndarray, til: np.ndarray, max_tokens: int, max_tiles: int
) -> list[list[int]]:
    """Packs from the 2-D pattern LP on item types, rebalanced on real tokens; then best fit.

    See "the 2-D pattern plan" below. Samples of no size, those the rounded-down plan leaves
    out and those taken out of packs over the token cap go best fit on tokens / C + tiles / K.
    """
    packs = _Packs(tok.tolist(), til.tolist(), max_tokens, max_tiles)
    pack_of = np.full(tok.size, -1, dtype=np.int64)
    sized = np.flatnonzero((tok > 0) | (til > 0))
    if sized.size:
        try:
            plan = _plan(tok, til, sized, max_tokens, max_tiles)
        except RuntimeError:  # the LP solver gave up: the best fit below packs everything
            plan = None
        if plan is not None:
            pack_of[sized] = _deal(tok[sized], *plan)
            load = _rebalance(tok, til, pack_of, max_tokens)
            _evict_smallest_over(tok, pack_of, load, max_tokens)
            _add_bins(packs, np.arange(tok.size), pack_of, tok, til)
    rest = np.flatnonzero(pack_of < 0)
    size = tok[rest] / max_tokens + til[rest] / max_tiles
    _best_fit_combined(packs, rest[np.lexsort((rest, -til[rest], -size))].tolist())
    return packs.members


# (packer, lowest rho, rho below): where each can be the best; see the module docstring.
# The plan comes first where both caps may bind; where tokens bind it runs after token fit, which
# is near the bound on most such mixtures, and pays off where big samples strand room
# (image-heavy at 8192 / 40: 1.3% fewer packs).
_PACKERS = (
    (_pack_by_plan, 0.0, 1.25),
    (_pack_by_patterns, 0.0, 1.0),
    (_pack_by_token_fit, 1.0, float("inf")),
    (_pack_by_plan, 1.25, float("inf")),
    (_pack_by_combined_fit, 0.85, 1.25),
    (_pack_by_tile_fit, 0.85, 1.25),
)


def _packers_for(rho: float, max_tiles: int, n: int) -> list[_Packer]:
    """The packers whose load-ratio range holds rho, in `_PACKERS` order (at least one).

    The LP packers need small tile caps (their knapsacks are O(K)); the plan, some samples.
    """
    small_k = max_tiles <= _MAX_PATTERN_TILES
    usable = [
        packer
        for packer, lo, hi in _PACKERS
        if lo <= rho < hi
        and (packer is not _pack_by_patterns or small_k)
        and (packer is not _pack_by_plan or (small_k and n >= _PLAN_MIN_SAMPLES))
    ]
    return usable or [_pack_by_tile_fit if rho < 1 else _pack_by_token_fit]


def _baseline_could_win(packs: int, bound: int, n: int) -> bool:
    """Should InternVL's greedy run as a baseline check? Not where ours meets the bound, nor on
    big inputs within 0.5% of it (InternVL's greedy measures 0.4-30% above the bound)."""
    return packs > bound and (n < _BASELINE_ALWAYS_BELOW or packs > bound * (1 + _BASELINE_GAP))


def _decreasing(idx: np.ndarray, primary: np.ndarray, secondary: np.ndarray) -> list[int]:
    """Indices `idx` by primary size descending, then secondary descending, then index."""
    order = np.lexsort((idx, -secondary[idx], -primary[idx]))
    return idx[order].tolist()


def _shuffled_sorted(members: list[list[int]], seed: int) -> list[list[int]]:
    """The packs in a seeded random order, each pack's indices ascending (one numpy sort)."""
    n = len(members)
    sizes = np.fromiter(map(len, members), dtype=np.int64, count=n)
    flat = np.fromiter(chain.from_iterable(members), dtype=np.int64, count=int(sizes.sum()))
    rank = np.random.default_rng(seed).permutation(n)  # pack p goes to position rank[p]
    key = np.repeat(rank, sizes) * flat.size + flat  # by position, then by sample index
    flat = flat[np.argsort(key)].tolist()
    ends = np.cumsum(sizes[np.argsort(rank)]).tolist()
    return [flat[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]


# --- the tile pattern LP (cutting stock) ----------------------------------------------------


def _tile_patterns(
    sizes: np.ndarray, demand: np.ndarray, cap: int
) -> tuple[np.ndarray, np.ndarray]:
    """Packs to build: patterns[p, i] samples of tile size sizes[i] each, copies[p] times.

    The copies are the LP solution rounded down, so no size is used more often than the LP
    says; since the LP may over-cover a size (it is the >= form), a slot can stay empty.
    """
    basis, x, _ = solve_tile_lp(sizes, demand.astype(float), cap)
    copies = np.floor(x + 1e-9).astype(np.int64)
    keep = copies > 0
    return np.rint(basis.T[keep]).astype(np.int64), copies[keep]


# --- the 2-D pattern plan -------------------------------------------------------------------
#
# Where both caps bind, a pack must be full in tokens and in tiles at once, and greedy packers
# end with packs full in one and short in the other (at rho 1, one pack in ten 15% short of a
# cap). The plan chooses pack contents globally instead:
#
# 1. Types. Samples are grouped by tile count, and within one by tokens into up to 8 groups cut
#    at equal shares of token mass above the smallest (narrow groups where the long answers
#    are); a type is (tile count, group) with its mean tokens. At most 48 types, so the LP
#    below costs the same at 10k and at 1M samples.
# 2. LP. The 2-D cutting-stock LP on the types (bounds.PatternPricer, HiGHS), the token room
#    C (1 - 0.03%) split into 1024 units; the unit shrinks by the tokens that rounding type
#    means to it drops, so the planned token total is not below the real one. Seeded with the
#    patterns of a combined-fit packing of 5,000 samples. Patterns are taken floor(x) times.
# 3. Deal. Each type's samples, most tokens first, go to the plan's slots for that type, each
#    round to the packs whose tokens so far are furthest below plan. Where the rounded-down
#    plan has fewer slots than samples, the samples left out are spread evenly over the type's
#    token range (leaving out the smallest would overload every pack).
# 4. Rebalance. Samples of one tile count are interchangeable as far as tiles go, so they can
#    move between packs without touching the tile cap. A layer is the j-th sample of tile count
#    k of every pack that has one; re-matching a layer (most tokens to the pack with the most
#    token room left by its other samples) minimizes the layer's largest and total overflow
#    (sorted matching of convex costs). Six sweeps over all layers; the sweep with the fewest
#    packs over C is kept.
# 5. Evict. From a pack still over C, the sample with the fewest tokens that ends the overflow
#    goes out; those go best fit into the room left, or into new packs.


def _plan(
    tok: np.ndarray, til: np.ndarray, sized: np.ndarray, max_tokens: int, max_tiles: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Steps 1-2 above: (type of each sized sample, type mean tokens, patterns (patterns x
    types), the pattern of each pack); None if the rounded-down plan has no pack."""
    type_of, type_til, type_mean = _plan_types(tok[sized], til[sized])
    demand = np.bincount(type_of, minlength=type_mean.size)
    units = _PLAN_TOKEN_UNITS
    type_tok = _planned_units(type_mean, type_til, demand, tok, til, max_tokens, max_tiles)
    pricer = PatternPricer(type_tok, type_til, demand, units, max_tiles)
    columns = pricer.single_type_columns()
    seed = _seed_packing(tok[sized], til[sized], max_tokens, max_tiles)
    if seed:
        cols = pattern_columns(seed, type_of, type_mean.size)
        fits = (type_tok @ cols <= units) & (type_til @ cols <= max_tiles)
        columns = np.hstack([columns, cols[:, fits]])
    solved, x = columns, None
    for _ in range(_PLAN_MAX_ROUNDS):
        _, duals, _, x = solve_pattern_master(columns, demand)
        solved = columns
        patterns, v_star = pricer.best_patterns(duals)
        if v_star <= 1 + 1e-6 or not patterns.shape[1]:
            break
        columns = np.hstack([columns, patterns])
    copies = np.floor(x + 1e-9).astype(np.int64) if x is not None else np.zeros(0, np.int64)
    keep = np.flatnonzero(copies > 0)
    if not keep.size:
        return None
    patterns = np.rint(solved[:, keep]).T.astype(np.int64)
    return type_of, type_mean, patterns, np.repeat(np.arange(keep.size), copies[keep])


def _plan_types(tok: np.ndarray, til: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(type of each sample, type tile counts, type mean tokens); see step 1 above.

    A tile count gets groups in proportion to its samples (1 to `_PLAN_GROUPS`); cuts fall at
    equal shares of sum(t - t_min + 1), so the long tail of answers gets narrow groups.
    """
    order = np.lexsort((tok, til))
    counts, type_of = np.unique(til, return_counts=True)[1], np.empty(tok.size, dtype=np.int64)
    type_til, type_mean, start = [], [], 0
    for n_k in counts.tolist():
        idx = order[start : start + n_k]
        start += n_k
        groups = max(1, min(_PLAN_GROUPS, round(_PLAN_TYPES * n_k / tok.size)))
        mass = np.cumsum(tok[idx] - tok[idx[0]] + 1.0)
        cuts = np.unique(np.searchsorted(mass / mass[-1], np.arange(1, groups) / groups))
        for part in np.split(idx, cuts):
            if part.size:
                type_of[part] = len(type_til)
                type_til.append(int(til[part[0]]))
                type_mean.append(float(tok[part].mean()))
    return type_of, np.array(type_til, dtype=np.int64), np.array(type_mean)


def _planned_units(
    mean: np.ndarray,
    type_til: np.ndarray,
    demand: np.ndarray,
    tok: np.ndarray,
    til: np.ndarray,
    max_tokens: int,
    max_tiles: int,
) -> np.ndarray:
    """Type token sizes in plan units (rint of mean / unit, at least 1 for text-only types).

    The unit is C (1 - slack) / U, shrunk by the tokens rounding to nearest drops per pack, so
    the planned total matches the real one (an underestimate would overload every pack).
    """
    units = _PLAN_TOKEN_UNITS
    target = max_tokens * (1 - _PLAN_SLACK)
    packs = max(float(tok.sum()) / max_tokens, float(til.sum()) / max_tiles, 1.0)
    unit = target / units
    for _ in range(3):  # the unit moves the rounding, which moves the unit: a few steps settle
        dropped = float(demand @ (mean - np.rint(mean / unit) * unit))
        unit = (target - max(dropped, 0.0) / packs) / units
    sizes = np.clip(np.rint(mean / unit), 0, units).astype(np.int64)
    return np.where((sizes == 0) & (type_til == 0), 1, sizes)


def _seed_packing(
    tok: np.ndarray, til: np.ndarray, max_tokens: int, max_tiles: int
) -> list[list[int]]:
    """A combined-fit packing of a fixed sample (seeded: deterministic), in original indices."""
    n = min(tok.size, _PLAN_SEED_SAMPLES)
    pick = np.sort(np.random.default_rng(0).choice(tok.size, size=n, replace=False))
    packs = _pack_by_combined_fit(tok[pick], til[pick], max_tokens, max_tiles)
    return [pick[p].tolist() for p in packs]


def _deal(
    tok: np.ndarray,
    type_of: np.ndarray,
    type_mean: np.ndarray,
    patterns: np.ndarray,
    pack_pattern: np.ndarray,
) -> np.ndarray:
    """The pack of each sample (-1: no slot), dealt as in step 3 above."""
    pack_of = np.full(tok.size, -1, dtype=np.int64)
    ahead = np.zeros(pack_pattern.size)  # tokens dealt minus the types' means: above plan
    order = np.argsort(type_of, kind="stable")
    starts = np.searchsorted(type_of[order], np.arange(type_mean.size + 1))
    spread = [np.ptp(tok[order[a:b]]) if b > a else 0 for a, b in pairwise(starts)]
    for j in np.argsort(-np.asarray(spread), kind="stable").tolist():
        items = order[starts[j] : starts[j + 1]]
        items = items[np.argsort(-tok[items], kind="stable")]
        mult = patterns[pack_pattern, j]
        holders = np.flatnonzero(mult)
        slots = int(mult.sum())
        if slots < items.size:  # leave out samples spread over the range, not the smallest
            items = items[((np.arange(slots) + 0.5) * items.size / slots).astype(np.int64)]
        start, r = 0, 0
        while start < items.size and holders.size:
            holders = holders[mult[holders] > r]
            take_packs = holders[np.argsort(ahead[holders], kind="stable")]
            take = items[start : start + take_packs.size]
            take_packs = take_packs[: take.size]
            pack_of[take] = take_packs
            ahead[take_packs] += tok[take] - type_mean[j]
            start += take.size
            r += 1
    return pack_of


def _rebalance(tok: np.ndarray, til: np.ndarray, pack_of: np.ndarray, cap: int) -> np.ndarray:
    """Re-match the slot layers (step 4 above) in place; returns the packs' token loads."""
    placed = np.flatnonzero(pack_of >= 0)
    n_packs = int(pack_of.max(initial=-1)) + 1
    load = np.bincount(pack_of[placed], weights=tok[placed], minlength=n_packs).astype(np.int64)
    layers = _layers(til, pack_of, placed)
    best = (int((load > cap).sum()), pack_of.copy(), load.copy())
    for _ in range(_PLAN_SWEEPS):
        if not best[0]:
            break
        for items in layers:
            packs = pack_of[items]
            base = load[packs] - tok[items]
            by_room = np.argsort(base, kind="stable")  # most room first
            items[by_room] = items[np.argsort(-tok[items], kind="stable")]
            pack_of[items] = packs
            load[packs] = base + tok[items]
        over = int((load > cap).sum())
        if over < best[0]:
            best = (over, pack_of.copy(), load.copy())
    pack_of[:] = best[1]
    return best[2]


def _layers(til: np.ndarray, pack_of: np.ndarray, placed: np.ndarray) -> list[np.ndarray]:
    """Layer (k, j): the j-th placed sample of tile count k in each pack that has one."""
    order = placed[np.lexsort((pack_of[placed], til[placed]))]  # by tile count, then pack
    key = til[order] * (int(pack_of.max()) + 1) + pack_of[order]
    rank = np.arange(order.size) - np.searchsorted(key, key)  # j within (tile count, pack)
    layer = til[order] * (int(rank.max(initial=0)) + 1) + rank
    by_layer = np.argsort(layer, kind="stable")
    cuts = np.flatnonzero(np.diff(layer[by_layer])) + 1
    return np.split(order[by_layer], cuts) if order.size else []


def _evict_smallest_over(tok: np.ndarray, pack_of: np.ndarray, load: np.ndarray, cap: int) -> None:
    """Until no pack is over the token cap: from each pack over it, take out the sample with the
    fewest tokens that ends the overflow (or, if none does, the one with the most)."""
    while True:
        over = load > cap
        if not over.any():
            return
        placed = np.flatnonzero(pack_of >= 0)
        cand = placed[over[pack_of[placed]]]
        packs = pack_of[cand]
        ends = tok[cand] >= load[packs] - cap
        # per pack, first: samples that end it (fewest tokens first), then the biggest others
        key = np.where(ends, tok[cand], -tok[cand] + 2 * cap + 1)
        order = np.lexsort((cand, key, packs))
        first = order[np.r_[True, packs[order][1:] != packs[order][:-1]]]
        out = cand[first]
        load[pack_of[out]] -= tok[out]
        pack_of[out] = -1


# --- building packs from patterns -----------------------------------------------------------


def _fill_patterns(
    tok: np.ndarray, til: np.ndarray, sizes: np.ndarray, patterns: np.ndarray, copies: np.ndarray
) -> np.ndarray:
    """Put samples (here: the image samples) into the pattern packs' slots, evening out tokens.

    Largest tile size first. Within a size, slot round j covers the packs holding more than j
    samples of it; the round gives the samples with the most tokens to the packs with the
    fewest tokens so far. Even token loads leave room for the text-only samples everywhere.
    Returns the pack of each sample (-1: no slot left).
    """
    bin_pattern = np.repeat(np.arange(copies.size), copies)
    load = np.zeros(bin_pattern.size, dtype=np.int64)
    bin_of = np.full(tok.size, -1, dtype=np.int64)
    order = np.lexsort((-tok, til))  # by tile size, most tokens first within a size
    bounds = np.searchsorted(til[order], np.append(sizes, sizes[-1] + 1))
    for i in range(sizes.size - 1, -1, -1):
        group = order[bounds[i] : bounds[i + 1]]
        mult = patterns[bin_pattern, i] if copies.size else np.zeros(0, dtype=np.int64)
        start = 0
        for j in range(int(mult.max(initial=0))):
            if start >= group.size:
                break
            slots = np.flatnonzero(mult > j)
            slots = slots[np.argsort(load[slots], kind="stable")][: group.size - start]
            take = group[start : start + slots.size]
            bin_of[take] = slots
            load[slots] += tok[take]
            start += slots.size
    return bin_of


def _evict_over_cap(bin_of: np.ndarray, tok: np.ndarray, cap: int) -> None:
    """Take samples out of packs over the token cap, most tokens first, until they fit.

    Patterns hold on mean tokens, so a pack dealt many long samples can overflow; evicted
    samples (bin -1) go to best fit with the other leftovers.
    """
    placed = bin_of >= 0
    load = np.bincount(bin_of[placed], weights=tok[placed])
    over = np.flatnonzero(load > cap)
    if not over.size:
        return
    cand = np.flatnonzero(np.isin(bin_of, over))
    cand = cand[np.lexsort((-tok[cand], bin_of[cand]))]  # by pack, most tokens first
    excess = {b: load[b] - cap for b in over.tolist()}
    for s, b in zip(cand.tolist(), bin_of[cand].tolist(), strict=True):
        if excess[b] > 0:
            excess[b] -= tok[s]
            bin_of[s] = -1


def _add_bins(
    packs: _Packs, image: np.ndarray, bin_of: np.ndarray, tok: np.ndarray, til: np.ndarray
) -> None:
    """Open the packs of a slot assignment: sample image[s] (tok[s] tokens, til[s] tiles) goes
    into pack bin_of[s]; packs left empty are dropped."""
    placed = np.flatnonzero(bin_of >= 0)
    bins = bin_of[placed]
    order = placed[np.argsort(bins, kind="stable")]
    n_bins = int(bins.max(initial=-1)) + 1
    counts = np.bincount(bins, minlength=n_bins).tolist()
    tokens = np.bincount(bins, weights=tok[placed], minlength=n_bins).astype(np.int64).tolist()
    tiles = np.bincount(bins, weights=til[placed], minlength=n_bins).astype(np.int64).tolist()
    members = image[order].tolist()
    start = 0
    for b, c in enumerate(counts):
        if c:
            packs.add(members[start : start + c], tokens[b], tiles[b])
            start += c


# --- open packs and the best-fit passes -----------------------------------------------------


class _Packs:
    """Open packs: members, remaining token room and remaining tile room per pack."""

    def __init__(self, tok: list[int], til: list[int], max_tokens: int, max_tiles: int) -> None:
        self.tok, self.til = tok, til
        self.max_tokens, self.max_tiles = max_tokens, max_tiles
        self.members: list[list[int]] = []
        self.room_tok: list[int] = []
        self.room_til: list[int] = []

    def open(self, i: int) -> int:
        """Start a new pack holding sample i; return its id."""
        return self.add([i], self.tok[i], self.til[i])

    def add(self, members: list[int], tokens: int, tiles: int) -> int:
        """Add a pack holding `members` (that many tokens and tiles); return its id."""
        self.members.append(members)
        self.room_tok.append(self.max_tokens - tokens)
        self.room_til.append(self.max_tiles - tiles)
        return len(self.members) - 1


def _best_fit_tiles(packs: _Packs, order: list[int]) -> None:
    """Best fit on tiles; among the tightest-fitting packs, the one with most token room.

    `heaps[r]` holds (-token room, pack) for the packs with exactly r tiles of room, and bit r
    of `used` says heaps[r] is non-empty, so the search for sample i visits the non-empty
    r >= tiles[i] in order and stops at the first whose roomiest pack has the tokens. Packs
    with no tile room left drop out. Packs already open (from the patterns) take part.
    """
    tok, til, members = packs.tok, packs.til, packs.members
    room_tok, room_til = packs.room_tok, packs.room_til
    heaps: list[list[tuple[int, int]]] = [[] for _ in range(packs.max_tiles + 1)]
    for p, r in enumerate(room_til):
        if r > 0:
            heaps[r].append((-room_tok[p], p))
    used = 0
    for r, h in enumerate(heaps):
        heapq.heapify(h)
        used |= bool(h) << r
    heappop, heappush = heapq.heappop, heapq.heappush
    for i in order:
        t, k = tok[i], til[i]
        m = used >> k
        while m:
            low = m & -m
            r = k + low.bit_length() - 1
            h = heaps[r]
            if -h[0][0] >= t:
                p = heappop(h)[1]
                if not h:
                    used ^= 1 << r
                members[p].append(i)
                room_tok[p] -= t
                room_til[p] = r = r - k
                break
            m ^= low
        else:
            p = packs.open(i)
            r = room_til[p]
        if r:
            heappush(heaps[r], (-room_tok[p], p))
            used |= 1 << r


class _Bitset:
    """A set of ints in [0, size]: add, remove, and "smallest member >= x" in a few small-int ops.

    Two levels: 64-bit words, plus one Python int whose bit w says word w is non-empty. Every
    operation touches one word and at most one shift of the summary (size / 64 bits), twice as
    fast as one flat Python-int bitmap at C = 16384, whose shifts copy the whole map.
    """

    __slots__ = ("size", "summary", "words")

    def __init__(self, size: int) -> None:
        self.size = size
        self.words = [0] * ((size >> 6) + 1)
        self.summary = 0

    def add(self, g: int) -> None:
        wi = g >> 6
        w = self.words[wi]
        if not w:
            self.summary |= 1 << wi
        self.words[wi] = w | (1 << (g & 63))

    def remove(self, g: int) -> None:
        wi = g >> 6
        w = self.words[wi] ^ (1 << (g & 63))
        self.words[wi] = w
        if not w:
            self.summary ^= 1 << wi

    def first_at_least(self, x: int) -> int:
        """The smallest member >= x, or -1. `m & -m` isolates the lowest set bit."""
        if x > self.size:
            return -1
        wi = x >> 6
        w = self.words[wi] >> (x & 63)
        if w:
            return x + (w & -w).bit_length() - 1
        m = self.summary >> (wi + 1)
        if not m:
            return -1
        wi += (m & -m).bit_length()
        w = self.words[wi]
        return (wi << 6) + (w & -w).bit_length() - 1

    def last_at_most(self, x: int) -> int:
        """The largest member <= x, or -1."""
        x = min(x, self.size)
        wi = x >> 6
        w = self.words[wi] & ((2 << (x & 63)) - 1)
        if w:
            return (wi << 6) + w.bit_length() - 1
        m = self.summary & ((1 << wi) - 1)
        if not m:
            return -1
        wi = m.bit_length() - 1
        return (wi << 6) + self.words[wi].bit_length() - 1


class _RoomIndex:
    """Packs by exact token room: one stack of packs per room value, `_Bitset` of the values."""

    __slots__ = ("rooms", "stacks")

    def __init__(self, max_tokens: int) -> None:
        self.rooms = _Bitset(max_tokens)
        self.stacks: dict[int, list[int]] = {}

    def add(self, p: int, g: int) -> None:
        stack = self.stacks.get(g)
        if stack:
            stack.append(p)
        else:
            self.stacks[g] = [p]
            self.rooms.add(g)

    def remove(self, p: int, g: int) -> None:
        stack = self.stacks[g]
        if stack[-1] == p:
            stack.pop()
        else:
            stack.remove(p)
        if not stack:
            self.rooms.remove(g)


def _best_fit_tokens(packs: _Packs, order: list[int]) -> None:
    """Best fit on tokens for text-only samples (0 tiles): the pack with the least token room
    that holds the sample, else a new pack. The loop runs once per sample, so the index
    updates are written out in it."""
    tok, members, room_tok = packs.tok, packs.members, packs.room_tok
    index = _RoomIndex(packs.max_tokens)
    stacks, rooms = index.stacks, index.rooms
    for p, g in enumerate(room_tok):
        index.add(p, g)
    for i in order:
        t = tok[i]
        g = rooms.first_at_least(t)
        if g >= 0:
            stack = stacks[g]
            p = stack.pop()
            if not stack:
                rooms.remove(g)
            members[p].append(i)
            g = room_tok[p] = g - t
        else:
            p = packs.open(i)
            g = room_tok[p]
        stack = stacks.get(g)  # index.add(p, g)
        if stack:
            stack.append(p)
        else:
            stacks[g] = [p]
            rooms.add(g)


def _best_fit_image_tokens(packs: _Packs, order: list[int]) -> None:
    """Best fit on tokens for image samples, with a tile-first fallback.

    The pack with the least token room that holds the sample, if it has the tiles; otherwise
    (its tiles are full: common where tiles bind) the pack with the least tile room >= k, and
    among those the most token room, as `_best_fit_tiles` does. Packs sit in a token-room index
    and, once the fallback is first needed, in a `_TileRooms` too; packs with no tile room
    left drop out of both, as they cannot take an image sample. Index updates on the common
    path are written out in the loop, which runs once per sample.
    """
    tok, til, members = packs.tok, packs.til, packs.members
    room_tok, room_til = packs.room_tok, packs.room_til
    index = _RoomIndex(packs.max_tokens)
    stacks, rooms = index.stacks, index.rooms
    by_tiles: _TileRooms | None = None
    for p, r in enumerate(room_til):
        if r:
            index.add(p, room_tok[p])
    for i in order:
        t, k = tok[i], til[i]
        g = rooms.first_at_least(t)
        p = stacks[g][-1] if g >= 0 else -1
        if p >= 0 and room_til[p] < k:
            if by_tiles is None:
                by_tiles = _TileRooms(packs)
            p = by_tiles.find(t, k)
            g = room_tok[p] if p >= 0 else -1
        if p >= 0:
            index.remove(p, g)
            if by_tiles is not None:
                by_tiles.remove(p, room_til[p], g)
            members[p].append(i)
            g = room_tok[p] = g - t
            room_til[p] -= k
        else:
            p = packs.open(i)
            g = room_tok[p]
        if room_til[p]:
            stack = stacks.get(g)  # index.add(p, g)
            if stack:
                stack.append(p)
            else:
                stacks[g] = [p]
                rooms.add(g)
            if by_tiles is not None:
                by_tiles.add(p, room_til[p], g)


def _best_fit_combined(packs: _Packs, order: list[int]) -> None:
    """Each sample into the pack it leaves with least room (tokens / C + tiles / K), else new.

    Packs sit in a `_TileRooms` (by tile room, then token room; packs with no tile room stay,
    for text). For sample (t, k) the tile rooms r >= k in use are walked upwards; in each the
    tightest token room g >= t is the candidate, scored (g - t) / C + (r - k) / K. The walk
    stops once (r - k) / K alone is no better than the best candidate.
    """
    tok, til, members = packs.tok, packs.til, packs.members
    room_tok, room_til = packs.room_tok, packs.room_til
    rooms = _TileRooms(packs, keep_full=True)
    by_room = rooms.by_room
    inv_c, inv_k = 1.0 / packs.max_tokens, 1.0 / packs.max_tiles
    for i in order:
        t, k = tok[i], til[i]
        m = rooms.used >> k
        best, best_r, best_g = 3.0, -1, -1
        while m:
            low = m & -m
            r = k + low.bit_length() - 1
            if (r - k) * inv_k >= best:
                break
            g = by_room[r].rooms.first_at_least(t)
            if g >= 0:
                score = (g - t) * inv_c + (r - k) * inv_k
                if score < best:
                    best, best_r, best_g = score, r, g
            m ^= low
        if best_r >= 0:
            p = by_room[best_r].stacks[best_g][-1]
            rooms.remove(p, best_r, best_g)
            members[p].append(i)
            room_tok[p] = best_g - t
            room_til[p] = best_r - k
        else:
            p = packs.open(i)
        rooms.add(p, room_til[p], room_tok[p])


class _TileRooms:
    """Packs by tile room r, each r a `_RoomIndex` by token room, and a bitmask of the r used.

    `find(t, k)` walks the tile rooms r >= k in use, tightest first, and takes the first
    whose roomiest pack has t tokens: a tile best fit, token worst fit.
    """

    __slots__ = ("by_room", "used")

    def __init__(self, packs: _Packs, keep_full: bool = False) -> None:
        """Index the packs that have tile room left (all packs with `keep_full`)."""
        self.by_room = [_RoomIndex(packs.max_tokens) for _ in range(packs.max_tiles + 1)]
        self.used = 0
        for p, r in enumerate(packs.room_til):
            if r or keep_full:
                self.add(p, r, packs.room_tok[p])

    def add(self, p: int, r: int, g: int) -> None:
        index = self.by_room[r]
        if not index.rooms.summary:  # tile room r was unused until now
            self.used |= 1 << r
        index.add(p, g)

    def remove(self, p: int, r: int, g: int) -> None:
        index = self.by_room[r]
        index.remove(p, g)
        if not index.rooms.summary:
            self.used ^= 1 << r

    def find(self, t: int, k: int) -> int:
        m = self.used >> k
        while m:
            low = m & -m
            r = k + low.bit_length() - 1
            index = self.by_room[r]
            g = index.rooms.last_at_most(index.rooms.size)
            if g >= t:
                return index.stacks[g][-1]
            m ^= low
        return -1
