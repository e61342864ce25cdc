"""Offline 2-D bin packing: samples into packs of at most C tokens and K tiles.

InternVL packs online (first fit over a buffer of 20 open packs, `internvl_packer`), which wastes
a few percent of packs. Curation sees every sample's (tokens, tiles) cost before training, so it
can pack offline and get within a hair of the lower bound max(ceil(sum tokens / C),
ceil(sum tiles / K)) (DESIGN.md §4).

The algorithm works on the dimension that binds:

- Token-primary (the samples' tokens fill packs before their tiles do): best-fit decreasing on
  tokens over all samples, a pack taking a sample only if its tiles fit too.
- Tile-primary (image samples alone fill packs' tiles first, e.g. many 13-tile images with short
  answers under C=16384, K=48): best-fit decreasing on tiles over the image samples, choosing
  among the packs with the tightest tile fit the one with the most token room, so token room
  stays spread evenly; then the text-only samples (0 tiles) go best-fit decreasing on tokens into
  that room, and into new packs when none fits.

Best fit needs "the open pack with the least room >= x" fast. Tiles have at most K+1 values, so
packs are kept in one max-heap (by token room) per remaining-tile count. Token room has up to C+1
values, so packs are kept in one stack per remaining-token count plus a bitmap of the counts in
use, held in a Python int: the best fit for x is the lowest set bit at or above x, found with a
shift and `m & -m` in C code instead of a Python scan. 1M samples pack in a few seconds.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

# Tile-primary packing solves a cutting-stock LP whose knapsack pricing is O(K) numpy steps;
# above this tile cap (InternVL uses 40-48) plain best fit is used instead.
_MAX_PATTERN_TILES = 256
# Simplex pivots allowed per tile size (a few dozen pivots suffice in practice).
_PIVOTS_PER_SIZE = 20
# A token-primary sample whose best-fit pack lacks tile room tries the next packs up to this
# many; past it a new pack is opened (only adversarial inputs get there, so quality is kept
# and the worst case stays bounded).
_MAX_TILE_PROBES = 64


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
    packs = _Packs(tok.tolist(), til.tolist(), max_tokens, max_tiles)
    image = np.flatnonzero(til > 0)
    if _tile_primary(tok[image], til[image], max_tokens, max_tiles):
        _pack_tiles(packs, image, tok, til)
        text = np.flatnonzero(til == 0)
        _best_fit_tokens(packs, _decreasing(text, tok, til))
    else:
        _best_fit_tokens(packs, _decreasing(np.arange(tok.size), tok, til))
    order = np.random.default_rng(seed).permutation(len(packs.members))
    return [sorted(packs.members[p]) for p in order.tolist()]


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


# --- strategy -------------------------------------------------------------------------------


def _tile_primary(tok: np.ndarray, til: np.ndarray, max_tokens: int, max_tiles: int) -> bool:
    """Do the image samples alone need more packs for their tiles than for their tokens?

    Then tiles are what to pack tightly; text-only samples (0 tiles) only need token room and
    are placed afterwards. Otherwise tokens bind and tiles are merely checked.
    """
    return int(til.sum()) * max_tokens > int(tok.sum()) * max_tiles


def _decreasing(idx: np.ndarray, primary: np.ndarray, secondary: np.ndarray) -> list[int]:
    """Indices `idx` by primary size descending, then secondary descending, then index."""
    order = np.lexsort((idx, -secondary[idx], -primary[idx]))
    return idx[order].tolist()


# --- tile-primary: cutting-stock patterns --------------------------------------------------


def _pack_tiles(packs: _Packs, image: np.ndarray, tok: np.ndarray, til: np.ndarray) -> None:
    """Pack the image samples tight in tiles: LP patterns for the bulk, best fit for the rest.

    Tile counts are small integers (a handful of values up to K), so tiles-only packing is a
    cutting-stock problem whose LP relaxation (Gilmore-Gomory) is solved exactly in a few
    dozen pivots. Its patterns say which tile sizes to combine (13+13+13+9, 13+13+10+10+1+1,
    ...); plain best-fit decreasing instead puts the big sizes together first and strands
    the fillers, several percent worse on 13-tile-heavy mixtures. Rounding the LP down leaves a
    few packs' worth of samples, and samples evicted for tokens, to best fit.
    """
    rest = image
    if image.size and packs.max_tiles <= _MAX_PATTERN_TILES:
        itok, itil = tok[image], til[image]
        sizes, demand = np.unique(itil, return_counts=True)
        patterns, copies = _tile_patterns(sizes, demand, packs.max_tiles)
        bin_of, n_bins = _fill_patterns(itok, itil, sizes, patterns, copies)
        _evict_over_cap(bin_of, itok, n_bins, packs.max_tokens)
        _add_bins(packs, image, bin_of, itok, itil)
        rest = image[bin_of < 0]
    _best_fit_tiles(packs, _decreasing(rest, til, tok))


def _tile_patterns(
    sizes: np.ndarray, demand: np.ndarray, cap: int
) -> tuple[np.ndarray, np.ndarray]:
    """Packs to build: patterns[p, i] samples of tile size sizes[i] each, copies[p] times.

    The copies are the LP solution rounded down, so no size is used more often than the LP
    says; since the LP may over-cover a size (it is the >= form), a slot can stay empty.
    """
    basis, x = _solve_pattern_lp(sizes, demand.astype(float), cap)
    copies = np.floor(x + 1e-9).astype(np.int64)
    keep = copies > 0
    return np.rint(basis.T[keep]).astype(np.int64), copies[keep]


def _solve_pattern_lp(
    sizes: np.ndarray, demand: np.ndarray, cap: int
) -> tuple[np.ndarray, np.ndarray]:
    """Revised simplex with column generation for min sum(x) s.t. patterns @ x >= demand.

    The basis starts from one single-size pattern per size (always feasible). Each pivot prices
    all patterns at once with a knapsack over the duals; a negative dual brings in a surplus
    column instead. Every basis along the way is feasible, so hitting the pivot limit (or a
    singular basis) only costs optimality. Returns the basis (columns) and their values, with
    surplus columns zeroed.
    """
    m = sizes.size
    basis = np.diag((cap // sizes).astype(float))
    cost = np.ones(m)
    x = demand / np.diag(basis)
    for _ in range(_PIVOTS_PER_SIZE * m + 100):
        try:
            duals = np.linalg.solve(basis.T, cost)
            col, col_cost = _entering_column(duals, sizes, cap)
            if col is None:
                break
            direction = np.linalg.solve(basis, col)
        except np.linalg.LinAlgError:
            break
        leave, step = _ratio_test(x, direction)
        if leave < 0:
            break
        x = np.maximum(x - step * direction, 0.0)
        x[leave] = step
        basis[:, leave] = col
        cost[leave] = col_cost
    return basis, np.where(cost > 0, x, 0.0)


def _entering_column(
    duals: np.ndarray, sizes: np.ndarray, cap: int
) -> tuple[np.ndarray | None, float]:
    """An improving column (and its cost) or (None, 0) when the basis is optimal."""
    negative = np.flatnonzero(duals < -1e-12)
    if negative.size:  # surplus of that size: reduced cost is the (negative) dual itself
        col = np.zeros(sizes.size)
        col[negative[0]] = -1.0
        return col, 0.0
    value, counts = _best_pattern(duals, sizes, cap)
    if value <= 1.0 + 1e-9:
        return None, 0.0
    return counts.astype(float), 1.0


def _best_pattern(values: np.ndarray, sizes: np.ndarray, cap: int) -> tuple[float, np.ndarray]:
    """Unbounded knapsack: the pattern (counts per size) of most total value within cap.

    A DP over capacity 0..cap, vectorised over the sizes (ascending, so the sizes that fit
    in c are a prefix).
    """
    fits = np.searchsorted(sizes, np.arange(cap + 1), side="right")
    best = np.zeros(cap + 1)
    pick = np.full(cap + 1, -1)
    for c in range(1, cap + 1):
        best[c] = best[c - 1]
        k = fits[c]
        if k:
            cand = best[c - sizes[:k]] + values[:k]
            j = int(cand.argmax())
            if cand[j] > best[c]:
                best[c], pick[c] = cand[j], j
    counts = np.zeros(sizes.size, dtype=np.int64)
    c = cap
    while c > 0:
        j = pick[c]
        if j < 0:
            c -= 1
        else:
            counts[j] += 1
            c -= int(sizes[j])
    return float(best[cap]), counts


def _ratio_test(x: np.ndarray, direction: np.ndarray) -> tuple[int, float]:
    """The basic variable that hits zero first along `direction` (lowest index on ties)."""
    pos = direction > 1e-12
    if not pos.any():
        return -1, 0.0
    ratios = np.full(x.size, np.inf)
    ratios[pos] = x[pos] / direction[pos]
    leave = int(ratios.argmin())
    return leave, float(ratios[leave])


def _fill_patterns(
    tok: np.ndarray, til: np.ndarray, sizes: np.ndarray, patterns: np.ndarray, copies: np.ndarray
) -> tuple[np.ndarray, int]:
    """Put samples (here: the image samples) into the pattern packs' slots, evening out tokens.

    Largest tile size first. Within a size, slot round j covers the packs holding more than j
    samples of it; the round gives the samples with the most tokens to the packs with the
    fewest tokens so far. Even token loads leave room for the text-only samples everywhere.
    Returns the pack of each sample (-1: no slot left) and the number of packs.
    """
    bin_pattern = np.repeat(np.arange(copies.size), copies)
    load = np.zeros(bin_pattern.size, dtype=np.int64)
    bin_of = np.full(tok.size, -1, dtype=np.int64)
    order = np.lexsort((-tok, til))  # by tile size, most tokens first within a size
    bounds = np.searchsorted(til[order], np.append(sizes, sizes[-1] + 1))
    for i in range(sizes.size - 1, -1, -1):
        group = order[bounds[i] : bounds[i + 1]]
        mult = patterns[bin_pattern, i]
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
    return bin_of, bin_pattern.size


def _evict_over_cap(bin_of: np.ndarray, tok: np.ndarray, n_bins: int, cap: int) -> None:
    """Take samples out of packs over the token cap, most tokens first, until they fit.

    Rare: only token-heavy collisions the balancing could not avoid. Evicted samples
    (bin -1) go to best fit with the rest.
    """
    placed = bin_of >= 0
    load = np.bincount(bin_of[placed], weights=tok[placed], minlength=n_bins)
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


# --- packs and the two best-fit passes ------------------------------------------------------


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

    `heaps[r]` holds (-token room, pack) for the packs with exactly r tiles of room, so the
    search for sample i walks r = tiles[i] .. K and stops at the first heap whose roomiest pack
    has the tokens; K + 1 heaps make that walk short. Packs with no tile room left drop out.
    Packs already open (from the patterns) take part with whatever room they have.
    """
    tok, til, room_tok, room_til = packs.tok, packs.til, packs.room_tok, packs.room_til
    heaps: list[list[tuple[int, int]]] = [[] for _ in range(packs.max_tiles + 1)]
    for p, r in enumerate(room_til):
        if r > 0:
            heaps[r].append((-room_tok[p], p))
    for h in heaps:
        heapq.heapify(h)
    for i in order:
        t, k = tok[i], til[i]
        p = -1
        for r in range(k, packs.max_tiles + 1):
            h = heaps[r]
            if h and -h[0][0] >= t:
                p = heapq.heappop(h)[1]
                packs.members[p].append(i)
                room_tok[p] -= t
                room_til[p] -= k
                break
        if p < 0:
            p = packs.open(i)
        if room_til[p] > 0:
            heapq.heappush(heaps[room_til[p]], (-room_tok[p], p))


