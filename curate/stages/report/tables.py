"""A run folder's tables for inspection: samples, ledger, status, budget, filter, scores, packs.

Every stage output except ``samples/`` is optional (a run may stop anywhere, and stages are
added over time); a missing one is ``None``. Nothing here writes to the run folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from curate.core.folder import RunFolder
from curate.core.io import read_json
from curate.core.status import load_decisions, sample_status
from curate.stages.report.rows import CONTENT_COLUMNS, sample_content

# Stages in pipeline order, to sort ledger rules the way the data flowed.
STAGE_ORDER = (
    "ingest",
    "budget",
    "filter",
    "signatures",
    "decontaminate",
    "neardup_groups",
    "neardup",
    "score",
    "tokenize",
    "pack",
)

# What is read of every sample: a few bytes each, so the run's size, not its content, sets
# the memory. The content (CONTENT_COLUMNS) is read only for the samples a card shows.
SAMPLE_COLUMNS = ("sample_id", "dataset", "line", "domain", "kind")
SCORE_COLUMNS = [
    "sample_id",
    "dataset",
    "domain",
    *(f"{c}_{m}" for c in ("quality", "repetition") for m in ("score", "expected", "threshold")),
    "repetition_checked",
    "score",
    "threshold",
    "expected",
    "expected_score",
]


@dataclass
class RunTables:
    """What a run folder holds, as polars frames (``None`` where a stage has not run)."""

    run: RunFolder
    samples: pl.DataFrame  # SAMPLE_COLUMNS of every sample (no content: see ``with_content``)
    ledger: pl.DataFrame
    status: pl.DataFrame  # sample_id, dataset, status (keep | reject | flag), reasons
    decisions: pl.DataFrame
    budget: pl.DataFrame | None = None
    scores: pl.DataFrame | None = None  # score_view(): one row per sample and check
    packs: pl.DataFrame | None = None  # n_tokens, n_tiles, n_samples per pack
    stats: dict[str, dict] = field(default_factory=dict)
    roots: list[Path] = field(default_factory=list)  # dataset roots images may be read from
    text_clusters: pl.DataFrame | None = None  # neardup: one row per near-duplicate cluster
    image_clusters: pl.DataFrame | None = None  # neardup: images shared by several samples
    contamination: pl.DataFrame | None = None  # decontaminate: one row per sample and match

    # filter/: the filters' measures, a few dozen numbers per sample that the report does not
    # show; read on first use (``filter``), not with the rest.
    _filter: pl.DataFrame | None = field(default=None, repr=False)
    _filter_read: bool = field(default=False, repr=False)

    @property
    def filter(self) -> pl.DataFrame | None:
        """filter/ (its measures per kept or flagged sample), read on first use."""
        if not self._filter_read:
            self._filter = _read_optional(self.run, "filter")
            self._filter_read = True
        return self._filter

    @property
    def pack_caps(self) -> tuple[int, int] | None:
        """(C, K) the packs were made with, recovered from stats/pack.json fills."""
        return pack_caps(self.stats.get("pack"))


def find_run(path: str | os.PathLike[str]) -> Path:
    """A run folder path; a relative one not found here is looked up in parent folders.

    So the notebook finds ``runs/demo`` whether it runs from the repository or ``notebooks/``.
    """
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    for parent in Path.cwd().parents:
        if (parent / p).exists():
            return parent / p
    return p


def _read_optional(run: RunFolder, name: str, columns: list[str] | None = None):
    """The ``columns`` (default all) of a table, those each shard has; None without shards.

    Read by polars' own reader with the projection pushed down: pyarrow's, for the same
    columns, holds about 3x the frame's size in buffers it does not give back."""
    shards = run.shards(name)
    if not shards:
        return None
    frames = []
    for s in shards:
        path = run.shard_path(name, s)
        have = pq.read_schema(path).names
        cols = have if columns is None else [c for c in columns if c in have]
        frames.append(pl.scan_parquet(path).select(cols).collect())
    return pl.concat(frames, how="diagonal_relaxed")


def dataset_roots(run: RunFolder) -> list[Path]:
    """The resolved image roots of the run's datasets (from run.json); images live there."""
    info_path = run.path / "run.json"
    if not info_path.exists():
        return []
    datasets = read_json(info_path).get("datasets", {})
    roots = {Path(d["root"]).resolve() for d in datasets.values() if d.get("root")}
    return sorted(roots)


