"""The grouping step: near-duplicate clusters over every shard, with memory bounded by one
shard, one partition of band keys and the candidate pairs, never by the run.

Out of core, in this order:

1. **Spill**: each ``signatures/`` shard is read on its own (rows numbered across shards:
   ``idx``, uint32); its MinHash is cut into band keys and its images' uses listed, and both
   are written to Parquet by a hash of the key (``spill.Spill``).
2. **Candidates**: the band keys come back one hash range at a time (about
   ``partition_rows`` of them, however many samples the run has); rows sharing a band and a
   key are a bucket. In each bucket, sorted by the kept order, a bucket of at most
   ``pair_limit`` samples gives every pair; a larger one (a template answered a thousand times)
   gives each member paired with its first, so a bucket costs its size, never its square.
3. **Verification**: only the samples in a candidate pair are read back, shard by shard (their
   MinHash and pHashes). A pair is a near-duplicate when its estimated Jaccard reaches the later
   sample's threshold and, for samples with images, they have as many images and each pair of
   images is within ``image_distance`` bits (or the same file): one image asked about in
   several ways is normal SFT data, not a duplicate.
4. **Clusters**: connected components of the verified pairs (scipy, over candidate samples
   only). The **kept** sample of a cluster is its first in the kept order: datasets in
   meta-file order, then line. Every other member is a near-duplicate of it; its similarity
   to the kept sample is estimated directly (a member that joined through a chain says
   through which sample).
5. **Image reuse** (``reuse.image_clusters``): distinct pHashes grouped the same way, by
   pigeonhole bands, into image clusters; per cluster, how many files, samples and datasets
   use it.

Outputs: ``neardup_groups/<shard>.parquet`` (one per samples shard: its samples that are in a
cluster, with their kept sample), ``neardup_groups/clusters/text.parquet`` and
``clusters/images.parquet`` (for the report). The partition size changes memory and speed,
never the result.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.errors import CurateError
from curate.core.folder import RunFolder
from curate.core.io import write_parquet_atomic
from curate.core.stage import GlobalInput, GlobalOutput, GlobalStage
from curate.stages.neardup.config import NearDupConfig
from curate.stages.neardup.images import hamming
from curate.stages.neardup.pairs import Edges, bucket_edges, components, first_per_component
from curate.stages.neardup.reuse import USES_SCHEMA, image_clusters, image_uses
from curate.stages.neardup.spill import Spill
from curate.stages.neardup.text import band_keys

__all__ = ["Edges", "NearDupGroupsStage", "bucket_edges", "components", "first_per_component"]

STAGE = "neardup_groups"
_LINE_BITS = 40  # order key: dataset rank · 2^40 + line
_SIM_CHUNK = 1 << 14  # pairs whose MinHash rows are compared at once (16k × 128 × 4 B × 2)
_BANDS_SCHEMA = pa.schema(
    [
        ("part", pa.uint64()),  # the band key (already a hash)
        ("band", pa.uint16()),
        ("idx", pa.uint32()),
        ("order", pa.uint64()),
    ]
)
_NODE_COLUMNS = ["sample_id", "dataset", "line", "minhash", "image_paths", "image_hashes"]

MEMBERS_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("dataset", pa.string()),
        ("line", pa.int64()),
        ("cluster", pa.string()),  # the kept sample's id
        ("role", pa.string()),  # kept | duplicate
        ("kept_id", pa.string()),
        ("kept_dataset", pa.string()),
        ("kept_line", pa.int64()),
        ("similarity", pa.float64()),  # estimated Jaccard with the kept sample
        ("image_distance", pa.int64()),  # largest pHash distance to its images; null: no images
        ("cluster_size", pa.int64()),
        ("via_id", pa.string()),  # set when it joined the cluster through another member
        ("via_dataset", pa.string()),
        ("via_line", pa.int64()),
        ("via_similarity", pa.float64()),
    ]
)


class NearDupGroupsStage(GlobalStage):
    """Near-duplicate clusters across every shard and dataset (see the module docstring)."""

    name = STAGE
    outputs = (STAGE,)

    def __init__(self, config: NearDupConfig, excluded: tuple[str, ...] = ()) -> None:
        super().__init__(config)
        # Stages whose rejections leave the grouping (decontaminated samples are never kept).
        self.excluded = excluded
        self.reads = ("signatures", *excluded)

    def settings(self) -> dict:
        cfg = self.config  # partition_rows is left out: it never changes the result
        return {
            "bands": cfg.band_count(),
            "threshold": cfg.threshold,
            "thresholds": {k: o.threshold for k, o in sorted(cfg.overrides.items()) if o.threshold},
            "image_distance": cfg.image_distance,
            "image_bands": cfg.image_band_count(),
            "pair_limit": cfg.pair_limit,
            "kept": "first by meta-file dataset order, then line",
        }

    def extra_inputs(self, run: RunFolder) -> dict[str, str]:
        return {"dataset_order": ",".join(_dataset_order(run))}

    def run(self, inp: GlobalInput) -> GlobalOutput:
        run, cfg = inp.run, self.config
        shards = run.shards("samples")
        files = [run.shard_path("signatures", s) for s in shards]
        if not files:
            return GlobalOutput(report={"near_duplicates": 0})
        source = Signatures(run, files, self.excluded, cfg)
        spill = inp.out / "_spill"
        keys, uses = Spill(spill / "bands", _BANDS_SCHEMA), Spill(spill / "uses", USES_SCHEMA)
        for k in range(len(files)):
            frame = source.frame(k)
            keys.write(_band_rows(frame, cfg))
            uses.write(image_uses(frame))
        text, report = _text_clusters(source, keys, cfg)
        shutil.rmtree(spill / "bands", ignore_errors=True)
        for k, shard in enumerate(shards):
            lo, hi = int(source.bounds[k]), int(source.bounds[k + 1])
            part = text.filter((pl.col("idx") >= lo) & (pl.col("idx") < hi))
            write_parquet_atomic(
                part.drop("idx").to_arrow().cast(MEMBERS_SCHEMA),
                inp.out / STAGE / f"{shard}.parquet",
            )
        clusters = inp.out / STAGE / "clusters"
        write_parquet_atomic(_text_summary(text).to_arrow(), clusters / "text.parquet")
        images = image_clusters(
            uses,
            cfg.image_distance,
            cfg.image_band_count(),
            cfg.pair_limit,
            cfg.partition_rows,
            spill / "image_bands",
        )
        shutil.rmtree(spill, ignore_errors=True)
        write_parquet_atomic(images.to_arrow(), clusters / "images.parquet")
        report["image_clusters_shared"] = len(images)
        return GlobalOutput(report=report)


def _dataset_order(run: RunFolder) -> list[str]:
    return run.info().get("dataset_order") or sorted(run.datasets())


class Signatures:
    """The ``signatures/`` shards, read one at a time. Rows are numbered across shards
    (``idx``: the row's position in the shards one after another) and get their kept-order
    key and their dataset's threshold."""

    def __init__(
        self, run: RunFolder, files: list[Path], excluded: tuple[str, ...], cfg: NearDupConfig
    ) -> None:
        self.files = files
        sizes = [pq.ParquetFile(f).metadata.num_rows for f in files]
        self.bounds = np.cumsum([0, *sizes])
        if self.bounds[-1] >= 2**32:  # Edges packs a pair of row numbers in one uint64
            raise CurateError(
                f"near-duplicates: {self.bounds[-1]:,} samples; the grouping numbers them in "
                "32 bits (at most 4,294,967,295): split the run"
            )
        order = _dataset_order(run)
        datasets = run.datasets()
        rank = {name: i for i, name in enumerate(order)}
        rank.update({d: len(order) + i for i, d in enumerate(sorted(set(datasets) - set(rank)))})
        self.rank = rank
        self.thresholds = {
            d: cfg.resolve(d, spec.get("domain")).threshold for d, spec in datasets.items()
        }
        self.default_threshold = cfg.threshold
        self.gone = pl.Series("sample_id", [], dtype=pl.String)
        if excluded:  # (reading no ledger at all spares loading pyarrow's dataset reader)
            gone = run.ledger(stages=list(excluded)).select(["sample_id", "severity"])
            gone = pl.from_arrow(gone).filter(pl.col("severity") == "reject")
            self.gone = gone["sample_id"].unique()

    def frame(
        self, k: int, rows: np.ndarray | None = None, columns: list[str] | None = None
    ) -> pl.DataFrame:
        """Shard ``k`` (or its ``rows``, positions in the shard) with idx, order and thr;
        the whole shard without the samples an excluded stage rejected."""
        # polars' reader: pyarrow's holds ~8x a shard's MinHash column while decoding it.
        frame = pl.read_parquet(self.files[k], columns=columns)
        idx = np.arange(self.bounds[k], self.bounds[k + 1], dtype=np.uint32)
        if rows is not None:
            frame, idx = frame[rows], idx[rows]
        frame = frame.with_columns(
            idx=pl.Series(idx, dtype=pl.UInt32),
            order=(
                pl.col("dataset").replace_strict(
                    self.rank, default=len(self.rank), return_dtype=pl.UInt64
                )
                * (1 << _LINE_BITS)
                + pl.col("line").cast(pl.UInt64)
            ),
            thr=pl.col("dataset").replace_strict(
                self.thresholds, default=self.default_threshold, return_dtype=pl.Float64
            ),
        )
        if rows is None and len(self.gone):
            frame = frame.filter(~pl.col("sample_id").is_in(self.gone.implode()))
        return frame


def _band_rows(frame: pl.DataFrame, cfg: NearDupConfig) -> pa.Table:
    """One row per (sample with a text signature, band): key, band, idx and kept order."""
    bands = cfg.band_count()
    part = frame.filter(pl.col("minhash").is_not_null())
    if part.is_empty():
        return _BANDS_SCHEMA.empty_table()
    sigs = _minhash_matrix(part["minhash"], cfg.num_perm)
    groups = part["group"].to_numpy()
    labels = np.unique(groups)
    if len(labels) == 1:  # the usual case: no copy of the shard's MinHash
        keys = band_keys(sigs, bands, str(labels[0]))
    else:
        keys = np.zeros((len(part), bands), dtype=np.uint64)
        for label in labels:
            rows = groups == label
            keys[rows] = band_keys(sigs[rows], bands, str(label))
    return pa.table(
        {
            "part": keys.ravel(),
            "band": np.tile(np.arange(bands, dtype=np.uint16), len(part)),
            "idx": np.repeat(part["idx"].to_numpy(), bands),
            "order": np.repeat(part["order"].to_numpy(), bands),
        }
    )


def _minhash_matrix(minhash: pl.Series, num_perm: int) -> np.ndarray:
    """A column of MinHash lists (no nulls) as a (rows, num_perm) uint32 array, read from
    the Arrow buffers without a copy where they are contiguous."""
    values = minhash.to_arrow().flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.uint32, copy=False).reshape(len(minhash), num_perm)


