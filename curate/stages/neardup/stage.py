"""The near-duplicate decisions, shard by shard: ``neardup/`` rows + ``ledger/neardup``.

The grouping step (``groups.NearDupGroupsStage``) found the clusters over the whole run and
wrote each shard's members to ``neardup_groups/<shard>.parquet``; this step turns them into
ledger rows (``near_duplicate``, severity per dataset or domain, default flag) naming the kept
sample's id and ``dataset:line`` and the estimated similarity. Each shard is checked by the
engine (every input sample comes out once), and a shard is redone only when its own members
changed or the severity did, so a new severity never regroups the run.
"""

from __future__ import annotations

import pyarrow as pa

from curate.core.records import LedgerEntry, ledger_table
from curate.core.stage import ShardInput, ShardOutput, ShardStage
from curate.stages.neardup.config import NearDupConfig

STAGE = "neardup"
RULE = "near_duplicate"
NEARDUP_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("dataset", pa.string()),
        ("line", pa.int64()),
        ("cluster", pa.string()),  # the kept sample's id; null: in no cluster
        ("role", pa.string()),  # kept | duplicate | null
        ("similarity", pa.float64()),
        ("cluster_size", pa.int64()),
    ]
)


def detail(m: dict) -> str:
    """The ledger detail of one near-duplicate (what a reviewer needs to find the pair)."""
    text = (
        f"near-duplicate of {m['kept_id']} ({m['kept_dataset']}:{m['kept_line']}), "
        f"estimated Jaccard {m['similarity']:.2f}"
    )
    if m.get("image_distance") is not None:
        text += f", images within {m['image_distance']} pHash bits"
    text += f"; cluster of {m['cluster_size']}"
    if m.get("via_id"):
        text += (
            f"; joined through {m['via_id']} ({m['via_dataset']}:{m['via_line']}, "
            f"Jaccard {m['via_similarity']:.2f})"
        )
    return text


class NearDupStage(ShardStage):
    """Marks every near-duplicate but the first of its cluster (see the module docstring)."""

    name = STAGE
    reads = ("ingest", "neardup_groups")

    def __init__(self, config: NearDupConfig, respects: tuple[str, ...] = ("filter",)) -> None:
        super().__init__(config)
        self.respects = respects  # the same samples the signatures and the grouping saw
        self.workers = 1  # reading one small file per shard: processes would cost more

    def settings(self) -> dict:
        cfg = self.config
        return {
            "severity": cfg.severity,
            "threshold": cfg.threshold,  # shown in the ledger
            "overrides": {
                k: {"severity": o.severity, "threshold": o.threshold}
                for k, o in sorted(cfg.overrides.items())
                if o.severity is not None or o.threshold is not None
            },
        }

    def process(self, shard: ShardInput) -> ShardOutput:
        samples = shard.samples(["sample_id", "dataset", "line", "domain"])
        members = {m["sample_id"]: m for m in shard.table("neardup_groups").to_pylist()}
        rows, entries = [], []
        for s in samples.to_pylist():
            m = members.get(s["sample_id"])
            rows.append(
                {
                    "sample_id": s["sample_id"],
                    "dataset": s["dataset"],
                    "line": s["line"],
                    "cluster": m["cluster"] if m else None,
                    "role": m["role"] if m else None,
                    "similarity": m["similarity"] if m else None,
                    "cluster_size": m["cluster_size"] if m else None,
                }
            )
            if m is None or m["role"] != "duplicate":
                continue
            rule = self.config.resolve(s["dataset"], s["domain"])
            entries.append(
                LedgerEntry(
                    s["sample_id"],
                    s["dataset"],
                    s["line"],
                    STAGE,
                    RULE,
                    rule.severity,
                    m["similarity"],
                    rule.threshold,
                    detail(m),
                )
            )
        return ShardOutput(pa.Table.from_pylist(rows, schema=NEARDUP_SCHEMA), ledger_table(entries))
