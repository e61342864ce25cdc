"""What ``curate filter`` prints: samples per dataset and rule."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table

    from curate.core.engine import StageSummary
    from curate.core.folder import RunFolder


def rule_rows(run: RunFolder, summary: StageSummary) -> list[dict]:
    """Per dataset and rule: samples flagged, samples rejected, and their share of the dataset."""
    # pyarrow, not polars: polars' thread pool in this process would deadlock the forked
    # workers of a later stage that uses polars.
    counts = (
        run.ledger("filter")
        .group_by(["dataset", "rule", "severity"])
        .aggregate([("sample_id", "count_distinct")])
        .to_pylist()
    )
    by_key: dict[tuple[str, str], dict[str, int]] = {}
    for r in counts:
        key = (r["dataset"], r["rule"])
        by_key.setdefault(key, {})[r["severity"]] = r["sample_id_count_distinct"]
    rows = []
    for (dataset, rule), n in sorted(by_key.items()):
        flagged, rejected = n.get("flag", 0), n.get("reject", 0)
        total = summary.by_dataset.get(dataset, [0])[0]
        rows.append(
            {
                "dataset": dataset,
                "rule": rule,
                "flagged": flagged,
                "rejected": rejected,
                "share": (flagged + rejected) / total if total else 0.0,
            }
        )
    return rows


def image_line(stats: dict) -> str:
    """The filter's image decoding, from ``images.read_cache_stats``."""
    return (
        f"filter images: {stats['images']:,} looked up per shard, {stats['hit_rate']:.1%} from "
        f"the run's cache, {stats['decoded']:,} decoded ({stats['images_per_s']:,.0f} images/s)"
    )


def rule_table(rows: list[dict]) -> Table:
    from rich.table import Table

    t = Table(title="filter: samples per dataset and rule")
    for col in ("dataset", "rule", "flagged", "rejected", "share"):
        t.add_column(col, justify="left" if col in ("dataset", "rule") else "right")
    for r in rows:
        t.add_row(
            r["dataset"], r["rule"], str(r["flagged"]), str(r["rejected"]), f"{r['share']:.1%}"
        )
    return t
