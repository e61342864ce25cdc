"""The signatures step: per shard, each eligible sample's MinHash and its images' pHashes.

``signatures/<shard>.parquet`` has one row per sample the filters kept (or flagged): its
MinHash (uint32 × num_perm) and shingle setting when near-duplicates are looked for (the LSH
band keys are cut from it by the grouping step, so a new threshold, which changes the best
band count, regroups without rehashing), and the pHash of each of its images (a video:
``video_frames`` frames evenly spaced), for near-duplicates and for decontamination. Shards
run in parallel; a changed shard redoes only its own signatures. Images are hashed once per
file (``images.HashCache``); each shard keeps its hashes in ``_cache/signatures/<shard>.parquet``,
so a shard that is redone decodes only files that are new or changed, and an image that
another shard already hashed (same file, size and mtime) is read from that shard's file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.core.memo import Memo
from curate.core.stage import ShardInput, ShardOutput, ShardStage
from curate.stages.neardup.config import NearDupConfig
from curate.stages.neardup.images import HashCache
from curate.stages.neardup.text import (
    conversation_shingles,
    minhash_matrix,
    signature_version,
)

STAGE = "signatures"
SIGNATURES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("dataset", pa.string()),
        ("line", pa.int64()),
        ("group", pa.string()),  # shingle setting; null: no text signature
        ("n_shingles", pa.int32()),
        ("minhash", pa.list_(pa.uint32())),
        ("image_paths", pa.list_(pa.string())),
        ("image_hashes", pa.list_(pa.uint64())),  # null element: undecodable image
    ]
)
_CACHE_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("phash", pa.uint64()),
        ("fingerprint", pa.string()),
    ]
)
_HASH_VERSION = "phash64-lanczos32-draft128"
_COLUMNS = ["sample_id", "dataset", "line", "domain", "kind", "conversations", "images"]


def hashed_paths(kind: str, images: list[dict] | None, video_frames: int) -> list[str]:
    """The image paths of a sample that get a pHash (a video: frames evenly spaced)."""
    paths = [im["path"] for im in images or []]
    if kind == "video" and len(paths) > video_frames:
        picks = np.linspace(0, len(paths) - 1, video_frames).round().astype(int)
        paths = [paths[i] for i in dict.fromkeys(picks.tolist())]
    return paths


class SignaturesStage(ShardStage):
    """MinHash + band keys (``neardup`` set) and pHashes of every eligible sample."""

    name = STAGE
    reads = ("ingest",)
    respects = ("filter",)

    def __init__(self, config: NearDupConfig | None, video_frames: int = 8) -> None:
        super().__init__(config)
        self.text = config  # None: image hashes only (decontamination without near-duplicates)
        self.video_frames = config.video_frames if config is not None else video_frames
        workers = config.workers if config is not None else None
        self.workers = workers or os.cpu_count() or 1

    def settings(self) -> dict:
        images = {"hash": _HASH_VERSION, "video_frames": self.video_frames}
        if self.text is None:
            return {"images": images}
        cfg = self.text
        text = {
            "shingle": cfg.shingle.model_dump(),
            "num_perm": cfg.num_perm,
            "seed": cfg.seed,
            "version": signature_version(),
            "overrides": {
                k: {"shingle": o.shingle.model_dump() if o.shingle else None, "enabled": o.enabled}
                for k, o in sorted(cfg.overrides.items())
                if o.shingle is not None or o.enabled is not None
            },
        }
        return {"images": images, "text": text}

    def process(self, shard: ShardInput) -> ShardOutput:
        table = shard.samples(_COLUMNS)
        memo = Memo(shard.run, STAGE, shard.shard, _CACHE_SCHEMA)
        cache = HashCache(
            {(r["path"], r["size"], r["mtime_ns"]): r["phash"] for r in memo.load(_HASH_VERSION)}
        )
        cache.known.update(_other_shards_hashes(memo.path, table, cache, self.video_frames))
        parts = [
            self._batch(table.slice(start, self._batch_rows()), cache)
            for start in range(0, max(len(table), 1), self._batch_rows())
        ]
        rows = pa.concat_tables(parts) if parts else SIGNATURES_SCHEMA.empty_table()
        _save_cache(memo, cache)
        return ShardOutput(rows.cast(SIGNATURES_SCHEMA))

    def _batch_rows(self) -> int:
        return self.text.batch_rows if self.text is not None else 4096

    def _batch(self, part: pa.Table, cache: HashCache) -> pa.Table:
        n = len(part)
        convs = part.column("conversations").to_pylist()
        kinds = part.column("kind").to_pylist()
        images = part.column("images").to_pylist()
        paths = [
            hashed_paths(k, im, self.video_frames) for k, im in zip(kinds, images, strict=True)
        ]
        flat = cache.hashes(p for ps in paths for p in ps)
        hashes, at = [], 0
        for ps in paths:
            hashes.append(flat[at : at + len(ps)])
            at += len(ps)
        columns = {
            "sample_id": part.column("sample_id"),
            "dataset": part.column("dataset"),
            "line": part.column("line"),
            "image_paths": pa.array(paths, pa.list_(pa.string())),
            "image_hashes": pa.array(hashes, pa.list_(pa.uint64())),
        }
        columns.update(self._text_columns(part, convs, n))
        return pa.table({name: columns[name] for name in SIGNATURES_SCHEMA.names})

    def _text_columns(self, part: pa.Table, convs: list, n: int) -> dict:
        if self.text is None:
            return {
                "group": pa.nulls(n, pa.string()),
                "n_shingles": pa.array([0] * n, pa.int32()),
                "minhash": pa.nulls(n, pa.list_(pa.uint32())),
            }
        cfg = self.text
        datasets = part.column("dataset").to_pylist()
        domains = part.column("domain").to_pylist()
        settings = [cfg.resolve(d, dom) for d, dom in zip(datasets, domains, strict=True)]
        sets = [
            conversation_shingles(c, s.shingle) if s.enabled else []
            for c, s in zip(convs, settings, strict=True)
        ]
        sigs = minhash_matrix(sets, cfg.num_perm, cfg.seed)
        groups: list[str | None] = [s.shingle.label if s.enabled else None for s in settings]
        has = [bool(s) for s in sets]
        return {
            "group": pa.array([g if h else None for g, h in zip(groups, has, strict=True)]),
            "n_shingles": pa.array([len(s) for s in sets], pa.int32()),
            "minhash": _list_rows(sigs, has, pa.uint32()),
        }


def _list_rows(matrix: np.ndarray, present: list[bool], value_type: pa.DataType) -> pa.Array:
    """Rows of ``matrix`` as a list array, null where ``present`` is False."""
    n, width = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    values = pa.array(matrix.reshape(-1), value_type)
    full = pa.ListArray.from_arrays(offsets, values)
    mask = pa.array([not p for p in present])
    return pa.ListArray.from_arrays(offsets, values, mask=mask) if not all(present) else full


def _other_shards_hashes(
    own: Path, table: pa.Table, cache: HashCache, video_frames: int
) -> dict[tuple[str, int, int], int]:
    """The pHashes other shards already computed for this shard's images (an image used
    across shards is decoded once per run, not once per shard): their cache files are read
    filtered to this shard's paths, and an entry counts only with the same size and mtime."""
    others = [p for p in sorted(own.parent.glob("*.parquet")) if p != own]
    if not others:
        return {}
    kinds, images = table.column("kind").to_pylist(), table.column("images").to_pylist()
    keys = {
        k
        for kind, ims in zip(kinds, images, strict=True)
        for p in hashed_paths(kind, ims, video_frames)
        if (k := cache.key(p)) is not None and k not in cache.known
    }
    if not keys:
        return {}
    import pyarrow.dataset as ds

    wanted = pa.array(sorted({k[0] for k in keys}))
    found = (
        ds.dataset(others, format="parquet", schema=_CACHE_SCHEMA)
        .to_table(filter=(ds.field("fingerprint") == _HASH_VERSION) & ds.field("path").isin(wanted))
        .to_pylist()
    )
    out = {}
    for r in found:
        key = (r["path"], r["size"], r["mtime_ns"])
        if key in keys and r["phash"] is not None:
            out[key] = r["phash"]
    return out


def _save_cache(memo: Memo, cache: HashCache) -> None:
    rows = [
        {"path": k[0], "size": k[1], "mtime_ns": k[2], "phash": h, "fingerprint": _HASH_VERSION}
        for k, h in cache.known.items()
        if h is not None
    ]
    memo.save(pa.Table.from_pylist(rows, schema=_CACHE_SCHEMA))
