"""Lower bounds on the packs any packing needs, so a packing's gap to the optimum is proven.

Four bounds, each valid on its own; the best (largest) is the yardstick:

- simple: max(ceil(sum tokens / C), ceil(sum tiles / K)) (also `binpack.lower_bound`);
- tile LP: the cutting-stock LP on tiles alone (`tile_lp_bound`), which sees that three
  13-tile images leave 9 tiles only small images can use;
- DFF (`dff_bound`): dual-feasible functions (Fekete and Schepers) on tokens, on tiles and on the
  combined size lambda * t / C + (1 - lambda) * k / K; they see big samples that cannot share a
  pack, which the sums cannot; a few milliseconds;
- 2-D LP (`vector_lp_bound`): the LP relaxation of 2-D vector bin packing (Gilmore-Gomory), by
  column generation. The master LP, min sum x_p s.t. sum_p a_ip x_p >= d_i over pack patterns
  p, is solved by HiGHS (`scipy.optimize.linprog(method="highs")`); the pricing problem, the
  pattern of most dual value within (C, K), is an exact 2-D knapsack (dynamic programming).

Rounding in the 2-D LP, and why it still bounds. The knapsack needs few, integer sizes, so each
sample's tokens are rounded DOWN: to a grid of U units per pack (t -> floor(t * U / C)) and then,
within its tile count, to the smallest size of its group (linear grouping: sort, cut into
groups, round each down to its group's minimum). Rounding down only makes packs easier, so every
real packing is a packing of the rounded samples. What rounding drops, the excess e_i = t_i * U
/ C - s_i >= 0, is kept in one aggregate row: in any real pack sum s_i + sum e_i <= U, so over
all packs sum_p (U - rounded load of p) >= sum_i e_i = E. The master LP carries that row (x_p
times the pattern's rounded room >= E), which no real packing violates, so the LP is still a
lower bound, and it now holds sum x_p >= sum t / C: the LP is never below the simple bound, as
the LP of the rounded samples alone was (by up to 1%, a unit per sample).

Whenever the LP stops (converged, out of time or out of iterations), the bound reported is
Farley's: for duals y >= 0 (samples) and mu >= 0 (the excess row), with v* the best pattern's
value sum_i a_i y_i + mu * (U - rounded load), (y, mu) / v* is dual feasible, so
(sum d_i y_i + E mu) / v* <= LP <= the optimum. At convergence v* = 1 and it is the LP value.
The bound is a report, never on the packing path: it is time-boxed (`time_limit_s`), and says
whether it converged.

`PatternPricer` and `solve_pattern_master` are shared with the packer's pattern plan
(`binpack._pack_by_plan`), which solves the same LP on mean sizes to choose its packs;
`solve_tile_lp` with the tile-pattern packer. The packers import this module, never the reverse.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
from numpy.typing import ArrayLike

REPORT_LP_TIME_LIMIT_S = 20.0  # the pack stage's time box for the 2-D LP bound
# The pack stage runs the 2-D LP only above this gap to the cheaper bounds: below it they
# already prove the packer's target, and the LP would add seconds to every pack at 1M.
REPORT_LP_ABOVE_GAP = 0.005
_TOKEN_UNITS = 512  # grid of the token dimension: C tokens -> this many units
_MAX_TYPES = 400  # item types of the LP after linear grouping (time per round grows with it)
_FINEST_UNITS = 4096  # refinement stops at this grid (4 tokens at C = 16384)
_CONVERGED = 1e-6  # a best pattern of value <= 1 + this ends the column generation
_EXTRA_COLUMNS = 8  # patterns priced per round beyond the best one (other (c, k) corners)
# Fekete-Schepers u^(k) parameters and combined-size weights tried by `dff_bound`.
_DFF_KS = tuple(range(1, 21))
_DFF_LAMBDAS = (Fraction(1, 4), Fraction(1, 2), Fraction(3, 4))
_PIVOTS_PER_SIZE = 20  # tile LP: simplex pivots per tile size; a few per size suffice in practice
_MAX_PIVOTS = 1000


@dataclass(frozen=True)
class LPBound:
    """The 2-D LP lower bound on the pack count, and how it was reached."""

    bound: int  # ceil of the best Farley bound seen: no packing has fewer packs
    lp_value: float  # the master LP's last value (an upper estimate of the LP optimum)
    converged: bool  # the LP reached its optimum; False: stopped early (time or iterations)
    iterations: int
    seconds: float
    types: int  # distinct (rounded tokens, tiles) sizes after grouping
    token_unit: float  # tokens per unit of the rounded token dimension


@dataclass(frozen=True)
class BestBound:
    """The best of the lower bounds, which one it is, and the packing's gap to it."""

    packs: int
    bound: int
    kind: str  # "simple", "tile LP", "DFF" or "2-D LP"
    gap: float  # packs / bound - 1
    simple: int
    tile_lp: int
    lp: LPBound | None
    dff: int = 0


