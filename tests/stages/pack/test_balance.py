"""Compute balance across ranks: pack costs, the balanced order, and the stage's use of them."""

from __future__ import annotations

import numpy as np
import pytest

from curate.core.folder import RunFolder
from curate.stages.pack.balance import (
    COST_MODELS,
    balanced_order,
    pack_shapes,
    step_imbalance,
)
from curate.stages.pack.binpack import pack_lengths
from curate.stages.pack.config import PackConfig
from curate.stages.pack.internvl_packer import synthetic_mixture
from tests.stages.pack.test_stage import CFG, pack

MODEL = COST_MODELS["internvl2_5_1b"]


def test_cost_counts_attention_within_samples_and_vit_tiles():
    one_long = MODEL.pack_costs(*pack_shapes([[0]], np.array([8192]), np.array([0])))
    eight_short = MODEL.pack_costs(*pack_shapes([list(range(8))], np.full(8, 1024), np.zeros(8)))
    assert one_long[0] > eight_short[0]  # same tokens, Σ len² 8x larger
    with_tiles = MODEL.pack_costs(*pack_shapes([[0]], np.array([8192]), np.array([12])))
    assert with_tiles[0] > one_long[0]


@pytest.fixture(scope="module")
def mixture_costs():
    tokens, tiles = synthetic_mixture(20_000, seed=3)
    keep = (tokens <= 16384) & (tiles <= 48)
    tokens, tiles = tokens[keep], tiles[keep]
    packs = pack_lengths(tokens, tiles, max_tokens=16384, max_tiles=48, seed=0)
    return MODEL.pack_costs(*pack_shapes(packs, tokens, tiles))


@pytest.mark.parametrize("ranks", [8, 64])
def test_balanced_order_is_a_permutation_with_balanced_steps(mixture_costs, ranks):
    order = balanced_order(mixture_costs, ranks, seed=0)
    assert sorted(order.tolist()) == list(range(len(mixture_costs)))
    before = step_imbalance(mixture_costs, ranks)
    after = step_imbalance(mixture_costs[order], ranks)
    assert after["mean"] < before["mean"] and after["worst"] <= before["worst"]
    assert after["mean"] < 1.02  # neighbours in cost order differ little
    assert np.array_equal(order, balanced_order(mixture_costs, ranks, seed=0))
    assert not np.array_equal(order, balanced_order(mixture_costs, ranks, seed=1))


def test_stage_orders_packs_for_its_ranks_and_keeps_them(budgeted_run, tokenizer_dir, tmp_path):
    """balance_ranks reorders the same packs (the multiset is unchanged), groups of that many
    neighbours in the manifest cost about the same, and the manifest carries each cost."""
    import shutil

    def packed(name: str, **cfg) -> tuple[RunFolder, dict]:
        run = RunFolder(shutil.copytree(budgeted_run, tmp_path / name))
        return run, pack(run, PackConfig(**CFG, **cfg), tokenizer_dir).report

    plain, report = packed("plain")
    balanced, balanced_report = packed("balanced", balance_ranks=4)
    assert set(report["rank_balance"]) == {"8", "64"}
    a, b = plain.read("packs").to_pylist(), balanced.read("packs").to_pylist()
    assert sorted(tuple(p["sample_ids"]) for p in a) == sorted(tuple(p["sample_ids"]) for p in b)
    assert [p["sample_ids"] for p in a] != [p["sample_ids"] for p in b]
    costs = np.array([p["cost_flops"] for p in b])
    assert (costs > 0).all()
    assert (
        step_imbalance(costs, 4)["mean"]
        < step_imbalance(np.array([p["cost_flops"] for p in a]), 4)["mean"]
    )
    assert balanced_report["packs"] == report["packs"]
