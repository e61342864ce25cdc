"""The grouping step: near-duplicate clusters over every shard, with memory bounded by the
candidates rather than by the run.

Out of core, in this order:

1. **Candidates**: each ``signatures/`` shard's MinHash is cut into band keys (one shard in
   memory at a time, written to a staging file), then one LSH band at a time polars scans the
   band's key column of every file (streaming), keeps the keys two or more samples share and
   only their rows come into memory. In each bucket, sorted by the kept order, a bucket of at most
   ``pair_limit`` samples gives every pair; a larger one (a template answered a thousand times)
   gives each member paired with its first, so a bucket costs its size, never its square.
2. **Verification**: only the samples in a candidate pair are read back (their MinHash and
   pHashes). A pair is a near-duplicate when its estimated Jaccard reaches the later sample's
   threshold and, for samples with images, they have as many images and each pair of images
   is within ``image_distance`` bits (or the same file): one image asked about in several ways
   is normal SFT data, not a duplicate.
3. **Clusters**: connected components of the verified pairs (scipy, over candidate samples
   only). The **kept** sample of a cluster is its first in the kept order: datasets in
   meta-file order, then line. Every other member is a near-duplicate of it; its similarity
   to the kept sample is estimated directly (a member that joined through a chain says
   through which sample).
4. **Image reuse**: every distinct pHash is grouped the same way (pigeonhole bands: two hashes
   within d bits agree on one of d + 1 bands) into image clusters; per cluster, how many
   files, samples and datasets use it.

Outputs: ``neardup_groups/<shard>.parquet`` (one per samples shard: its samples that are in a
cluster, with their kept sample), ``neardup_groups/clusters/text.parquet`` and
``clusters/images.parquet`` (for the report).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.folder import RunFolder
from curate.core.io import write_parquet_atomic
from curate.core.stage import GlobalInput, GlobalOutput, GlobalStage
from curate.stages.neardup.config import NearDupConfig
from curate.stages.neardup.images import hamming, hash_bands
from curate.stages.neardup.text import band_keys

STAGE = "neardup_groups"
_LINE_BITS = 40  # order key: dataset rank · 2^40 + line

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


@dataclass
class Edges:
    """Candidate or verified pairs (a before b in the kept order), as row indices."""

    a: np.ndarray
    b: np.ndarray

    @classmethod
    def empty(cls) -> Edges:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.a)

    def unique(self) -> Edges:
        if not len(self):
            return self
        key = np.unique((self.a.astype(np.uint64) << np.uint64(32)) | self.b.astype(np.uint64))
        return Edges(
            (key >> np.uint64(32)).astype(np.int64), (key & np.uint64(2**32 - 1)).astype(np.int64)
        )

    @classmethod
    def concat(cls, parts: list[Edges]) -> Edges:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(np.concatenate([p.a for p in parts]), np.concatenate([p.b for p in parts]))


def bucket_edges(
    keys: np.ndarray, members: np.ndarray, order: np.ndarray, pair_limit: int
) -> Edges:
    """Pairs of members that share a key: every pair in a bucket of at most ``pair_limit``,
    each member with the bucket's first in a larger one; ``a`` comes before ``b`` in ``order``."""
    if len(keys) < 2:
        return Edges.empty()
    o = np.lexsort((order, keys))
    k, m = keys[o], members[o]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    sizes = np.diff(np.r_[starts, len(k)])
    parts = []
    for size in np.unique(sizes[(sizes > 1) & (sizes <= pair_limit)]):
        s = starts[sizes == size]
        i, j = np.triu_indices(int(size), 1)
        parts.append(Edges(m[(s[:, None] + i).ravel()], m[(s[:, None] + j).ravel()]))
    big = sizes > pair_limit
    if big.any():
        first = np.repeat(starts[big], sizes[big] - 1)
        offs = np.concatenate([np.arange(1, z) for z in sizes[big]])
        parts.append(Edges(m[first], m[first + offs]))
    return Edges.concat(parts)


