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
        _best_fit_tiles(packs, _decreasing(image, til, tok))
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
        self.members.append([i])
        self.room_tok.append(self.max_tokens - self.tok[i])
        self.room_til.append(self.max_tiles - self.til[i])
        return len(self.members) - 1


def _best_fit_tiles(packs: _Packs, order: list[int]) -> None:
    """Best fit on tiles; among the tightest-fitting packs, the one with most token room.

    `heaps[r]` holds (-token room, pack) for the packs with exactly r tiles of room, so the
    search for sample i walks r = tiles[i] .. K and stops at the first heap whose roomiest pack
    has the tokens; K + 1 heaps make that walk short. Packs with no tile room left drop out.
    """
    tok, til, room_tok, room_til = packs.tok, packs.til, packs.room_tok, packs.room_til
    heaps: list[list[tuple[int, int]]] = [[] for _ in range(packs.max_tiles + 1)]
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
