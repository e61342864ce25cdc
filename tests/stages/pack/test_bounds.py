"""Lower bounds on the pack count: valid (never above the optimum), and as strong as claimed."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from curate.cli.pack import pack_report_table
from curate.stages.pack.binpack import lower_bound, pack_lengths
from curate.stages.pack.bounds import best_bound, dff_bound, vector_lp_bound


def optimum(tok: list[int], til: list[int], max_tokens: int, max_tiles: int) -> int:
    """The fewest packs, by trying every assignment (each item into an existing or a new pack)."""
    best = len(tok)

    def place(i: int, loads: list[tuple[int, int]]) -> None:
        nonlocal best
        if len(loads) >= best:
            return
        if i == len(tok):
            best = len(loads)
            return
        for j, (t, k) in enumerate(loads):
            if t + tok[i] <= max_tokens and k + til[i] <= max_tiles:
                loads[j] = (t + tok[i], k + til[i])
                place(i + 1, loads)
                loads[j] = (t, k)
        place(i + 1, [*loads, (tok[i], til[i])])

    place(0, [])
    return best


@st.composite
def tiny(draw):
    """Up to 8 samples under small caps, so the optimum is found by brute force."""
    max_tokens = draw(st.integers(1, 40))
    max_tiles = draw(st.integers(1, 12))
    n = draw(st.integers(1, 8))
    tok = draw(st.lists(st.integers(0, max_tokens), min_size=n, max_size=n))
    til = draw(st.lists(st.integers(0, max_tiles), min_size=n, max_size=n))
    return tok, til, max_tokens, max_tiles


@settings(max_examples=150, deadline=None)
@given(tiny())
def test_lp_bound_is_at_most_the_optimum_and_at_least_the_simple_bound(instance) -> None:
    tok, til, max_tokens, max_tiles = instance
    lp = vector_lp_bound(tok, til, max_tokens=max_tokens, max_tiles=max_tiles)
    assert lp.converged
    assert lp.bound <= optimum(tok, til, max_tokens, max_tiles)
    # Caps under 256 are not rounded, so the LP holds every sum: at least the simple bound.
    assert lp.bound >= lower_bound(tok, til, max_tokens=max_tokens, max_tiles=max_tiles)


@settings(max_examples=100, deadline=None)
@given(tiny(), st.integers(1, 8), st.integers(1, 6))
def test_rounded_and_grouped_lp_bound_is_between_the_simple_bound_and_the_optimum(
    instance, units, max_types
) -> None:
    # Tokens on a grid of 1-8 units and linear grouping down to 1-6 types: still a lower bound,
    # and the excess row keeps what rounding dropped, so never below the sums either.
    tok, til, max_tokens, max_tiles = instance
    lp = vector_lp_bound(
        tok,
        til,
        max_tokens=max_tokens,
        max_tiles=max_tiles,
        token_units=units,
        max_types=max_types,
    )
    assert lp.converged
    assert lp.bound <= optimum(tok, til, max_tokens, max_tiles)
    assert lp.bound >= lower_bound(tok, til, max_tokens=max_tokens, max_tiles=max_tiles)


@settings(max_examples=150, deadline=None)
@given(tiny())
def test_dff_bound_is_at_most_the_optimum(instance) -> None:
    tok, til, max_tokens, max_tiles = instance
    dff = dff_bound(tok, til, max_tokens=max_tokens, max_tiles=max_tiles)
    assert lower_bound(tok, til, max_tokens=max_tokens, max_tiles=max_tiles) <= dff
    assert dff <= optimum(tok, til, max_tokens, max_tiles)


def test_dff_bound_counts_samples_over_half_a_pack() -> None:
    # Three samples of 6 tokens in packs of 10: the sum says 2, u^(1) counts each as a pack.
    assert lower_bound([6, 6, 6], [0, 0, 0], max_tokens=10, max_tiles=4) == 2
    assert dff_bound([6, 6, 6], [0, 0, 0], max_tokens=10, max_tiles=4) == 3
    # No two of these share a pack, yet each dimension alone says 2: on the combined size
    # (t / C + k / K) / 2 = 0.55, 0.5, 0.55, u^(1) gives 1 + 0.5 + 1.
    tok, til = [7, 5, 1], [4, 5, 10]
    assert lower_bound(tok, til, max_tokens=10, max_tiles=10) == 2
    assert dff_bound(tok, til, max_tokens=10, max_tiles=10) == 3 == optimum(tok, til, 10, 10)


def test_lp_bound_on_a_mixture_where_both_caps_bind_is_not_below_the_sums() -> None:
    # Single images, tokens = 256 per tile + text, sum t / C ~ sum k / K. The LP of rounded-down
    # tokens alone lost ~1% to rounding (a unit per sample) and fell below the simple bound.
    rng = np.random.default_rng(3)
    til = rng.choice([1, 3, 5, 7, 9, 10, 13], size=3000)
    tok = 256 * til + 26 + np.clip(rng.lognormal(np.log(450), 0.9, 3000), 16, 3000).astype(int)
    simple = lower_bound(tok, til, max_tokens=16384, max_tiles=48)
    lp = vector_lp_bound(tok, til, max_tokens=16384, max_tiles=48, time_limit_s=60, refine=False)
    assert lp.converged
    assert lp.bound >= simple


def test_lp_bound_sees_items_that_do_not_pair() -> None:
    # Six tokens of ten: no two share a pack, yet the sum says 2 packs.
    assert lower_bound([6, 6, 6], [0, 0, 0], max_tokens=10, max_tiles=4) == 2
    assert vector_lp_bound([6, 6, 6], [0, 0, 0], max_tokens=10, max_tiles=4).bound == 3


def test_lp_bound_sees_both_caps_at_once() -> None:
    # (6 tokens, 1 tile) and (1 token, 6 tiles) pair; two of a kind never do. 4 + 4 of them
    # need 4 packs, the sums say ceil(28 / 10) = 3.
    tok, til = [6] * 4 + [1] * 4, [1] * 4 + [6] * 4
    assert lower_bound(tok, til, max_tokens=10, max_tiles=10) == 3
    assert vector_lp_bound(tok, til, max_tokens=10, max_tiles=10).bound == 4
    assert optimum(tok, til, 10, 10) == 4


def test_time_boxed_lp_says_it_stopped_early_and_stays_valid() -> None:
    rng = np.random.default_rng(0)
    til = rng.integers(1, 14, size=3000)
    tok = til * 258 + rng.integers(30, 2000, size=3000)
    lp = vector_lp_bound(tok, til, max_tokens=16384, max_tiles=48, time_limit_s=0.0)
    assert not lp.converged and lp.iterations == 1
    full = vector_lp_bound(tok, til, max_tokens=16384, max_tiles=48, time_limit_s=120, refine=False)
    assert full.converged
    assert lp.bound <= full.bound <= len(pack_lengths(tok, til, max_tokens=16384, max_tiles=48))


def test_refined_lp_keeps_the_best_bound_and_stops_at_the_packing() -> None:
    # Big samples (3-4k tokens of 8192) whose pairs strand room: a finer grid sees more of it.
    rng = np.random.default_rng(4)
    til = rng.choice([1, 5, 13], size=1500, p=[0.2, 0.2, 0.6])
    tok = np.minimum(256 * til + rng.integers(20, 400, size=1500), 8192)
    coarse = vector_lp_bound(
        tok, til, max_tokens=8192, max_tiles=40, token_units=64, max_types=30, refine=False
    )
    refined = vector_lp_bound(
        tok, til, max_tokens=8192, max_tiles=40, token_units=64, max_types=30, time_limit_s=30
    )
    packs = len(pack_lengths(tok, til, max_tokens=8192, max_tiles=40))
    assert coarse.converged and coarse.bound < refined.bound <= packs  # measured 462 < 479
    assert refined.types > coarse.types
    stopped = vector_lp_bound(
        tok, til, max_tokens=8192, max_tiles=40, token_units=64, max_types=30, stop_at=1
    )
    assert stopped.types == coarse.types  # the first LP already met stop_at


def test_lp_aggregates_identical_sizes() -> None:
    tok, til = [300] * 500 + [5000] * 500, [3] * 500 + [13] * 500
    lp = vector_lp_bound(tok, til, max_tokens=16384, max_tiles=48)
    assert lp.types == 2
    # three 13-tile images + three 3-tile ones fill 48 tiles: 500 / 3 packs, rounded up
    assert lp.bound == 167


def test_best_bound_names_the_bound_and_the_gap() -> None:
    tok, til = [6, 6, 6], [0, 0, 0]
    cert = best_bound(3, tok, til, max_tokens=10, max_tiles=4)
    assert (cert.bound, cert.kind, cert.gap, cert.simple, cert.dff) == (3, "DFF", 0.0, 2, 3)
    assert cert.lp is None  # the DFF bound already meets the packs
    cert = best_bound(4, tok, til, max_tokens=10, max_tiles=4)
    assert cert.gap == 4 / 3 - 1
    # Here only the 2-D LP sees that no 3 packs hold these (found by search, checked by brute
    # force): the sums, the tile LP and the DFFs all say 3.
    tok, til = [3, 9, 3, 5, 7], [6, 1, 1, 9, 8]
    cert = best_bound(5, tok, til, max_tokens=10, max_tiles=10)
    assert (cert.simple, cert.tile_lp, cert.dff) == (3, 3, 3)
    assert (cert.bound, cert.kind) == (4, "2-D LP") and optimum(tok, til, 10, 10) == 4
    # Where the simple bound already meets the packs the LP is not run.
    cert = best_bound(1, [3, 3], [1, 1], max_tokens=10, max_tiles=4)
    assert (cert.bound, cert.kind, cert.lp) == (1, "simple", None)


def test_report_table_prints_the_certificate() -> None:
    from rich.console import Console

    report = {
        "algorithm": "curate",
        **dict.fromkeys(
            ["samples_in", "samples_rejected", "samples_truncated", "samples_not_drawn"], 0
        ),
        "samples_excluded": {},
        "copies_packed": 10,
        "packs": 110,
        "lower_bound": 100,
        "ratio_to_lower_bound": 1.1,
        "token_fill": 0.9,
        "tile_fill": 0.9,
        "padded_batch_tokens": 0,
        "padding_fraction_padded": 0.0,
        "best_bound": 105,
        "best_bound_kind": "2-D LP",
        "gap_to_best_bound": 0.04762,
        "lp_bound": 105,
        "lp_bound_converged": False,
    }
    console = Console(width=200, record=True)
    console.print(pack_report_table(report))
    text = console.export_text()
    assert "best proven bound (2-D LP)" in text and "105" in text
    assert "4.76%" in text and "stopped early" in text
    old = {k: v for k, v in report.items() if not k.startswith(("best", "gap", "lp"))}
    console.print(pack_report_table(old))  # a report from before the certificate still prints