def components(edges: Edges) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, component label per node) of the graph the edges make."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes = np.unique(np.concatenate([edges.a, edges.b]))
    ia, ib = np.searchsorted(nodes, edges.a), np.searchsorted(nodes, edges.b)
    graph = coo_matrix((np.ones(len(ia), np.int8), (ia, ib)), shape=(len(nodes), len(nodes)))
    _, labels = connected_components(graph, directed=False)
    return nodes, labels


def first_per_component(labels: np.ndarray, order: np.ndarray) -> np.ndarray:
    """For each node, the position of its component's first node in ``order``."""
    o = np.lexsort((order, labels))
    starts = np.r_[True, labels[o][1:] != labels[o][:-1]]
    first_of_sorted = o[np.flatnonzero(starts)][np.cumsum(starts) - 1]
    out = np.empty_like(o)
    out[o] = first_of_sorted
    return out


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
        cfg = self.config
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
        table = _signatures(run, files, self.excluded, cfg)
        keys = _write_band_keys(table, files, cfg, inp.out / "_bands")
        text, report = _text_clusters(table, keys, cfg)
        sizes = [pq.ParquetFile(f).metadata.num_rows for f in files]
        bounds = np.cumsum([0, *sizes])
        for k, shard in enumerate(shards):
            part = text.filter((pl.col("idx") >= bounds[k]) & (pl.col("idx") < bounds[k + 1]))
            write_parquet_atomic(
                part.drop("idx").to_arrow().cast(MEMBERS_SCHEMA),
                inp.out / STAGE / f"{shard}.parquet",
            )
        clusters = inp.out / STAGE / "clusters"
        write_parquet_atomic(_text_summary(text).to_arrow(), clusters / "text.parquet")
        images = image_clusters(table, cfg.image_distance, cfg.image_band_count(), cfg.pair_limit)
        write_parquet_atomic(images.to_arrow(), clusters / "images.parquet")
        report["image_clusters_shared"] = len(images)
        return GlobalOutput(report=report)


def _dataset_order(run: RunFolder) -> list[str]:
    return run.info().get("dataset_order") or sorted(run.datasets())


def _signatures(
    run: RunFolder, files: list, excluded: tuple[str, ...], cfg: NearDupConfig
) -> pl.LazyFrame:
    """Every signature row (lazily) with its row index, kept-order key and threshold."""
    order = _dataset_order(run)
    datasets = run.datasets()
    rank = {name: i for i, name in enumerate(order)}
    rank.update({d: len(order) + i for i, d in enumerate(sorted(set(datasets) - set(rank)))})
    thresholds = {d: cfg.resolve(d, spec.get("domain")).threshold for d, spec in datasets.items()}
    lf = pl.scan_parquet(files, row_index_name="idx").with_columns(
        order=(
            pl.col("dataset").replace_strict(rank, default=len(rank), return_dtype=pl.UInt64)
            * (1 << _LINE_BITS)
            + pl.col("line").cast(pl.UInt64)
        ),
        thr=pl.col("dataset").replace_strict(
            thresholds, default=cfg.threshold, return_dtype=pl.Float64
        ),
    )
    gone = pl.from_arrow(run.ledger(stages=list(excluded)).select(["sample_id", "severity"]))
    gone = gone.filter(pl.col("severity") == "reject").select("sample_id").unique()
    if len(gone):
        lf = lf.join(gone.lazy(), on="sample_id", how="anti")
    return lf


