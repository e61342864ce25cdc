"""Lower bounds on the packs any packing needs, so a packing's gap to the optimum is proven.

Three bounds, each valid on its own; the best (largest) is the yardstick:

- simple: max(ceil(sum tokens / C), ceil(sum tiles / K)) (`binpack.lower_bound`);
- tile LP: the cutting-stock LP on tiles alone (`binpack.tile_lp_bound`), which sees that three
  13-tile images leave 9 tiles only small images can use;
- 2-D LP (this module): the LP relaxation of 2-D vector bin packing (Gilmore-Gomory), solved by
  column generation. The master LP, min sum x_p s.t. sum_p a_ip x_p >= d_i over pack patterns
  p, is solved by HiGHS (`scipy.optimize.linprog(method="highs")`); the pricing problem, the
  pattern of most dual value within (C, K), is an exact 2-D knapsack (dynamic programming).

To keep the knapsack small, token counts are scaled to a grid of `token_units` (about 256) per
pack and rounded down: t -> floor(t * U / C) with capacity U. Any set of samples that fits C
tokens still fits U units (sum floor(x_i) <= floor(sum x_i) <= U), so every real packing is a
packing of the rounded instance and the rounded LP is still a lower bound; rounding only makes
it weaker. Samples of equal (rounded tokens, tiles) are one item type with a demand.

Whenever the LP stops (converged, out of time or out of iterations), the bound reported is
Farley's: the duals y (clipped at 0) divided by the best pattern's value v* are dual feasible,
so sum d_i y_i / v* <= LP <= the optimum. At convergence v* = 1 and it is the LP value itself.
The bound is a report, never on the packing path: it is time-boxed (`time_limit_s`), and says
whether it converged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

REPORT_LP_TIME_LIMIT_S = 20.0  # the pack stage's time box for the 2-D LP bound
_TOKEN_UNITS = 256  # grid of the token dimension: C tokens -> this many units
_CONVERGED = 1e-6  # a best pattern of value <= 1 + this ends the column generation
_EXTRA_COLUMNS = 8  # patterns priced per round beyond the best one (other (c, k) corners)


@dataclass(frozen=True)
class LPBound:
    """The 2-D LP lower bound on the pack count, and how it was reached."""

    bound: int  # ceil of the best Farley bound seen: no packing has fewer packs
    lp_value: float  # the master LP's last value (an upper estimate of the LP optimum)
    converged: bool  # the LP reached its optimum; False: stopped early (time or iterations)
    iterations: int
    seconds: float
    types: int  # distinct (rounded tokens, tiles) sizes
    token_unit: float  # tokens per unit of the rounded token dimension


@dataclass(frozen=True)
class BestBound:
    """The best of the lower bounds, which one it is, and the packing's gap to it."""

    packs: int
    bound: int
    kind: str  # "simple", "tile LP" or "2-D LP"
    gap: float  # packs / bound - 1
    simple: int
    tile_lp: int
    lp: LPBound | None


