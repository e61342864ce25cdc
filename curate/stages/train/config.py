"""Settings of the train stage: one small validated model (unknown keys are errors).

``None`` means "the stage's default" for lr, warm-up and drop path (``loop.STAGES``), and
"next to the run folder" for paths. Every field is a ``curate train`` option too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # --- data ---
    packs: Path | None = Field(None, description="pack shards folder; default RUN/packs")
    out: Path | None = Field(
        None, description="checkpoints, metrics.jsonl, loss.png; default RUN/train"
    )
    image_root: Path | None = Field(
        None, description="base of relative image paths in the manifest; default the run folder"
    )
    # --- model: a flavor, a local InternVL dir, or vision + LLM dirs ---
    flavor: Literal["debug", "1b"] = Field(
        "debug",
        description="random-init model size, used when neither model nor vision+llm is given",
    )
    model: Path | None = Field(None, description="local HF InternVL directory to start from")
    vision: Path | None = Field(
        None,
        description="HF vision tower (or InternVL) directory; "
        "with llm: assembled with a fresh projector",
    )
    llm: Path | None = Field(None, description="HF causal LM directory (with vision)")
    tokenizer: Path | None = Field(
        None, description="tokenizer dir; default the model/llm dir (required for a flavor)"
    )
    # --- what trains, how long ---
    stage: Literal["1", "1.5", "2"] = Field(
        "2", description="1: projector only; 1.5: ViT + projector; 2: everything"
    )
    steps: int | None = Field(None, ge=1, description="optimizer steps (overrides epochs)")
    epochs: float = Field(1.0, gt=0, description="passes over the packs when steps is unset")
    batch_packs: int = Field(1, ge=1, description="packs per micro-batch per rank")
    accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    # --- optimisation (None: the stage's default) ---
    lr: float | None = Field(
        None, gt=0, description="peak learning rate (stage 1: 2e-4, 1.5: 1e-5, 2: 4e-5)"
    )
    warmup_steps: int | None = Field(None, ge=0, description="linear warm-up steps (stage 1: 100)")
    warmup_ratio: float | None = Field(
        None, ge=0, le=1, description="warm-up as a fraction of the steps (stages 1.5 and 2: 0.03)"
    )
    weight_decay: float = Field(0.05, ge=0, description="AdamW decay on matrices (ndim >= 2)")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping (global L2 norm)")
    drop_path: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="ViT stochastic depth at the last layer (stage 1: 0, 1.5 and 2: 0.1)",
    )
    loss_reduction: Literal["token", "sample", "square"] = Field(
        "square",
        description="per-token weight 1, 1/x or 1/sqrt(x), x = the sample's supervised tokens",
    )
    seed: int = Field(0, ge=0, description="model init, data order, augmentation, dropout")
    augment: bool = Field(True, description="random JPEG compression where data_augment is set")
    # --- machinery ---
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="auto: bf16 on GPU, fp32 on CPU. bf16: matmuls and activations in bf16 "
        "(autocast) over fp32 master weights and fp32 AdamW state; the loss, its weights and "
        "Σw stay fp32; under FSDP2 parameters are gathered in bf16 and gradients reduced in "
        "fp32 (MixedPrecisionPolicy)",
    )
    attention: Literal["auto", "flash", "flex", "varlen", "sdpa", "eager"] = Field(
        "auto",
        description="packed attention, samples never see each other. auto: flash on GPU when "
        "flash-attn is installed, else flex on GPU, varlen on CPU. flash: flash-attn varlen; "
        "flex: torch flex_attention over a block mask per pack (GPU: no backward on CPU); "
        "varlen: one SDPA call per sample; sdpa/eager: one T x T block-diagonal mask",
    )
    grad_checkpointing: bool = Field(False, description="recompute activations in backward")
    distributed: Literal["ddp", "fsdp2"] = Field(
        "ddp", description="multi-rank wrapping under torchrun"
    )
    workers: int = Field(2, ge=0, description="DataLoader worker processes")
    save_every: int | None = Field(
        None, ge=1, description="checkpoint every N steps (and at the end)"
    )
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    resume: bool = Field(False, description="continue from the newest checkpoint in out")

    @field_validator("stage", mode="before")
    @classmethod
    def _stage_as_text(cls, v):
        # YAML and the CLI may give 1, 1.5, 2.0: normalise to "1" / "1.5" / "2".
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return {1.0: "1", 1.5: "1.5", 2.0: "2"}.get(float(v), str(v))
        if isinstance(v, str) and v in ("1.0", "2.0"):
            return v[0]
        return v
