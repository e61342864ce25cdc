"""Rows of a run folder's tables for a few sample ids, read without loading the rest.

The report, the notebook and the review app show the conversation and images of a bounded
number of samples; reading every sample's content for them would cost memory in proportion
to the whole run (≈ 3.4 kB a sample). Each shard is scanned with the id filter pushed down,
so only the matching rows' content is decoded.
"""

from __future__ import annotations

from collections.abc import Iterable

import polars as pl
import pyarrow.parquet as pq

from curate.core.folder import RunFolder

# A sample's content: what only its card shows (everything else is small and read for all).
CONTENT_COLUMNS = ("conversations", "images", "video")


def read_rows(
    run: RunFolder, table: str, ids: Iterable[str] | pl.Series, columns: Iterable[str]
) -> pl.DataFrame:
    """Rows of ``table`` whose sample_id is in ``ids`` (the ``columns`` each shard has), or an
    empty frame with a sample_id column."""
    wanted = pl.Series("sample_id", ids, dtype=pl.String).unique()
    columns = list(columns)
    frames = []
    if len(wanted):
        for shard in run.shards(table):
            path = run.shard_path(table, shard)
            have = [c for c in columns if c in pq.read_schema(path).names]
            if "sample_id" not in have:
                continue
            keep = pl.col("sample_id").is_in(wanted.to_list())
            frames.append(_compact(pl.scan_parquet(path).select(have).filter(keep).collect()))
    if not frames:
        return pl.DataFrame({"sample_id": pl.Series([], dtype=pl.String)})
    return pl.concat(frames, how="diagonal_relaxed")


def _compact(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` in buffers of its own. A filtered polars string column still points into the
    whole shard's string buffers (string views), so a few rows kept per shard would hold every
    shard's text: 5 MB a shard, growing with the run. Through Arrow's plain strings, only the
    kept rows' bytes are copied."""
    return pl.from_arrow(frame.to_arrow(compat_level=pl.CompatLevel.oldest()))


def sample_content(run: RunFolder, ids: Iterable[str] | pl.Series) -> pl.DataFrame:
    """sample_id, conversations, images, video of the samples ``ids`` names (unknown ids, e.g.
    lines ingest rejected, have no row)."""
    return read_rows(run, "samples", ids, ["sample_id", *CONTENT_COLUMNS])