def vector_lp_bound(
    tokens: ArrayLike,
    tiles: ArrayLike,
    *,
    max_tokens: int,
    max_tiles: int,
    token_units: int = _TOKEN_UNITS,
    time_limit_s: float = 10.0,
    max_iterations: int = 500,
    packs: list[list[int]] | None = None,
) -> LPBound:
    """The 2-D LP lower bound on the packs of (tokens, tiles) under caps (C, K).

    `packs`, a packing of the same samples, seeds the LP with its patterns (fewer rounds to
    converge); without it the LP starts from one single-type pattern per type.
    """
    start = time.perf_counter()
    tok = np.asarray(tokens, dtype=np.int64).reshape(-1)
    til = np.asarray(tiles, dtype=np.int64).reshape(-1)
    if tok.shape != til.shape:
        raise ValueError(f"tokens and tiles differ in length: {tok.size} != {til.size}")
    if ((tok > max_tokens) | (til > max_tiles) | (tok < 0) | (til < 0)).any():
        raise ValueError("a sample is outside the caps: the bound is for packable samples")
    units = max(1, min(token_units, max_tokens))
    scaled = tok * units // max_tokens  # floor(t * U / C): a valid rounding, see above
    keys = scaled * (max_tiles + 1) + til
    keys = np.where(keys > 0, keys, -1)  # rounded to nothing: any pack holds all of them
    uniq, type_of, demand = np.unique(keys, return_inverse=True, return_counts=True)
    if uniq[0] < 0:  # leave the empty type out of the LP; its samples point at type -1
        uniq, demand, type_of = uniq[1:], demand[1:], type_of - 1
    type_tok, type_til = uniq // (max_tiles + 1), uniq % (max_tiles + 1)
    if not uniq.size:
        return LPBound(0, 0.0, True, 0, time.perf_counter() - start, 0, max_tokens / units)
    pricer = _Pricer(type_tok, type_til, demand, units, max_tiles)
    columns = _initial_columns(pricer, type_of, packs)
    best, value, iterations, converged = 0.0, float("nan"), 0, False
    while iterations < max_iterations:
        iterations += 1
        value, duals = _solve_master(columns, demand)
        duals = np.maximum(duals, 0.0)
        patterns, v_star = pricer.best_patterns(duals)
        best = max(best, float(demand @ duals) / max(1.0, v_star))
        if v_star <= 1 + _CONVERGED:
            converged = True
            break
        if time.perf_counter() - start > time_limit_s:
            break
        columns = np.hstack([columns, patterns])
    return LPBound(
        bound=_ceil_lp(best),
        lp_value=value,
        converged=converged,
        iterations=iterations,
        seconds=time.perf_counter() - start,
        types=int(uniq.size),
        token_unit=max_tokens / units,
    )


def best_bound(
    packs: int,
    tokens: ArrayLike,
    tiles: ArrayLike,
    *,
    max_tokens: int,
    max_tiles: int,
    time_limit_s: float = 10.0,
    packing: list[list[int]] | None = None,
) -> BestBound:
    """The best proven lower bound for a packing of `packs` packs, and its gap to it.

    The 2-D LP runs only when the simple and tile LP bounds leave a gap (it cannot help at 0).
    """
    from curate.stages.pack.binpack import lower_bound, tile_lp_bound

    tok = np.asarray(tokens, dtype=np.int64).reshape(-1)
    til = np.asarray(tiles, dtype=np.int64).reshape(-1)
    simple = lower_bound(tok, til, max_tokens=max_tokens, max_tiles=max_tiles)
    tile_lp = tile_lp_bound(til, max_tiles=max_tiles) if max_tiles <= 128 else 0
    lp = None
    if packs > max(simple, tile_lp):
        lp = vector_lp_bound(
            tok,
            til,
            max_tokens=max_tokens,
            max_tiles=max_tiles,
            time_limit_s=time_limit_s,
            packs=packing,
        )
    candidates = [(simple, "simple"), (tile_lp, "tile LP"), (lp.bound if lp else 0, "2-D LP")]
    bound, kind = max(candidates, key=lambda c: c[0])  # ties: the simpler bound
    gap = packs / bound - 1 if bound else 0.0
    return BestBound(packs, bound, kind, gap, simple, tile_lp, lp)


def _ceil_lp(x: float) -> int:
    """ceil(x) for an LP value, forgiving float noise just above an integer."""
    return int(np.ceil(x - 1e-6))


# --- the master LP ---------------------------------------------------------------------------


def _solve_master(columns: np.ndarray, demand: np.ndarray) -> tuple[float, np.ndarray]:
    """min sum x s.t. columns @ x >= demand, x >= 0, by HiGHS; (value, duals y >= 0)."""
    from scipy.optimize import linprog
    from scipy.sparse import csc_matrix

    res = linprog(
        np.ones(columns.shape[1]),
        A_ub=-csc_matrix(columns),
        b_ub=-demand.astype(float),
        bounds=(0, None),
        method="highs",
    )
    if res.status != 0:
        raise RuntimeError(f"the pattern LP failed: {res.message}")
    return float(res.fun), -np.asarray(res.ineqlin.marginals)