def _write_band_keys(lf: pl.LazyFrame, files: list, cfg: NearDupConfig, folder) -> pl.LazyFrame:
    """Band keys (idx, order, bands) of every sample with a text signature, one staging file
    per signatures shard (one shard's MinHash in memory at a time)."""
    bands = cfg.band_count()
    sizes = [pq.ParquetFile(f).metadata.num_rows for f in files]
    bounds = np.cumsum([0, *sizes])
    written = []
    for k in range(len(files)):
        part = (
            lf.filter(
                (pl.col("idx") >= bounds[k])
                & (pl.col("idx") < bounds[k + 1])
                & pl.col("minhash").is_not_null()
            )
            .select("idx", "order", "group", "minhash")
            .collect()
        )
        keys = np.zeros((len(part), bands), dtype=np.uint64)
        if len(part):
            sigs = part.select(pl.col("minhash").list.to_array(cfg.num_perm)).to_series().to_numpy()
            groups = part["group"].to_numpy()
            for label in np.unique(groups):
                rows = groups == label
                keys[rows] = band_keys(sigs[rows].astype(np.uint32), bands, str(label))
        out = pl.DataFrame(
            {"idx": part["idx"], "order": part["order"]}
            | {f"b{j}": keys[:, j] for j in range(bands)}
        )
        path = folder / f"{k:06d}.parquet"
        write_parquet_atomic(out.to_arrow(), path)
        written.append(path)
    return pl.scan_parquet(written)


def _candidates(keys: pl.LazyFrame, bands: int, pair_limit: int) -> Edges:
    parts = []
    for j in range(bands):
        keyed = keys.select("idx", "order", key=pl.col(f"b{j}"))
        shared = keyed.group_by("key").agg(n=pl.len()).filter(pl.col("n") > 1).select("key")
        rows = keyed.join(shared, on="key", how="semi").collect(engine="streaming")
        if len(rows) < 2:
            continue
        parts.append(
            bucket_edges(
                rows["key"].to_numpy(),
                rows["idx"].to_numpy().astype(np.int64),
                rows["order"].to_numpy(),
                pair_limit,
            )
        )
    return Edges.concat(parts).unique()


def _nodes(lf: pl.LazyFrame, nodes: np.ndarray) -> pl.DataFrame:
    """The candidate samples' rows (sorted by idx): all that is read back in full."""
    wanted = pl.DataFrame({"idx": nodes.astype(np.uint32)}).lazy()
    cols = ["idx", "sample_id", "dataset", "line", "order", "thr", "minhash"]
    cols += ["image_paths", "image_hashes"]
    return (
        lf.join(wanted, on="idx", how="semi").select(cols).sort("idx").collect(engine="streaming")
    )


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
    lf: pl.LazyFrame, keys: pl.LazyFrame, cfg: NearDupConfig
) -> tuple[pl.DataFrame, dict]:
    bands = cfg.band_count()
    cand = _candidates(keys, bands, cfg.pair_limit)
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
    rows = _nodes(lf, nodes)
    pos = {int(i): k for k, i in enumerate(rows["idx"].to_list())}
    a = np.array([pos[int(x)] for x in cand.a], np.int64)
    b = np.array([pos[int(x)] for x in cand.b], np.int64)
    sigs = rows.select(pl.col("minhash").list.to_array(cfg.num_perm)).to_series().to_numpy()
    sim = (sigs[a] == sigs[b]).mean(axis=1)
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
    via = _earliest_partner(verified, order_all=rows["order"].to_numpy())
    out = _member_rows(rows, members, first, sizes, sigs, via, cfg.image_distance)
    dups = int((out["role"] == "duplicate").sum())
    report.update(clusters=int(labels.max() + 1), near_duplicates=dups)
    return out, report


def _earliest_partner(edges: Edges, order_all: np.ndarray) -> dict[int, int]:
    """For every node of a verified pair, its partner earliest in the kept order (row
    positions): the sample it is a near-duplicate of directly."""
    best: dict[int, int] = {}
    for x, y in zip(edges.a.tolist(), edges.b.tolist(), strict=True):
        for node, partner in ((y, x), (x, y)):
            if node not in best or order_all[partner] < order_all[best[node]]:
                best[node] = partner
    return best


