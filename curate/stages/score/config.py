"""Settings of the score stage (LLM quality scoring and the LLM repetition check)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ScoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # What scores.
    model: Path | None = Field(
        None, description="local HF judge LLM dir (default: models.judge of the pipeline)"
    )
    tokenizer: Path | None = Field(
        None, description="tokenizer dir for the chat template and score labels (default: model)"
    )
    engine: Literal["vllm", "openai"] = Field(
        "vllm", description="vllm: offline engine in this process; openai: a running server"
    )
    readout: Literal["probe", "constrained"] = Field(
        "probe",
        description="engine: vllm. probe: one request per sample, the first step's label "
        "logprobs and the decode forced through the ambiguous first token ('1' of '1'/'10', "
        "by logit_bias) for the second step's: all 11 probabilities, no follow-up request, "
        "two decode steps (as many as a label under a choice constraint, which ends on EOS). "
        "constrained: decode under a choice constraint 0..10, plus a follow-up request "
        "where the greedy path did not give P(10 | '1'). Both give the same probabilities",
    )
    server_url: str = Field(
        "http://127.0.0.1:8000/v1", description="OpenAI-compatible base URL (engine: openai)"
    )
    served_model_name: str | None = Field(
        None, description="model name the server knows (default: the first of GET /models)"
    )
    server_vllm_extras: bool = Field(
        True,
        description="send vLLM's structured_outputs / logprob_token_ids extras; turn off for "
        "servers that reject them (then a reply that is not a score label is score_invalid, "
        "and label probabilities come from the top-5 logprobs only)",
    )

    # Prompts.
    prompts_dir: Path | None = Field(
        None, description="extra prompt files (NAME.md); they override built-in prompts by name"
    )
    domain_prompts: dict[str, str] = Field(
        default_factory=dict,
        description="dataset or domain name -> prompt name (default: the prompt named like "
        "the sample's domain, else default_prompt)",
    )
    default_prompt: str = Field("general", description="prompt for domains without their own")
    repetition_prompt: str = Field("repetition", description="prompt of the repetition check")
    max_turn_chars: int = Field(
        4000, ge=200, description="longer turns are cut in the middle (a marker says how much)"
    )

    # Decisions.
    quality_threshold: float = Field(7, description="quality score below this: reject")
    quality_thresholds: dict[str, float] = Field(
        default_factory=dict, description="per dataset, domain or prompt name"
    )
    repetition: bool = Field(True, description="run the LLM repetition check")
    repetition_scope: Literal["suspects", "all"] = Field(
        "suspects",
        description="suspects: samples the filters flagged repetition_suspect (all samples "
        "when the filter stage has not run); all: every sample",
    )
    repetition_threshold: float = Field(3, description="repetition score below this: review")
    repetition_thresholds: dict[str, float] = Field(
        default_factory=dict, description="per dataset, domain or prompt name"
    )
    threshold_on: Literal["score", "expected"] = Field(
        "score",
        description="compare the score (the most probable label) or the probability-weighted "
        "expected score",
    )
    invalid_severity: Literal["flag", "reject"] = Field(
        "flag", description="ledger severity of score_invalid (a request that gave no score)"
    )

    # Engine settings.
    batch_size: int = Field(
        512, ge=1, description="requests per engine call; results are saved after each"
    )
    max_model_len: int = Field(4096, ge=64, description="context length of the judge")
    dtype: str = Field("auto", description="vLLM dtype (float32 on CPU for exact results)")
    enforce_eager: bool | None = Field(
        None, description="vLLM: no CUDA graphs / compilation (default: on CPU only)"
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs of one judge engine (vLLM tensor_parallel_size)"
    )
    data_parallel_size: int = Field(
        1,
        ge=1,
        description="judge engines, each a vLLM replica on tensor_parallel_size GPUs, each "
        "batch split between them; > 1 runs on the Ray executor (engine actors; vLLM refuses "
        "data_parallel_size in one process)",
    )
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="vLLM GPU share")
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="vLLM KV cache size (CPU default: 256 MiB)"
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="more vllm.LLM arguments, passed through"
    )
    vlm: bool = Field(
        False, description="the judge is a vision-language model: pass the sample's images"
    )
    image_placeholder: str = Field(
        "<image>", description="VLM only: the text the judge's processor expects per image"
    )

    # Server client settings (engine: openai).
    concurrency: int = Field(16, ge=1, description="requests in flight to the server")
    timeout_s: float = Field(120, gt=0, description="per request")
    retries: int = Field(4, ge=0, description="retries per request on connection errors / 5xx")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay, doubled each retry")