def vector_lp_bound(
    tokens: ArrayLike,
    tiles: ArrayLike,
    *,
    max_tokens: int,
    max_tiles: int,
    token_units: int = _TOKEN_UNITS,
    max_types: int = _MAX_TYPES,
    time_limit_s: float = 10.0,
    max_iterations: int = 500,
    packs: list[list[int]] | None = None,
    refine: bool = True,
    stop_at: int | None = None,
) -> LPBound:
    """The 2-D LP lower bound on the packs of (tokens, tiles) under caps (C, K).

    `packs`, a packing of the same samples, seeds the LP with its patterns (fewer rounds to
    converge); without it the LP starts from one single-type pattern per type. The first LP
    rounds tokens to `token_units` per pack and groups them into at most `max_types` types;
    with `refine`, while the time box lasts, it is solved again on a grid and a type count twice
    as fine (up to 4096 units), which can see more, until the bound reaches `stop_at` (the
    packs of the packing to certify); the best bound is reported, with the state of the LP
    that gave it (seconds and iterations are the totals).
    """
    start = time.perf_counter()
    deadline = start + time_limit_s
    tok, til = _checked(tokens, tiles, max_tokens, max_tiles)
    units = max(1, min(token_units, max_tokens))
    best: LPBound | None = None
    iterations = 0
    while True:
        lp = _vector_lp(
            tok,
            til,
            max_tokens,
            max_tiles,
            units,
            max_types,
            deadline,
            packs,
            max_iterations - iterations,
        )
        iterations += lp.iterations
        if best is None or lp.bound > best.bound:
            best = lp
        finer = min(2 * units, max_tokens, _FINEST_UNITS)
        # A finer LP costs several times the last one: start it only if it can finish, and
        # not once the bound meets the packing it is meant to certify.
        left = deadline - time.perf_counter()
        if not (refine and lp.converged and finer > units and left > 6 * lp.seconds):
            break
        if iterations >= max_iterations or (stop_at is not None and best.bound >= stop_at):
            break
        units, max_types = finer, 2 * max_types
    return replace(best, iterations=iterations, seconds=time.perf_counter() - start)


