"""Settings of the budget stage."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from curate.core.chat import INTERNVL_SYSTEM_PROMPT


class BudgetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_dynamic_patch: int = Field(12, ge=1, description="n_max for datasets whose meta sets none")
    min_dynamic_patch: int = Field(1, ge=1, description="smallest grid (tiles) considered")
    image_size: int = Field(448, ge=14, description="tile side in pixels")
    use_thumbnail: bool = Field(True, description="append a thumbnail tile to multi-tile grids")
    video_frames: int = Field(8, ge=1, description="frames sampled per video, one tile each")
    repeat_mode: Literal["internvl", "stable"] = Field(
        "internvl",
        description="internvl: r<1 keeps the first int(n*r) lines, r>=1 repeats int(r) "
        "times; stable: floor(r) copies plus one more with probability frac(r) (seeded hash)",
    )
    seed: int = Field(0, description="seed of the stable repeat mode")
    system_prompt: str | None = Field(
        INTERNVL_SYSTEM_PROMPT, description="system message when a sample has none"
    )
    target_tokens: int | None = Field(
        None,
        ge=1,
        description="mixture solver: total training "
        "tokens wanted; sets every dataset's repeat factor",
    )
    weights: dict[str, float] | None = Field(
        None, description="mixture solver: token share per dataset (default: equal shares)"
    )
    workers: int = Field(1, ge=1, description="processes budgeting shards in parallel")
