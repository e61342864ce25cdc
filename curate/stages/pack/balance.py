"""Compute balance across data-parallel ranks: a cost per pack, and a pack order in which the
packs that run side by side in one step cost about the same.

A pack's cost is not its token count: the LLM's linear layers grow with tokens, its attention
with Σ len² over the pack's samples (attention never crosses samples), and the vision tower
with tiles (each tile is 1,025 ViT tokens with full attention among them). Ranks wait for the
slowest one at every step, so a step's time is its most expensive pack; the step's imbalance
is max / mean of its packs' costs.

The trainer (``StepLayout``) runs packs ``k·N .. k·N + N - 1`` of the order side by side on N
ranks (one pack per rank and micro-batch). ``balanced_order`` sorts the packs by cost, cuts the
sorted list into groups of N neighbours (near-equal cost) and shuffles the groups with the
seed: each step is balanced, and the order of steps stays random (the few cheapest packs that
fill no group go last). Training reads the order as
it is in its first epoch; later epochs permute packs one by one (``StepLayout.epoch_order``),
which gives up the balance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOKENS_PER_TILE_VIT = 1025  # 448 px / 14 px patches = 32 x 32, plus the class token
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (about twice the forward)


@dataclass(frozen=True)
class CostModel:
    """Forward FLOPs of one model's parts (2 FLOPs per multiply-add)."""

    llm_params: float  # non-embedding parameters of the LLM
    llm_layers: int
    llm_hidden: int
    vit_params: float
    vit_layers: int
    vit_hidden: int

    def pack_costs(self, tokens: np.ndarray, tiles: np.ndarray, sum_len2: np.ndarray) -> np.ndarray:
        """Training FLOPs of each pack from its tokens, tiles and Σ len² of its samples."""
        llm = 2 * self.llm_params * tokens + 2 * self.llm_layers * self.llm_hidden * sum_len2
        vit_per_tile = (
            2 * self.vit_params * TOKENS_PER_TILE_VIT
            + 4 * self.vit_layers * self.vit_hidden * TOKENS_PER_TILE_VIT**2
        )
        forward = llm.astype(np.float64) + vit_per_tile * tiles.astype(np.float64)
        return TRAIN_FLOPS_PER_FORWARD * forward


# InternViT-300M (24 layers, width 1024) with Qwen2.5-0.5B (24 layers, width 896) for 1B, and
# with InternLM2.5-7B (32 layers, width 4096) for 8B; attention is causal in the LLM (half of
# the len² products), full in the ViT.
COST_MODELS: dict[str, CostModel] = {
    "internvl2_5_1b": CostModel(3.6e8, 24, 896, 3.0e8, 24, 1024),
    "internvl2_5_8b": CostModel(6.5e9, 32, 4096, 3.0e8, 24, 1024),
}


def pack_shapes(
    packs: list[list[int]], tokens: np.ndarray, tiles: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pack: tokens, tiles and Σ len² of its samples (``packs`` index the arrays)."""
    flat = np.fromiter((i for p in packs for i in p), dtype=np.int64)
    pack_of = np.repeat(np.arange(len(packs)), [len(p) for p in packs])
    t = tokens[flat].astype(np.float64)
    n = len(packs)
    return (
        np.bincount(pack_of, weights=t, minlength=n),
        np.bincount(pack_of, weights=tiles[flat].astype(np.float64), minlength=n),
        np.bincount(pack_of, weights=t * t, minlength=n),
    )


def balanced_order(costs: np.ndarray, ranks: int, seed: int) -> np.ndarray:
    """A permutation of the packs: groups of ``ranks`` packs of neighbouring cost, the groups
    in a seeded random order; the cheapest packs that do not fill a group come last, so every
    step before them stays aligned to a group."""
    by_cost = np.argsort(-costs, kind="stable")
    full = len(by_cost) // ranks
    groups = by_cost[: full * ranks].reshape(full, ranks)
    shuffled = groups[np.random.default_rng(seed).permutation(full)].reshape(-1)
    return np.concatenate([shuffled, by_cost[full * ranks :]])


def step_imbalance(costs_in_order: np.ndarray, ranks: int) -> dict[str, float]:
    """Max / mean cost of the packs of each full step of ``ranks`` packs, over the steps:
    mean and worst (1.0 is perfect balance)."""
    steps = len(costs_in_order) // ranks
    if steps == 0:
        return {"mean": 1.0, "worst": 1.0}
    grid = costs_in_order[: steps * ranks].reshape(steps, ranks)
    ratio = grid.max(axis=1) / np.maximum(grid.mean(axis=1), 1e-300)
    return {"mean": round(float(ratio.mean()), 4), "worst": round(float(ratio.max()), 4)}