def _vector_lp(
    tok: np.ndarray,
    til: np.ndarray,
    max_tokens: int,
    max_tiles: int,
    units: int,
    max_types: int,
    deadline: float,
    packs: list[list[int]] | None,
    max_iterations: int,
) -> LPBound:
    """One column generation at one rounding (see the module docstring); Farley's bound."""
    start = time.perf_counter()
    rounded = _linear_grouping(tok * units // max_tokens, til, max_types)  # floor, see above
    # E, the excess rounding dropped, in units: sum(t * U / C - s), exact in integers.
    excess = float(units * int(tok.sum()) - max_tokens * int(rounded.sum())) / max_tokens
    keys = rounded * (max_tiles + 1) + til
    keys = np.where(keys > 0, keys, -1)  # rounded to nothing: any pack holds all of them
    uniq, type_of, demand = np.unique(keys, return_inverse=True, return_counts=True)
    if uniq.size and uniq[0] < 0:  # leave the empty type out; its samples point at type -1
        uniq, demand, type_of = uniq[1:], demand[1:], type_of - 1
    type_tok, type_til = uniq // (max_tiles + 1), uniq % (max_tiles + 1)
    unit = max_tokens / units
    if not uniq.size:
        bound = _ceil_lp(excess / units)
        return LPBound(bound, float(bound), True, 0, time.perf_counter() - start, 0, unit)
    pricer = PatternPricer(type_tok, type_til, demand, units, max_tiles)
    columns = np.hstack([pricer.single_type_columns(), np.zeros((uniq.size, 1))])
    if packs:
        columns = np.hstack([columns, pattern_columns(packs, type_of, uniq.size)])
    best, value, iterations, converged = 0.0, float("nan"), 0, False
    while iterations < max_iterations:
        iterations += 1
        room = units - type_tok @ columns  # each pattern's rounded token room
        value, duals, mu, _ = solve_pattern_master(columns, demand, room=room, excess=excess)
        patterns, v_star = pricer.best_patterns(duals - mu * type_tok)
        v_star = max(v_star + mu * units, 1e-12)  # the empty pattern is worth mu * U
        best = max(best, (float(demand @ duals) + excess * mu) / v_star)
        if v_star <= 1 + _CONVERGED:
            converged = True
            break
        if time.perf_counter() > deadline or not patterns.shape[1]:
            break
        columns = np.hstack([columns, patterns])
    seconds = time.perf_counter() - start
    return LPBound(_ceil_lp(best), value, converged, iterations, seconds, int(uniq.size), unit)


def dff_bound(tokens: ArrayLike, tiles: ArrayLike, *, max_tokens: int, max_tiles: int) -> int:
    """The best dual-feasible-function bound: ceil(sum_i u(w_i)) over a few DFFs u and sizes w.

    A DFF u maps [0, 1] to [0, 1] so that sum x_i <= 1 implies sum u(x_i) <= 1; applied to
    each sample's share of a pack's room w_i (tokens t / C, tiles k / K, or a combination
    lambda * t / C + (1 - lambda) * k / K, whose sum is <= 1 in any pack too), sum_i u(w_i) is
    at most the number of packs. The DFFs are Fekete and Schepers' u^(k): x if (k + 1) x is an
    integer, else floor((k + 1) x) / k; they count a sample over half a pack as a whole one.
    Sums are exact (integers and fractions), so float noise cannot lift the bound.
    """
    tok, til = _checked(tokens, tiles, max_tokens, max_tiles)
    if not tok.size:
        return 0
    sizes = [(tok, max_tokens), (til, max_tiles)]
    for lam in _DFF_LAMBDAS:  # w = (p t K + (q - p) k C) / (q C K) for lambda = p / q
        p, q = lam.numerator, lam.denominator
        sizes.append((p * tok * max_tiles + (q - p) * til * max_tokens, q * max_tokens * max_tiles))
    return max(_best_u_k(num, den) for num, den in sizes)


def tile_lp_bound(tiles: ArrayLike, *, max_tiles: int) -> int:
    """A lower bound on the packs the tiles alone need, often well above ceil(sum tiles / K).

    When big tile counts do not combine to K (three 13-tile images leave 9 tiles only fillers
    can use), no packing reaches sum / K. This is the cutting-stock LP bound: the LP's duals,
    made dual-feasible (clipped at 0, divided by the best pattern's value), times the demand,
    so it holds even if the LP stopped early. Compare a packing to max(this, lower_bound).
    """
    til = np.asarray(tiles, dtype=np.int64).reshape(-1)
    til = til[til > 0]
    if not til.size:
        return 0
    if max_tiles < 1 or int(til.max()) > max_tiles:
        raise ValueError(f"a sample has {int(til.max())} tiles, over max_tiles={max_tiles}")
    sizes, demand = np.unique(til, return_counts=True)
    _, _, duals = solve_tile_lp(sizes, demand.astype(float), max_tiles)
    duals = np.maximum(duals, 0.0)
    value, _ = _best_pattern(duals, sizes, max_tiles)
    return _ceil_lp(float(demand @ duals) / max(1.0, value))


def best_bound(
    packs: int,
    tokens: ArrayLike,
    tiles: ArrayLike,
    *,
    max_tokens: int,
    max_tiles: int,
    time_limit_s: float = 10.0,
    packing: list[list[int]] | None = None,
    lp_above_gap: float = 0.0,
) -> BestBound:
    """The best proven lower bound for a packing of `packs` packs, and its gap to it.

    The 2-D LP runs only when the cheaper bounds leave a gap above ``lp_above_gap`` (it cannot
    help at 0; the pack stage skips it where they already prove the packer's 0.5%).
    """
    tok = np.asarray(tokens, dtype=np.int64).reshape(-1)
    til = np.asarray(tiles, dtype=np.int64).reshape(-1)
    simple = max(_ceil_div(int(tok.sum()), max_tokens), _ceil_div(int(til.sum()), max_tiles))
    tile_lp = tile_lp_bound(til, max_tiles=max_tiles) if max_tiles <= 128 else 0
    dff = dff_bound(tok, til, max_tokens=max_tokens, max_tiles=max_tiles)
    lp = None
    if packs > (1 + lp_above_gap) * max(simple, tile_lp, dff):
        lp = vector_lp_bound(
            tok,
            til,
            max_tokens=max_tokens,
            max_tiles=max_tiles,
            time_limit_s=time_limit_s,
            packs=packing,
            stop_at=packs,
        )
    candidates = [
        (simple, "simple"),
        (tile_lp, "tile LP"),
        (dff, "DFF"),
        (lp.bound if lp else 0, "2-D LP"),
    ]
    bound, kind = max(candidates, key=lambda c: c[0])  # ties: the simpler bound
    gap = packs / bound - 1 if bound else 0.0
    return BestBound(packs, bound, kind, gap, simple, tile_lp, lp, dff)


def _checked(
    tokens: ArrayLike, tiles: ArrayLike, max_tokens: int, max_tiles: int
) -> tuple[np.ndarray, np.ndarray]:
    tok = np.asarray(tokens, dtype=np.int64).reshape(-1)
    til = np.asarray(tiles, dtype=np.int64).reshape(-1)
    if tok.shape != til.shape:
        raise ValueError(f"tokens and tiles differ in length: {tok.size} != {til.size}")
    if ((tok > max_tokens) | (til > max_tiles) | (tok < 0) | (til < 0)).any():
        raise ValueError("a sample is outside the caps: the bound is for packable samples")
    return tok, til


def _ceil_lp(x: float) -> int:
    """ceil(x) for an LP value, forgiving float noise just above an integer."""
    return int(np.ceil(x - 1e-6))


# --- dual-feasible functions -----------------------------------------------------------------


def _best_u_k(num: np.ndarray, den: int) -> int:
    """max over k of ceil(sum_i u^(k)(num_i / den)), exactly."""
    total = int(num.sum())
    best = _ceil_div(total, den)  # u = identity
    for k in _DFF_KS:
        scaled = (k + 1) * num
        whole = scaled % den == 0  # (k + 1) x is an integer: u(x) = x
        # sum = whole_sum / den + floors / k, as one fraction over den * k
        whole_sum = int(num[whole].sum())
        floors = int((scaled[~whole] // den).sum())
        best = max(best, _ceil_div(whole_sum * k + floors * den, den * k))
    return best


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --- types: rounding down by linear grouping ---------------------------------------------------


def _linear_grouping(units: np.ndarray, til: np.ndarray, max_types: int) -> np.ndarray:
    """Each sample's rounded size: `units` itself, or, if that makes more than `max_types`
    (size, tiles) types, the smallest size of its group. Groups cut each tile count's samples,
    sorted by size, into parts of equal count; a tile count gets parts in proportion to its
    samples (at least one). Never above `units`, so rounding stays downward."""
    keys = units * (int(til.max(initial=0)) + 1) + til
    if np.unique(keys).size <= max_types:
        return units
    counts = np.unique(til, return_counts=True)
    order = np.lexsort((units, til))
    out = np.empty_like(units)
    start = 0
    for n_k in counts[1].tolist():
        idx = order[start : start + n_k]
        start += n_k
        parts = max(1, min(n_k, round(max_types * n_k / til.size)))
        for part in np.array_split(idx, parts):  # sorted ascending: part[0] is the minimum
            out[part] = units[part[0]]
    return out


# --- the master LP ---------------------------------------------------------------------------


def solve_pattern_master(
    columns: np.ndarray,
    demand: np.ndarray,
    *,
    room: np.ndarray | None = None,
    excess: float = 0.0,
) -> tuple[float, np.ndarray, float, np.ndarray]:
    """min sum x s.t. columns @ x >= demand (and room @ x >= excess), x >= 0, by HiGHS.

    Returns (value, duals y >= 0 of the demand rows, dual mu >= 0 of the room row, x).
    """
    from scipy.optimize import linprog
    from scipy.sparse import csc_matrix

    a, b = columns, demand.astype(float)
    if room is not None:
        a, b = np.vstack([columns, room]), np.append(b, excess)
    res = linprog(
        np.ones(columns.shape[1]),
        A_ub=-csc_matrix(a),
        b_ub=-b,
        bounds=(0, None),
        method="highs",
    )
    if res.status != 0:
        raise RuntimeError(f"the pattern LP failed: {res.message}")
    duals = np.maximum(-np.asarray(res.ineqlin.marginals), 0.0)
    mu = float(duals[-1]) if room is not None else 0.0
    y = duals[: demand.size]
    return float(res.fun), y, mu, np.asarray(res.x)


def pattern_columns(packs: list[list[int]], type_of: np.ndarray, n_types: int) -> np.ndarray:
    """The distinct patterns (counts per type, one column each) of a packing; samples of type
    -1 are left out."""
    sizes = np.fromiter(map(len, packs), dtype=np.int64, count=len(packs))
    flat = np.fromiter((i for p in packs for i in p), dtype=np.int64, count=int(sizes.sum()))
    pack_of = np.repeat(np.arange(len(packs)), sizes)
    counts = np.zeros((len(packs), n_types), dtype=np.int64)
    real = type_of[flat] >= 0
    np.add.at(counts, (pack_of[real], type_of[flat][real]), 1)
    return np.unique(counts, axis=0).T.astype(np.float64)


# --- the pricing problem: a bounded 2-D knapsack ---------------------------------------------


class PatternPricer:
    """Patterns of most value within (U token units, K tiles), by dynamic programming.

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

    def single_type_columns(self) -> np.ndarray:
        """One pattern per type, as many copies as fit: a feasible start for the master."""
        return np.diag(self.max_copies).astype(np.float64)

    def best_patterns(self, values: np.ndarray) -> tuple[np.ndarray, float]:
        """Columns (types x patterns) of the most valuable patterns, and the best value."""
        best = np.zeros(self.shape)
        taken: list[tuple[int, int, np.ndarray]] = []
        for i, mult in self.items:
            v = values[i] * mult
            if v <= 0:
                continue
            a, b = int(self.tok[i]) * mult, int(self.til[i]) * mult
            n_a, n_b = self.shape[0] - a, self.shape[1] - b
            cand = best[:n_a, :n_b] + v
            take = cand > best[a:, b:] + 1e-12
            np.maximum(best[a:, b:], cand, out=best[a:, b:])
            taken.append((i, mult, take))
        v_star = float(best[-1, -1])
        cols = {tuple(self._read_back(taken, c, k)) for c, k in self._corners()}
        cols = [c for c in cols if sum(c)]
        return np.array(cols, dtype=np.float64).T.reshape(self.demand.size, -1), v_star

    def _corners(self) -> list[tuple[int, int]]:
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


# --- the tile LP: revised simplex, knapsack pricing ------------------------------------------


def solve_tile_lp(
    sizes: np.ndarray, demand: np.ndarray, cap: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Revised simplex with column generation for min sum(x) s.t. patterns @ x >= demand.

    The basis starts from one single-size pattern per size (always feasible). Each pivot prices
    all patterns at once with a knapsack over the duals; a negative dual brings in a surplus
    column instead. Every basis along the way is feasible, so hitting the pivot limit (or a
    singular basis) only costs optimality. Returns the basis (columns), their values (surplus
    columns zeroed) and the last duals.
    """
    m = sizes.size
    basis = np.diag((cap // sizes).astype(float))
    cost = np.ones(m)
    x = demand / np.diag(basis)
    duals = np.full(m, 1.0 / cap) * sizes  # dual-feasible start: value tiles / K per sample
    for _ in range(min(_PIVOTS_PER_SIZE * m + 100, _MAX_PIVOTS)):
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
    return basis, np.where(cost > 0, x, 0.0), duals


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
