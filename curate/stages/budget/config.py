"""Settings of the budget stage."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from curate.core.chat import INTERNVL_SYSTEM_PROMPT


class BudgetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A dataset's own value in the meta JSON beats these two; they apply where it sets none.
    max_dynamic_patch: int = Field(
        12, ge=1, description="n_max, the most tiles per image, for datasets whose meta sets none"
    )
    min_dynamic_patch: int = Field(
        1, ge=1, description="the fewest tiles per image, for datasets whose meta sets none"
    )
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
        description="mixture solver: total training tokens wanted; sets every dataset's "
        "repeat factor r from weights and weight_basis",
    )
    weights: dict[str, Annotated[float, Field(ge=0)]] | None = Field(
        None,
        description="mixture solver: weight per dataset name; datasets not named keep weight "
        "1 (see weight_basis for what a weight means)",
    )
    weight_basis: Literal["natural", "equal"] = Field(
        "natural",
        description="mixture solver: natural: a weight multiplies the dataset's meta "
        "repeat_time, so its tokens are weight x repeat_time x its size, all scaled by one "
        "factor to reach target_tokens (weight 1 everywhere keeps the meta's mixture); "
        "equal: a dataset's share of target_tokens is weight / sum of weights, whatever its "
        "size (weight 1 everywhere: equal shares)",
    )
    workers: int | None = Field(
        None, ge=1, description="processes budgeting shards in parallel (default: all cores)"
    )

    @model_validator(mode="after")
    def _weights_need_a_target(self) -> BudgetConfig:
        # Without a target the solver does not run: weights would be silently ignored.
        if self.weights and self.target_tokens is None:
            raise ValueError("weights need target_tokens (the total the mixture solver aims at)")
        return self