def score_view(scores: pl.DataFrame | None) -> pl.DataFrame | None:
    """Scores as one row per sample and check: sample_id, dataset, domain, check, score,
    expected, threshold.

    Reads the score stage's layout (``quality_score``, ``quality_threshold``,
    ``repetition_*``) and a plain one (``score``, ``threshold``, ``expected``).
    """
    if scores is None or scores.is_empty():
        return None
    cols = set(scores.columns)

    def col(name: str, dtype=pl.Float64):
        return pl.col(name).cast(dtype) if name in cols else pl.lit(None, dtype)

    base = [col("sample_id", pl.Utf8), col("dataset", pl.Utf8), col("domain", pl.Utf8)]
    parts = []
    for check in ("quality", "repetition"):
        if f"{check}_score" not in cols:
            continue
        part = scores
        if check == "repetition" and "repetition_checked" in cols:
            part = part.filter(pl.col("repetition_checked").fill_null(False))
        parts.append(
            part.select(
                *base,
                check=pl.lit(check),
                score=col(f"{check}_score"),
                expected=col(f"{check}_expected"),
                threshold=col(f"{check}_threshold"),
            )
        )
    if not parts and "score" in cols:
        parts.append(
            scores.select(
                *base,
                check=pl.lit("quality"),
                score=col("score"),
                expected=col("expected") if "expected" in cols else col("expected_score"),
                threshold=col("threshold"),
            )
        )
    if not parts:
        return None
    view = pl.concat(parts).with_columns(domain=pl.col("domain").fill_null("(none)"))
    return view.filter(pl.col("score").is_not_null() | pl.col("expected").is_not_null())


def pack_caps(stats: dict | None) -> tuple[int, int] | None:
    """(C, K) from a pack report: fill = total / (packs · cap), so cap = total / (fill · packs)."""
    if not stats or not stats.get("packs") or not stats.get("token_fill"):
        return None
    packs = stats["packs"]
    c = round(stats["tokens"] / (stats["token_fill"] * packs))
    k = round(stats["tiles"] / (stats["tile_fill"] * packs)) if stats.get("tile_fill") else 0
    return c, k


def _read_packs(run: RunFolder) -> pl.DataFrame | None:
    files = sorted(p for p in (run.path / "packs").glob("*.parquet") if not p.name.startswith("."))
    if not files:
        return None
    # Each pack's sample count, not its ids: the ids are as many as the samples packed.
    n_samples = pl.col("sample_ids").list.len().alias("n_samples")
    cols = [pl.col("pack_id", "n_tokens", "n_tiles"), n_samples]
    return pl.concat([pl.scan_parquet(p).select(cols).collect() for p in files])


def load_run_tables(run: str | os.PathLike[str] | RunFolder) -> RunTables:
    """Read everything the notebook and the report show from a run folder."""
    run = run if isinstance(run, RunFolder) else RunFolder(find_run(run))
    if not run.shards("samples"):
        raise FileNotFoundError(f"{run.path} has no samples/: run `curate ingest` first")
    samples = _read_optional(run, "samples", list(SAMPLE_COLUMNS)).select(SAMPLE_COLUMNS)
    stats = {}
    for p in sorted((run.path / "stats").glob("*.json")):
        data = read_json(p)
        # A global stage's own measures (pack's fills and bounds) sit in its "report".
        stats[p.stem] = {**data, **(data.get("report") or {})} if isinstance(data, dict) else data
    return RunTables(
        run=run,
        samples=samples,
        ledger=pl.from_arrow(run.ledger()),
        status=sample_status(run),
        decisions=load_decisions(run),
        budget=_read_optional(
            run,
            "budget",
            [
                "sample_id",
                "dataset",
                "n_images",
                "tiles",
                "text_tokens",
                "visual_tokens",
                "total_tokens",
            ],
        ),
        scores=score_view(_read_optional(run, "scores", SCORE_COLUMNS)),
        packs=_read_packs(run),
        stats=stats,
        roots=dataset_roots(run),
        text_clusters=_read_file(run.path / "neardup_groups" / "clusters" / "text.parquet"),
        image_clusters=_read_file(run.path / "neardup_groups" / "clusters" / "images.parquet"),
        contamination=_read_contamination(run),
    )


