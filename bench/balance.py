"""Compute balance across data-parallel ranks: step imbalance of the shuffled pack order vs the
balanced one (``pack.balance_ranks``), for curate's packer and InternVL's greedy one.

    python bench/balance.py [--samples 100000] [--seed 3]

Lengths from ``synthetic_mixture`` (InternVL 2.5 SFT-like), caps C=16384 K=48; pack costs from
the InternVL2.5-1B cost model (``curate.stages.pack.balance``). Step imbalance: max / mean cost
of the N packs that run side by side in one step (1.0 is perfect), mean and worst over steps.
"""

from __future__ import annotations

import argparse

import numpy as np

from curate.stages.pack.balance import COST_MODELS, balanced_order, pack_shapes, step_imbalance
from curate.stages.pack.binpack import pack_lengths
from curate.stages.pack.internvl_packer import internvl_greedy_pack, synthetic_mixture


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    t, k = synthetic_mixture(args.samples, seed=args.seed)
    fits = (t <= 16384) & (k <= 48)
    t, k = t[fits], k[fits]
    packers = {
        "curate": pack_lengths(t, k, max_tokens=16384, max_tiles=48, seed=0),
        "internvl": internvl_greedy_pack(t, k, max_tokens=16384, max_tiles=48, max_buffer_size=20),
    }
    print("| packer | packs | ranks | shuffled: mean / worst | balanced: mean / worst |")
    print("|---|---:|---:|---:|---:|")
    for name, packs in packers.items():
        packs = [packs[i] for i in np.random.default_rng(0).permutation(len(packs))]
        costs = COST_MODELS["internvl2_5_1b"].pack_costs(*pack_shapes(packs, t, k))
        for n in (8, 64):
            a = step_imbalance(costs, n)
            b = step_imbalance(costs[balanced_order(costs, n, 0)], n)
            print(
                f"| {name} | {len(packs):,} | {n} | {a['mean']:.4f} / {a['worst']:.4f} "
                f"| {b['mean']:.4f} / {b['worst']:.4f} |"
            )


if __name__ == "__main__":
    main()
