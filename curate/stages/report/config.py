"""Settings of the report step (the pipeline's last stage, ``report: {}``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path | None = Field(None, description="HTML file to write (default RUN/report.html)")
    per_rule: int = Field(24, ge=0, description="samples shown per rule in the gallery")
    thumbnail_px: int = Field(
        160, ge=16, le=1024, description="longest side of the embedded thumbnails, pixels"
    )
