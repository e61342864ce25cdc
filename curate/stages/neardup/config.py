"""Settings of the near-duplicate step (pipeline section ``neardup:``).

Example (pipeline YAML)::

    neardup:
      threshold: 0.7            # estimated Jaccard of the conversations' shingle sets
      shingle: {unit: word, size: 3}
      image_distance: 4         # pHash bits (of 64) two images may differ by
      severity: flag            # flag (review) or reject
      overrides:                # by dataset name or domain; a dataset beats its domain
        ocr: {threshold: 0.9}   # documents share boilerplate
        code_text: {shingle: {unit: char, size: 8}}
        chart_qa: {enabled: false}

Which settings decide what: ``shingle``, ``num_perm``, ``seed``, ``bands`` and the datasets
switched off make the signatures (a change redoes every shard's signatures); ``threshold``,
``image_distance`` and ``image_bands`` the grouping (one global step); ``severity`` only the
ledger rows (each shard's cheap apply step); ``partition_rows``, ``batch_rows`` and
``workers`` only memory and speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Shingle(BaseModel):
    """How a conversation becomes a set: word or character n-grams, within each turn."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    unit: Literal["word", "char"] = Field("word", description="word or character n-grams")
    size: int = Field(3, ge=1, le=64, description="n of the n-grams")

    @property
    def label(self) -> str:
        return f"{self.unit}{self.size}"


class NearDupOverride(BaseModel):
    """A change for one dataset or domain; what is left out keeps the section's value."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(None, gt=0, le=1, description="estimated Jaccard to match")
    shingle: Shingle | None = Field(None, description="word or char n-grams, and n")
    severity: Literal["reject", "flag"] | None = None
    enabled: bool | None = Field(None, description="false: neither compared nor marked")


@dataclass(frozen=True, slots=True)
class ResolvedNearDup:
    threshold: float
    shingle: Shingle
    severity: str
    enabled: bool


class NearDupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(
        0.7, gt=0, le=1, description="estimated Jaccard of two conversations' shingle sets"
    )
    shingle: Shingle = Field(default_factory=Shingle, description="n-grams within each turn")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    bands: int | None = Field(
        None, ge=1, description="LSH bands (default: the best for the lowest threshold)"
    )
    seed: int = Field(1, ge=0, description="MinHash seed")
    # 4 bits: measured on 100 structured images, a 60% resize moves at most 2 bits, JPEG at
    # quality 30 at most 4, a 1% crop 2.3 on average (90% within 4); the demo's noise photos,
    # all alike at 32x32, give 3 unrelated pairs within 4 bits and 12 within 6.
    image_distance: int = Field(
        4, ge=0, le=32, description="pHash bits (of 64) two near-duplicate images differ by"
    )
    image_bands: int | None = Field(
        None,
        ge=1,
        le=16,
        description="pHash bands for image candidates (default image_distance+1, max 16)",
    )
    video_frames: int = Field(8, ge=1, description="frames of a video that are hashed")
    severity: Literal["reject", "flag"] = Field(
        "flag", description="near_duplicate: flag (review) or reject"
    )
    overrides: dict[str, NearDupOverride] = Field(
        default_factory=dict, description="changes per dataset name or domain (dataset wins)"
    )
    pair_limit: int = Field(
        32,
        ge=2,
        description="a bucket of at most this many samples is checked pair by pair; "
        "a larger one against its first member",
    )
    # ~70 bytes of memory each while grouped: 500k keys, ~35 MB, whatever the run's size.
    partition_rows: int = Field(
        500_000,
        ge=1,
        description="band keys (samples × bands) grouped in memory at once; "
        "changes memory and speed, never the result",
    )
    batch_rows: int = Field(4096, ge=1, description="samples hashed together")
    workers: int | None = Field(None, ge=1, description="processes over shards (default: cores)")

    @model_validator(mode="after")
    def _bands_fit(self) -> NearDupConfig:
        if self.bands is not None and self.bands > self.num_perm:
            raise ValueError(f"bands ({self.bands}) must be at most num_perm ({self.num_perm})")
        return self

    def resolve(self, dataset: str, domain: str | None) -> ResolvedNearDup:
        """One dataset's settings: section < domain < dataset."""
        out = {
            "threshold": self.threshold,
            "shingle": self.shingle,
            "severity": self.severity,
            "enabled": True,
        }
        for key in (domain or "", dataset):
            layer = self.overrides.get(key)
            if layer is not None:
                out.update({k: v for k, v in layer.model_dump().items() if v is not None})
                if layer.shingle is not None:
                    out["shingle"] = layer.shingle
        return ResolvedNearDup(**out)

    def min_threshold(self) -> float:
        values = [self.threshold] + [o.threshold for o in self.overrides.values() if o.threshold]
        return min(values)

    def band_count(self) -> int:
        """LSH bands: as set, or the best for the lowest threshold (see ``text.optimal_bands``)."""
        from curate.stages.neardup.text import optimal_bands

        return self.bands or optimal_bands(self.min_threshold(), self.num_perm)

    def image_band_count(self) -> int:
        return self.image_bands or min(16, self.image_distance + 1)
