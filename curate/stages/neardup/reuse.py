"""Image reuse: clusters of near-identical images and how many files, samples and datasets use
each, out of core.

1. Every (sample, image) use is spilled, shard by shard, by a hash of its pHash (``Spill``).
2. One range at a time: the distinct pHashes of the range, cut into pigeonhole bands (two
   hashes within d bits agree on one of d + 1 bands), are spilled again by band key.
3. One range of band keys at a time: candidate pairs of hashes sharing a key (``pair_limit``
   as for text), kept when within ``distance`` bits. Connected components of those pairs
   (only the hashes in one) label each cluster by its smallest hash.
4. The uses again, one range at a time: a hash in no pair is its own cluster and is counted
   there; the uses of the clustered hashes are gathered and counted together at the end.

Memory: one range plus the verified pairs and the uses of clustered hashes; the table kept
is the clusters used by more than one sample or file (the report's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from curate.stages.neardup.images import hamming, hash_bands
from curate.stages.neardup.pairs import Edges, bucket_edges, components, first_per_component
from curate.stages.neardup.spill import Spill
from curate.stages.neardup.text import mix64

USES_SCHEMA = pa.schema(
    [
        ("part", pa.uint64()),  # mix64(phash)
        ("phash", pa.uint64()),
        ("idx", pa.uint32()),
        ("dataset", pa.string()),
        ("path", pa.string()),
    ]
)
_BANDS_SCHEMA = pa.schema([("part", pa.uint64()), ("key", pa.uint64()), ("phash", pa.uint64())])


def image_uses(frame: pl.DataFrame) -> pa.Table:
    """One shard's (sample, image) uses with a pHash: ``frame`` has idx, dataset,
    image_paths and image_hashes (one row per sample)."""
    uses = (
        frame.select("idx", "dataset", "image_paths", "image_hashes")
        .explode(["image_paths", "image_hashes"])
        .filter(pl.col("image_hashes").is_not_null())
        .select(
            phash=pl.col("image_hashes").cast(pl.UInt64),
            idx=pl.col("idx").cast(pl.UInt32),
            dataset=pl.col("dataset").cast(pl.String),
            path=pl.col("image_paths").cast(pl.String),
        )
    )
    part = mix64(uses["phash"].to_numpy().astype(np.uint64))
    return uses.with_columns(part=pl.Series(part, dtype=pl.UInt64)).to_arrow()


def image_clusters(
    uses: Spill, distance: int, bands: int, pair_limit: int, partition_rows: int, folder: Path
) -> pl.DataFrame:
    """Image clusters used by more than one sample (or file): files, samples, datasets each."""
    keys = Spill(folder, _BANDS_SCHEMA)
    for t in uses.parts(partition_rows):
        distinct = np.unique(t.column("phash").to_numpy())
        if not len(distinct):
            continue
        cut = hash_bands(distinct, bands).ravel()
        keys.write(pa.table({"part": mix64(cut), "key": cut, "phash": np.repeat(distinct, bands)}))
    a, b = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)]
    for t in keys.parts(partition_rows):
        h = t.column("phash").to_numpy()
        cand = bucket_edges(t.column("key").to_numpy(), h, h, pair_limit)
        ok = hamming(cand.a, cand.b) <= distance
        x, y = _unique_pairs(cand.a[ok], cand.b[ok])
        a.append(x)
        b.append(y)
    a, b = _unique_pairs(np.concatenate(a), np.concatenate(b))
    node, label = np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    if len(a):
        node, comp = components(Edges(a, b))
        label = node[first_per_component(comp, node)]  # the component's smallest hash
    return _count(uses, node, label, partition_rows)


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each (a, b) pair of hashes once (uint64: too wide to pack two in one number)."""
    a, b = a.astype(np.uint64), b.astype(np.uint64)
    if not len(a):
        return a, b
    both = np.unique(np.stack([a, b], axis=1), axis=0)
    return both[:, 0], both[:, 1]


def _count(uses: Spill, node: np.ndarray, label: np.ndarray, partition_rows: int) -> pl.DataFrame:
    """Per cluster (a hash in no pair: itself), its samples, files, hashes and datasets."""
    counted, clustered = [], []
    for t in uses.parts(partition_rows):
        frame = pl.from_arrow(t).drop("part")
        ph = frame["phash"].to_numpy()
        cluster, inside = ph.copy(), np.zeros(len(ph), bool)
        if len(node):
            pos = np.minimum(np.searchsorted(node, ph), len(node) - 1)
            inside = node[pos] == ph
            cluster[inside] = label[pos[inside]]
        frame = frame.with_columns(cluster=pl.Series(cluster, dtype=pl.UInt64))
        counted.append(_aggregate(frame.filter(~pl.Series(inside))))
        clustered.append(frame.filter(pl.Series(inside)))
    counted.append(_aggregate(pl.concat(clustered)))  # (uses.parts yields at least one)
    # The cluster last: equal examples (a file rehashed after a change) still sort one way.
    return pl.concat(counted).sort(
        ["samples", "files", "example", "cluster"], descending=[True, True, False, False]
    )


def _aggregate(uses: pl.DataFrame) -> pl.DataFrame:
    return (
        uses.group_by("cluster")
        .agg(
            samples=pl.col("idx").n_unique(),
            files=pl.col("path").n_unique(),
            hashes=pl.col("phash").n_unique(),
            datasets=pl.col("dataset").unique().sort(),
            example=pl.col("path").min(),
        )
        .filter((pl.col("samples") > 1) | (pl.col("files") > 1))
        .with_columns(n_datasets=pl.col("datasets").list.len())
    )
