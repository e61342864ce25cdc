"""Settings of the pack stage."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from curate.core.chat import INTERNVL_SYSTEM_PROMPT


class PackConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(
        16384, ge=1, description="C: tokens per pack (InternVL max_packed_tokens)"
    )
    max_tiles: int = Field(48, ge=1, description="K: tiles per pack (InternVL num_images_expected)")
    algorithm: Literal["curate", "internvl"] = Field(
        "curate",
        description="curate: offline near-optimal 2-D packing; internvl: InternVL's "
        "online greedy buffer packer",
    )
    internvl_buffer_size: int = Field(20, ge=1, description="open packs of the internvl packer")
    seed: int = Field(0, description="packing tie-breaks and the shuffled pack order")
    system_prompt: str | None = Field(
        INTERNVL_SYSTEM_PROMPT, description="system message when a sample has none"
    )
    over_cap: Literal["reject", "truncate"] = Field(
        "reject",
        description="a sample over a cap: reject it to the ledger, or truncate its text "
        "at a token boundary outside any image (still rejected when its tiles exceed K)",
    )
    flagged: Literal["exclude", "include"] = Field(
        "exclude", description="flagged samples nobody reviewed: leave out or pack them"
    )
    packs_per_shard: int = Field(1000, ge=1, description="packs per manifest shard")
    balance_ranks: int | None = Field(
        None,
        ge=2,
        description="order the packs so that each group of this many (the packs that run side "
        "by side on that many data-parallel ranks in one step) has near-equal cost; unset: "
        "the seeded shuffle",
    )
    cost_model: Literal["internvl2_5_1b", "internvl2_5_8b"] = Field(
        "internvl2_5_1b",
        description="the model whose FLOPs (ViT per tile, LLM per token and per len²) give a "
        "pack's cost (manifest column cost_flops; rank balance in the report)",
    )
    workers: int | None = Field(
        None, ge=1, description="processes tokenising shards in parallel (default: all cores)"
    )