def _read_file(path: Path) -> pl.DataFrame | None:
    return pl.read_parquet(path) if path.exists() else None


def _read_contamination(run: RunFolder) -> pl.DataFrame | None:
    """decontaminate/ rows exploded to one row per (sample, match): sample_id, dataset,
    benchmark, item, by."""
    table = _read_optional(run, "decontaminate", ["sample_id", "dataset", "matches"])
    if table is None:
        return None
    return (
        table.explode("matches")
        .drop_nulls("matches")
        .select(
            "sample_id",
            "dataset",
            benchmark=pl.col("matches").struct.field("benchmark"),
            item=pl.col("matches").struct.field("item"),
            by=pl.col("matches").struct.field("by"),
        )
    )


def contamination_by_benchmark(tables: RunTables) -> pl.DataFrame | None:
    """Per benchmark: items matched, training samples matched and, of those, removed (status
    reject after review), and how many were matched by an image / by text."""
    found = tables.contamination
    if found is None:
        return None
    status = tables.status.select("sample_id", "status")
    per = found.join(status, on="sample_id", how="left")
    return (
        per.group_by("benchmark")
        .agg(
            items_matched=pl.col("item").n_unique(),
            samples=pl.col("sample_id").n_unique(),
            removed=pl.col("sample_id").filter(pl.col("status") == "reject").n_unique(),
            by_image=pl.col("sample_id").filter(pl.col("by") == "image").n_unique(),
            by_text=pl.col("sample_id").filter(pl.col("by") == "text").n_unique(),
            datasets=pl.col("dataset").unique().sort(),
        )
        .sort("benchmark")
    )


def _stage_rank() -> pl.Expr:
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return pl.col("stage").replace_strict(order, default=len(order), return_dtype=pl.Int32)


def counts_by_stage_rule_dataset(tables_or_ledger: RunTables | pl.DataFrame) -> pl.DataFrame:
    """Samples per (stage, rule, severity, dataset) in the ledger, in pipeline order.

    ``samples`` counts distinct sample ids (a sample may have several ledger rows of one rule,
    e.g. one per pack it was left out of in training), ``rows`` the ledger rows.
    """
    ledger = (
        tables_or_ledger.ledger if isinstance(tables_or_ledger, RunTables) else tables_or_ledger
    )
    keys = ["stage", "rule", "severity", "dataset"]
    if ledger.is_empty():
        return pl.DataFrame(
            schema={**{k: pl.Utf8 for k in keys}, "samples": pl.UInt32, "rows": pl.UInt32}
        )
    return (
        ledger.group_by(keys)
        .agg(samples=pl.col("sample_id").n_unique(), rows=pl.len())
        .with_columns(_rank=_stage_rank())
        .sort("_rank", "rule", "severity", "dataset")
        .drop("_rank")
    )


def status_counts(tables: RunTables) -> pl.DataFrame:
    """Per dataset: samples, and how many are keep / reject / flag after review decisions."""
    counts = tables.status.group_by("dataset", "status").len()
    wide = counts.pivot(on="status", index="dataset", values="len").fill_null(0)
    for s in ("keep", "reject", "flag"):
        if s not in wide.columns:
            wide = wide.with_columns(pl.lit(0, pl.UInt32).alias(s))
    return (
        wide.select("dataset", "keep", "reject", "flag")
        .with_columns(samples=pl.col("keep") + pl.col("reject") + pl.col("flag"))
        .select("dataset", "samples", "keep", "reject", "flag")
        .sort("dataset")
    )


def _quality_scores(tables: RunTables, ids: list[str]) -> pl.DataFrame | None:
    if tables.scores is None:
        return None
    q = tables.scores.filter((pl.col("check") == "quality") & pl.col("sample_id").is_in(ids))
    return q.group_by("sample_id").agg(
        score=pl.col("score").first(), expected=pl.col("expected").first()
    )