def _initial_columns(
    pricer: _Pricer, type_of: np.ndarray, packs: list[list[int]] | None
) -> np.ndarray:
    """One single-type pattern per type (so the LP is feasible), plus a packing's patterns."""
    m = pricer.demand.size
    cols = [np.diag(pricer.max_copies).astype(np.float64)]
    if packs:
        sizes = np.fromiter(map(len, packs), dtype=np.int64, count=len(packs))
        flat = np.fromiter((i for p in packs for i in p), dtype=np.int64, count=int(sizes.sum()))
        pack_of = np.repeat(np.arange(len(packs)), sizes)
        counts = np.zeros((len(packs), m), dtype=np.int64)
        real = type_of[flat] >= 0
        np.add.at(counts, (pack_of[real], type_of[flat][real]), 1)
        cols.append(np.unique(counts, axis=0).T.astype(np.float64))
    return np.hstack(cols)


# --- the pricing problem: a bounded 2-D knapsack ---------------------------------------------


class _Pricer:
    """Patterns of most dual value within (U token units, K tiles), by dynamic programming.

    Type i may appear up to max_copies[i] times (its demand, and what fits an empty pack).
    Copies are split in binary (1, 2, 4, ..., rest), which makes a 0/1 knapsack of few items:
    each item is one shifted numpy maximum over the (U + 1) x (K + 1) table, and a boolean
    table per item says where it was taken, to read patterns back.
    """

    def __init__(
        self, tok: np.ndarray, til: np.ndarray, demand: np.ndarray, units: int, max_tiles: int
    ) -> None:
        self.tok, self.til, self.demand = tok, til, demand
        self.shape = (units + 1, max_tiles + 1)
        fit_tok = np.where(tok > 0, units // np.maximum(tok, 1), demand)
        fit_til = np.where(til > 0, max_tiles // np.maximum(til, 1), demand)
        self.max_copies = np.minimum(demand, np.minimum(fit_tok, fit_til))
        items = []  # (type, multiplicity)
        for i, copies in enumerate(self.max_copies.tolist()):
            mult = 1
            while copies > 0:
                take = min(mult, copies)
                items.append((i, take))
                copies -= take
                mult *= 2
        self.items = items

    def best_patterns(self, duals: np.ndarray) -> tuple[np.ndarray, float]:
        """Columns (types x patterns) of the most valuable patterns, and the best value."""
        best = np.zeros(self.shape)
        taken: list[tuple[int, int, np.ndarray]] = []
        for i, mult in self.items:
            v = duals[i] * mult
            if v <= 0:
                continue
            a, b = int(self.tok[i]) * mult, int(self.til[i]) * mult
            n_a, n_b = self.shape[0] - a, self.shape[1] - b
            cand = best[:n_a, :n_b] + v
            take = cand > best[a:, b:] + 1e-12
            np.maximum(best[a:, b:], cand, out=best[a:, b:])
            taken.append((i, mult, take))
        v_star = float(best[-1, -1])
        corners = self._corners(best)
        cols = {tuple(self._read_back(taken, c, k)) for c, k in corners}
        cols = [c for c in cols if sum(c)]
        return np.array(cols, dtype=np.float64).T.reshape(self.demand.size, -1), v_star

    def _corners(self, best: np.ndarray) -> list[tuple[int, int]]:
        """(U, K) and a few other cells of high value per unit of room: more columns a round."""
        u, k = self.shape[0] - 1, self.shape[1] - 1
        cells = [(u, k)]
        for frac in np.linspace(0.9, 0.99, _EXTRA_COLUMNS // 2):
            cells.append((u, int(k * frac)))
            cells.append((int(u * frac), k))
        return cells

    def _read_back(self, taken: list, c: int, k: int) -> np.ndarray:
        counts = np.zeros(self.demand.size, dtype=np.int64)
        for i, mult, take in reversed(taken):
            a, b = int(self.tok[i]) * mult, int(self.til[i]) * mult
            if c >= a and k >= b and take[c - a, k - b]:
                counts[i] += mult
                c, k = c - a, k - b
        return counts