def _candidates(keys: Spill, cfg: NearDupConfig) -> Edges:
    """Candidate pairs, one partition of band keys at a time."""
    parts = []
    for t in keys.parts(cfg.partition_rows):
        if len(t) < 2:
            continue
        edges = bucket_edges(
            t.column("part").to_numpy(),
            t.column("idx").to_numpy().astype(np.int64),
            t.column("order").to_numpy(),
            cfg.pair_limit,
            bands=t.column("band").to_numpy(),
        )
        parts.append(edges.unique())
    return Edges.concat(parts).unique()


def _nodes(source: Signatures, nodes: np.ndarray, num_perm: int) -> tuple[pl.DataFrame, np.ndarray]:
    """The candidate samples' rows (in idx order) and their MinHash matrix, read shard by
    shard: all that is read back in full."""
    sigs = np.empty((len(nodes), num_perm), dtype=np.uint32)
    pieces = []
    for k in range(len(source.files)):
        lo, hi = np.searchsorted(nodes, source.bounds[k : k + 2])
        if lo == hi:
            continue
        rows = (nodes[lo:hi] - source.bounds[k]).astype(np.int64)
        frame = source.frame(k, rows, _NODE_COLUMNS)
        sigs[lo:hi] = _minhash_matrix(frame["minhash"], num_perm)
        pieces.append(frame.drop("minhash"))
    return pl.concat(pieces), sigs