def rejected_samples(
    run: RunTables | str | os.PathLike[str] | RunFolder,
    rule: str | None = None,
    dataset: str | None = None,
    score_below: float | None = None,
    *,
    stage: str | None = None,
    severity: str | None = None,
    status: str | None = None,
    content: bool = False,
) -> pl.DataFrame:
    """Samples with at least one ledger row (rejected or flagged), one row per sample.

    Filters: ``rule`` (the sample failed that rule), ``dataset``, ``score_below`` (quality
    score below it; unscored samples drop out), ``stage``, ``severity`` (of the matched rows),
    ``status`` (after review: keep | reject | flag). Columns: sample_id, dataset, line,
    status (reject for lines ingest rejected: they never became samples), worst (reject |
    flag), rules, failures (list of ledger rows), score, expected, ingested, and the sample
    columns; with ``content``, also each sample's conversations, images and video (read for
    the selected samples only: narrow the selection first, or add it to a few rows later with
    ``with_content``).
    """
    tables = run if isinstance(run, RunTables) else load_run_tables(run)
    ledger = tables.ledger
    match = ledger
    if rule is not None:
        match = match.filter(pl.col("rule") == rule)
    if stage is not None:
        match = match.filter(pl.col("stage") == stage)
    if severity is not None:
        match = match.filter(pl.col("severity") == severity)
    if dataset is not None:
        match = match.filter(pl.col("dataset") == dataset)
    ids = match.select("sample_id", "dataset").unique()
    failures = (
        ledger.join(ids, on=["sample_id", "dataset"], how="semi")
        .with_columns(_rank=_stage_rank())
        .sort("_rank", "rule")
        .group_by("sample_id", "dataset", maintain_order=True)
        .agg(
            line=pl.col("line").max(),
            worst=pl.when((pl.col("severity") == "reject").any())
            .then(pl.lit("reject"))
            .otherwise(pl.lit("flag")),
            rules=pl.col("rule").unique(maintain_order=True),
            failures=pl.struct("stage", "rule", "severity", "value", "threshold", "detail"),
        )
    )
    # The selected samples' rows first (a filter on a small id set), then the joins: joining
    # the run's every sample to a few thousand would hash the whole run.
    chosen = failures["sample_id"].unique().to_list()
    samples = tables.samples.filter(pl.col("sample_id").is_in(chosen)).drop("line")
    states = tables.status.filter(pl.col("sample_id").is_in(chosen)).select("sample_id", "status")
    out = failures.join(samples, on=["sample_id", "dataset"], how="left").join(
        states, on="sample_id", how="left"
    )
    out = out.with_columns(ingested=pl.col("kind").is_not_null())
    # A line ingest rejected never became a sample: it has no status of its own, and it is
    # as rejected as a sample can be.
    out = out.with_columns(
        status=pl.when(pl.col("ingested")).then(pl.col("status")).otherwise(pl.lit("reject"))
    )
    scores = _quality_scores(tables, chosen)
    if scores is not None:
        out = out.join(scores, on="sample_id", how="left")
    else:
        out = out.with_columns(score=pl.lit(None, pl.Float64), expected=pl.lit(None, pl.Float64))
    if score_below is not None:
        value = pl.coalesce(pl.col("score").cast(pl.Float64), pl.col("expected"))
        out = out.filter(value < score_below)
    if status is not None:
        out = out.filter(pl.col("status") == status)
    out = out.sort("dataset", "line", "sample_id").unique(
        ["sample_id", "dataset"], keep="first", maintain_order=True
    )
    return with_content(tables, out) if content else out


def with_content(
    run: RunTables | RunFolder | str | os.PathLike[str], rows: pl.DataFrame
) -> pl.DataFrame:
    """``rows`` (with a sample_id column) with each sample's conversations, images and video,
    read from samples/ for these ids only (null for ids that are no sample: ingest rejects)."""
    folder = _folder(run)
    rows = rows.drop([c for c in CONTENT_COLUMNS if c in rows.columns])
    content = sample_content(folder, rows["sample_id"])
    for c in CONTENT_COLUMNS:  # a shard written before a column existed lacks it
        if c not in content.columns:
            content = content.with_columns(pl.lit(None).alias(c))
    content = content.select("sample_id", *CONTENT_COLUMNS)
    return rows.join(content, on="sample_id", how="left", maintain_order="left")


def _folder(run: RunTables | RunFolder | str | os.PathLike[str]) -> RunFolder:
    if isinstance(run, RunTables):
        return run.run
    return run if isinstance(run, RunFolder) else RunFolder(find_run(run))