def _member_rows(rows, members, first, sizes, sigs, via, distance) -> pl.DataFrame:
    sid, ds, line = rows["sample_id"].to_list(), rows["dataset"].to_list(), rows["line"].to_list()
    paths, hashes = rows["image_paths"].to_list(), rows["image_hashes"].to_list()
    idx = rows["idx"].to_list()
    sim = (sigs[members] == sigs[first]).mean(axis=1)
    _, worst = _images_match(paths, hashes, first, members, distance)
    out = []
    for m, f, size, s, w in zip(members, first, sizes, sim, worst, strict=True):
        m, f = int(m), int(f)
        dup = m != f
        v = via.get(m) if dup else None
        link = v is not None and v != f
        out.append(
            {
                "idx": idx[m],
                "sample_id": sid[m],
                "dataset": ds[m],
                "line": line[m],
                "cluster": sid[f],
                "role": "duplicate" if dup else "kept",
                "kept_id": sid[f],
                "kept_dataset": ds[f],
                "kept_line": line[f],
                "similarity": float(s) if dup else 1.0,
                "image_distance": int(w) if (dup and w >= 0) else None,
                "cluster_size": int(size),
                "via_id": sid[v] if link else None,
                "via_dataset": ds[v] if link else None,
                "via_line": line[v] if link else None,
                "via_similarity": float((sigs[m] == sigs[v]).mean()) if link else None,
            }
        )
    schema = {"idx": pl.UInt32, **pl.from_arrow(MEMBERS_SCHEMA.empty_table()).schema}
    return pl.DataFrame(out, schema=schema).sort("idx")


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


def image_clusters(lf: pl.LazyFrame, distance: int, bands: int, pair_limit: int) -> pl.DataFrame:
    """Image clusters used by more than one sample (or file): files, samples, datasets each.

    Every (sample, image) row is grouped by its pHash out of core; distinct hashes are then
    clustered by pigeonhole bands and verified within ``distance`` bits.
    """
    uses = (
        lf.select("idx", "dataset", "image_paths", "image_hashes")
        .explode(["image_paths", "image_hashes"])
        .filter(pl.col("image_hashes").is_not_null())
        .rename({"image_paths": "path", "image_hashes": "phash"})
    )
    distinct = uses.group_by("phash").agg(n=pl.len()).sort("phash").collect(engine="streaming")
    hashes = distinct["phash"].to_numpy().astype(np.uint64)
    label = _hash_labels(hashes, distance, bands, pair_limit)
    cluster_of = pl.DataFrame({"phash": hashes, "cluster": label})
    out = (
        uses.join(cluster_of.lazy(), on="phash", how="left")
        .group_by("cluster")
        .agg(
            samples=pl.col("idx").n_unique(),
            files=pl.col("path").n_unique(),
            hashes=pl.col("phash").n_unique(),
            datasets=pl.col("dataset").unique().sort(),
            example=pl.col("path").min(),
        )
        .filter((pl.col("samples") > 1) | (pl.col("files") > 1))
        .with_columns(n_datasets=pl.col("datasets").list.len())
        .sort(["samples", "files", "example"], descending=[True, True, False])
        .collect(engine="streaming")
    )
    return out.with_columns(cluster=pl.col("cluster").cast(pl.UInt64))


def _hash_labels(hashes: np.ndarray, distance: int, bands: int, pair_limit: int) -> np.ndarray:
    """A cluster label per distinct hash: the smallest hash of its component."""
    label = hashes.copy()
    if len(hashes) < 2:
        return label
    keys = hash_bands(hashes, bands)
    ids = np.arange(len(hashes), dtype=np.int64)
    parts = [bucket_edges(keys[:, j], ids, ids, pair_limit) for j in range(bands)]
    cand = Edges.concat(parts).unique()
    if not len(cand):
        return label
    ok = hamming(hashes[cand.a], hashes[cand.b]) <= distance
    verified = Edges(cand.a[ok], cand.b[ok])
    if not len(verified):
        return label
    nodes, labels = components(verified)
    first = nodes[first_per_component(labels, nodes)]  # ids sorted = hashes sorted
    label[nodes] = hashes[first]
    return label