class _TokenRooms:
    """Packs indexed by token room: a stack of packs per room value, a bitmap of used values.

    The bitmap is a Python int whose bit g is set while some pack has exactly g tokens of room;
    `lowest_at_least(x)` is then one shift plus the lowest-set-bit trick, run in C.
    """

    def __init__(self, packs: _Packs) -> None:
        self.bits = 0
        self.stacks: dict[int, list[int]] = {}
        for p, g in enumerate(packs.room_tok):
            self.add(p, g)

    def add(self, p: int, g: int) -> None:
        stack = self.stacks.get(g)
        if stack:
            stack.append(p)
        else:
            self.stacks[g] = [p]
            self.bits |= 1 << g

    def remove(self, p: int, g: int) -> None:
        stack = self.stacks[g]
        if stack[-1] == p:
            stack.pop()
        else:
            stack.remove(p)
        if not stack:
            self.bits ^= 1 << g

    def lowest_at_least(self, x: int) -> int:
        """Smallest token room g >= x held by some pack, or -1."""
        m = self.bits >> x
        if not m:
            return -1
        return x + (m & -m).bit_length() - 1


def _best_fit_tokens(packs: _Packs, order: list[int]) -> None:
    """Best fit on tokens: each sample goes to the pack with the least token room that holds it.

    Tiles are checked too; the best-fit pack nearly always has them (tiles do not bind here),
    otherwise the next-tightest packs are probed, `_MAX_TILE_PROBES` at most.
    """
    tok, til, room_tok, room_til = packs.tok, packs.til, packs.room_tok, packs.room_til
    rooms = _TokenRooms(packs)
    for i in order:
        t, k = tok[i], til[i]
        p = _find_token_fit(rooms, room_til, t, k)
        if p < 0:
            p = packs.open(i)
        else:
            rooms.remove(p, room_tok[p])
            packs.members[p].append(i)
            room_tok[p] -= t
            room_til[p] -= k
        rooms.add(p, room_tok[p])


def _find_token_fit(rooms: _TokenRooms, room_til: list[int], t: int, k: int) -> int:
    """The pack with the least token room >= t that also has k tiles of room, or -1."""
    g = rooms.lowest_at_least(t)
    probes = 0
    while g >= 0 and probes < _MAX_TILE_PROBES:
        stack = rooms.stacks[g]
        if k == 0 or room_til[stack[-1]] >= k:
            return stack[-1]
        for p in stack:
            probes += 1
            if room_til[p] >= k:
                return p
        g = rooms.lowest_at_least(g + 1)
    return -1
