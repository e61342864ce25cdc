"""Settings of benchmark decontamination (pipeline section ``decontaminate:``).

Example (pipeline YAML)::

    decontaminate:
      benchmarks:
        - {name: mmbench, path: /data/eval/mmbench}          # HF save_to_disk folder
        - name: chartqa_test                                 # Parquet with named columns
          path: /data/eval/chartqa_test.parquet
          question: query
          image: image
          id: qid
        - {name: my_eval, path: /data/eval/my_eval/meta.json}   # InternVL meta JSON / JSONL
      ngram: 13                # user-turn words shared with a benchmark question (GPT-3)
      min_words: 8             # shorter questions: by image only
      image_distance: 4        # pHash bits (of 64)
      match: [image, text]
      severity: reject
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Benchmark(BaseModel):
    """One evaluation set on disk and where its questions, images and ids are."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="shown in the ledger and the summary")
    path: Path = Field(
        description="InternVL meta JSON / annotation JSONL, a Parquet file or folder, "
        "or a Hugging Face save_to_disk folder"
    )
    question: str | None = Field(
        "question", description="Parquet/HF: the question column (null: images only)"
    )
    answer: str | None = Field(None, description="Parquet/HF: the answer column (unused)")
    image: str | None = Field(
        "image", description="Parquet/HF: the image column (bytes or paths; null: text only)"
    )
    id: str | None = Field("id", description="Parquet/HF: the item id column (default: row)")
    root: Path | None = Field(
        None, description="JSONL: folder the image paths are relative to (default: its folder)"
    )


class DecontaminateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    benchmarks: list[Benchmark] = Field(
        default_factory=list, description="evaluation sets no training sample may contain"
    )
    ngram: int = Field(13, ge=3, le=64, description="words of a shared span that count")
    min_words: int = Field(
        8,
        ge=1,
        description="a question shorter than ngram counts whole when it has at least this "
        "many words (shorter ones are matched by image only)",
    )
    image_distance: int = Field(4, ge=0, le=16, description="pHash bits (of 64) to match")
    match: list[Literal["image", "text"]] = Field(
        default_factory=lambda: ["image", "text"], description="what makes a match"
    )
    severity: Literal["reject", "flag"] = Field("reject", description="benchmark_contamination")
    video_frames: int = Field(8, ge=1, description="frames of a video that are hashed")
    workers: int | None = Field(None, ge=1, description="processes over shards (default: cores)")

    @field_validator("benchmarks")
    @classmethod
    def _unique_names(cls, v: list[Benchmark]) -> list[Benchmark]:
        names = [b.name for b in v]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"benchmark names must be unique: {twice} appear twice")
        return v
