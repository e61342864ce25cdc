"""Settings of the ingest stage."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from curate.core.images import DEFAULT_MAX_IMAGE_PIXELS
from curate.stages.ingest.normalize import DEFAULT_MAX_LINE_BYTES


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shard_lines: int = Field(50_000, ge=1, description="annotation lines per shard")
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS,
        ge=1,
        description="larger images are rejected as decompression bombs",
    )
    max_line_bytes: int = Field(
        DEFAULT_MAX_LINE_BYTES, ge=1, description="longer annotation lines are rejected unparsed"
    )
    workers: int | None = Field(
        None, ge=1, description="processes parsing shards in parallel (default: all cores)"
    )