def _similarity(sigs: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard of each pair (rows a, b of ``sigs``), a chunk of pairs at a time so
    the compared copies stay small."""
    out = np.empty(len(a), dtype=np.float64)
    for s in range(0, len(a), _SIM_CHUNK):
        e = s + _SIM_CHUNK
        out[s:e] = (sigs[a[s:e]] == sigs[b[s:e]]).mean(axis=1)
    return out


def _images_match(
    paths: list, hashes: list, a: np.ndarray, b: np.ndarray, distance: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: whether the images match one to one, and the largest distance (-1: none)."""
    ok = np.ones(len(a), bool)
    worst = np.full(len(a), -1, np.int64)
    for e, (i, j) in enumerate(zip(a.tolist(), b.tolist(), strict=True)):
        pa_, pb_ = paths[i] or [], paths[j] or []
        if not pa_ and not pb_:
            continue
        if len(pa_) != len(pb_):
            ok[e] = False
            continue
        d_max = 0
        for p1, p2, h1, h2 in zip(pa_, pb_, hashes[i] or [], hashes[j] or [], strict=False):
            if p1 == p2:
                continue
            if h1 is None or h2 is None:
                d_max = 64
                break
            d_max = max(d_max, int(hamming(h1, h2)))
        worst[e] = d_max
        ok[e] = d_max <= distance
    return ok, worst


def _text_clusters(
    source: Signatures, keys: Spill, cfg: NearDupConfig
) -> tuple[pl.DataFrame, dict]:
    bands = cfg.band_count()
    cand = _candidates(keys, cfg)
    report = {
        "bands": bands,
        "rows_per_band": cfg.num_perm // bands,
        "candidate_pairs": len(cand),
    }
    empty = pl.DataFrame(
        schema={"idx": pl.UInt32, **pl.from_arrow(MEMBERS_SCHEMA.empty_table()).schema}
    )
    if not len(cand):
        return empty, {**report, "verified_pairs": 0, "clusters": 0, "near_duplicates": 0}
    nodes = np.unique(np.concatenate([cand.a, cand.b]))
    rows, sigs = _nodes(source, nodes, cfg.num_perm)
    a, b = np.searchsorted(nodes, cand.a), np.searchsorted(nodes, cand.b)
    sim = _similarity(sigs, a, b)
    thr = rows["thr"].to_numpy()
    paths, hashes = rows["image_paths"].to_list(), rows["image_hashes"].to_list()
    text_ok = sim >= thr[b] - 1e-12
    img_ok, img_d = _images_match(paths, hashes, a[text_ok], b[text_ok], cfg.image_distance)
    keep = np.flatnonzero(text_ok)[img_ok]
    report["verified_pairs"] = len(keep)
    if not len(keep):
        return empty, {**report, "clusters": 0, "near_duplicates": 0}
    verified = Edges(a[keep], b[keep])
    members, labels = components(verified)
    order = rows["order"].to_numpy()[members]
    first = members[first_per_component(labels, order)]
    sizes = np.bincount(labels)[labels]
    # A member's own link: its verified partner earliest in the kept order (for the detail).
    via = _earliest_partner(verified, rows["order"].to_numpy())
    _, worst = _images_match(paths, hashes, first, members, cfg.image_distance)
    out = _member_rows(rows, members, first, sizes, sigs, via, worst)
    dups = int((out["role"] == "duplicate").sum())
    report.update(clusters=int(labels.max() + 1), near_duplicates=dups)
    return out, report


def _earliest_partner(edges: Edges, order: np.ndarray) -> np.ndarray:
    """For every node of a verified pair (row positions), its partner earliest in the kept
    order: the sample it is a near-duplicate of directly (-1: in no pair). Equal orders keep
    the partner met first, pair by pair."""
    node = np.empty(2 * len(edges), np.int64)
    partner = np.empty_like(node)
    node[0::2], partner[0::2] = edges.b, edges.a
    node[1::2], partner[1::2] = edges.a, edges.b
    o = np.lexsort((order[partner], node))  # stable: ties stay in the order met
    starts = np.flatnonzero(np.r_[True, node[o][1:] != node[o][:-1]])
    best = np.full(len(order), -1, np.int64)
    best[node[o][starts]] = partner[o][starts]
    return best


def _member_rows(rows, members, first, sizes, sigs, via, worst) -> pl.DataFrame:
    """One row per cluster member (columns, not a dict per member); ``worst``: the largest
    pHash distance of its images to the kept sample's (-1: no images)."""
    sim = _similarity(sigs, members, first)
    dup = members != first
    v = via[members]
    link = dup & (v >= 0) & (v != first)
    via_sim = np.zeros(len(members))
    via_sim[link] = _similarity(sigs, members[link], v[link])
    who = rows.select("idx", "sample_id", "dataset", "line")
    m, f, w = who[members], who[first], who[np.where(link, v, members)]
    flags = pl.DataFrame({"dup": dup, "link": link, "img": dup & (worst >= 0)})

    def when(flag: str, value: pl.Series) -> pl.Expr:
        return pl.when(flags[flag]).then(pl.lit(value)).otherwise(None)

    out = pl.select(
        idx=m["idx"],
        sample_id=m["sample_id"],
        dataset=m["dataset"],
        line=m["line"],
        cluster=f["sample_id"],
        role=pl.when(flags["dup"]).then(pl.lit("duplicate")).otherwise(pl.lit("kept")),
        kept_id=f["sample_id"],
        kept_dataset=f["dataset"],
        kept_line=f["line"],
        similarity=pl.Series(np.where(dup, sim, 1.0)),
        image_distance=when("img", pl.Series(worst)),
        cluster_size=pl.Series(sizes),
        via_id=when("link", w["sample_id"]),
        via_dataset=when("link", w["dataset"]),
        via_line=when("link", w["line"]),
        via_similarity=when("link", pl.Series(via_sim)),
    )
    schema = {"idx": pl.UInt32, **pl.from_arrow(MEMBERS_SCHEMA.empty_table()).schema}
    return out.select(pl.col(c).cast(t) for c, t in schema.items()).sort("idx")


def _text_summary(members: pl.DataFrame) -> pl.DataFrame:
    """One row per cluster: kept sample, size, datasets, lowest similarity, with images."""
    if members.is_empty():
        return pl.DataFrame(
            schema={
                "cluster": pl.Utf8,
                "kept_dataset": pl.Utf8,
                "kept_line": pl.Int64,
                "size": pl.UInt32,
                "datasets": pl.List(pl.Utf8),
                "min_similarity": pl.Float64,
                "with_images": pl.Boolean,
            }
        )
    return (
        members.group_by("cluster")
        .agg(
            kept_dataset=pl.col("kept_dataset").first(),
            kept_line=pl.col("kept_line").first(),
            size=pl.len(),
            datasets=pl.col("dataset").unique().sort(),
            min_similarity=pl.col("similarity").min(),
            with_images=pl.col("image_distance").is_not_null().any(),
        )
        .sort(["size", "kept_dataset", "kept_line"], descending=[True, False, False])
    )
