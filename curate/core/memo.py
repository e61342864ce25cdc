"""A shard's memo of finished work inside a long shard (the judge's scores, chunk by chunk).

The engine redoes a whole shard when its inputs change; a memo lets a stage whose shard takes
hours (hundreds of judge calls) resume mid-shard after a crash, and re-decide from raw results
when only thresholds changed. Rows carry the ``fingerprint`` of what produced them (model,
prompts); rows made under another fingerprint are ignored.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.folder import RunFolder
from curate.core.io import write_parquet_atomic


class Memo:
    """``RUN/_cache/<stage>/<shard>.parquet``: a table with a ``fingerprint`` column."""

    def __init__(self, run: RunFolder, stage: str, shard: str, schema: pa.Schema) -> None:
        self.path = run.path / "_cache" / stage / f"{shard}.parquet"
        self.schema = schema

    def load(self, fingerprint: str) -> list[dict]:
        """Rows made under ``fingerprint`` (none when the memo is missing)."""
        if not self.path.exists():
            return []
        table = pq.read_table(self.path)
        return table.filter(pc.equal(table["fingerprint"], fingerprint)).to_pylist()

    def save(self, table: pa.Table) -> None:
        write_parquet_atomic(table.cast(self.schema), self.path)
